// CUDA refresh gather (recycle.cpp): copies, per (layer, KV head), the chosen cells' K and V rows from
// the stage cache into the recycled cache, and the refresh token's own row to the first tail row.
//
// Why a kernel: ggml's get_rows runs one thread block per gathered row, and a row here is one head of one
// cell (head_dim F16 = 256 bytes); a 64K refresh gathers 2.2 M of them, bound by block scheduling (~3.5 ms
// on the H100 for 570 MB). Here 16 threads move a row as 16-byte words, 16 rows per block. Used only
// when ggml runs on CUDA; every other backend takes recycle.cpp's get_rows path, which tests compare
// this with on the GPU (PYLAZY_CUDA_GATHER=0 turns it off).
#include "gather_cuda.h"

#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>

namespace {

constexpr int ROWS_PER_BLOCK = 16;

__global__ void gather_rows(const plz_gather_layer * layers, const int32_t * idx, int64_t idx_stride, int64_t n_tasks, int n_rows, int n_head_kv,
                            int row_words, size_t cell_stride, int tail_row, int own_cell) {
    const int lane = threadIdx.x % 16;                        // 16-byte word within the row
    const int64_t task = (int64_t) blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / 16;   // (layer, head, row)
    if (task >= n_tasks) return;
    const int64_t per_layer = (int64_t) n_head_kv * n_rows;
    const int j = (int) (task / per_layer);
    const int h = (int) (task % per_layer / n_rows);
    const int r = (int) (task % n_rows);
    const int cell = r == tail_row ? own_cell : idx[(int64_t) (j * n_head_kv + h) * idx_stride + r];
    const plz_gather_layer & L = layers[j];
    const size_t src = (size_t) cell * cell_stride + (size_t) h * row_words * 16;
    const size_t dst = ((size_t) h * n_rows + r) * row_words * 16;
    for (int w = lane; w < row_words; w += 16) {
        reinterpret_cast<uint4 *>((char *) L.rk + dst)[w] = reinterpret_cast<const uint4 *>((const char *) L.k + src)[w];
        reinterpret_cast<uint4 *>((char *) L.rv + dst)[w] = reinterpret_cast<const uint4 *>((const char *) L.v + src)[w];
    }
}

}  // namespace

bool plz_cuda_gather(const plz_gather_layer * layers, int n_layers, const int32_t * idx, int64_t idx_stride, int n_rows, int n_head_kv,
                     int row_bytes, size_t cell_stride, int tail_row, int own_cell) {
    if (row_bytes % 16 != 0 || cell_stride % 16 != 0) return false;
    static std::mutex mu;                            // one process-wide table of layer pointers, reused
    static plz_gather_layer * d_layers = nullptr;
    static int cap = 0;
    std::lock_guard<std::mutex> lock(mu);
    if (cap < n_layers) {
        if (d_layers) cudaFree(d_layers);
        if (cudaMalloc(&d_layers, sizeof(plz_gather_layer) * n_layers) != cudaSuccess) { d_layers = nullptr; cap = 0; return false; }
        cap = n_layers;
    }
    cudaStream_t stream = cudaStreamPerThread;
    if (cudaMemcpyAsync(d_layers, layers, sizeof(plz_gather_layer) * n_layers, cudaMemcpyHostToDevice, stream) != cudaSuccess) return false;
    const int64_t tasks = (int64_t) n_layers * n_head_kv * n_rows;
    const int blocks = (int) ((tasks + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK);
    gather_rows<<<blocks, ROWS_PER_BLOCK * 16, 0, stream>>>(d_layers, idx, idx_stride, tasks, n_rows, n_head_kv, row_bytes / 16,
                                                            cell_stride, tail_row, own_cell);
    return cudaGetLastError() == cudaSuccess && cudaStreamSynchronize(stream) == cudaSuccess;
}
