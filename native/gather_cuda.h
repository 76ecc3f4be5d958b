// The CUDA refresh gather (gather_cuda.cu), built when pylazy is configured with -DGGML_CUDA=on.
#pragma once
#include <cstddef>
#include <cstdint>

struct plz_gather_layer {
    const void * k, * v;   // stage cache of the layer: [head_dim * n_head_kv, cells] F16 (device memory)
    void * rk, * rv;       // recycled cache: [head_dim, n_rows, n_head_kv] F16 (device memory)
};

// For layer j, KV head h, row r < n_rows: copies cell idx[(j * n_head_kv + h) * idx_stride + r] (device
// memory), or own_cell for r == tail_row, from k/v into rk/rv row r of head h. Synchronous. Returns
// false on any CUDA error (the caller then throws).
bool plz_cuda_gather(const plz_gather_layer * layers, int n_layers, const int32_t * idx, int64_t idx_stride, int n_rows, int n_head_kv,
                     int row_bytes, size_t cell_stride, int tail_row, int own_cell);
