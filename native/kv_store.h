// KvStore: a context's KV cache, its aux cache (lazy prefill) and the causal mask template.
//
// Layout, chosen so lazy prefill and recycled attention need no new storage format: the layers are cut
// into *stages* by the pruning layers (full attention: one stage). All layers of a stage hold the same
// tokens, so each stage has its own cell numbering: a cell holds one token's K/V at every layer of the
// stage, written with set_rows at a host-chosen cell index, RoPE already applied at the token's true
// position. Each layer owns K and V tensors [head_dim * n_head_kv, stage capacity] of the context's
// cache types (V transposed without flash attention: attention.h). `Stage::cell_pos` (cell -> position)
// is all the attention mask is built from, so:
//  - a later stage holds only the tokens computed there; its tensors are sized by its keep ratio and
//    grow (reallocation) only when decode and revival need more cells;
//  - recycled attention views a layer's K as [head_dim, cells, n_head_kv] and gathers per KV head the
//    top-K cells with get_rows (indices [K, n_head_kv]) into a small recycled cache (recycle.h).
#pragma once
#include "attention.h"
#include "model.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace plz {

// n_kv seen by attention is padded so decode graphs keep one shape for 256 steps (CUDA graphs stay
// valid) and CUDA flash attention gets the multiple it wants; padded cells are masked.
constexpr int KV_PAD = 256;
inline int pad_to(int x, int m) { return (x + m - 1) / m * m; }

struct Stage {
    int il0 = 0, il1 = 0;               // layers [il0, il1)
    float keep = 1.0f;                  // fraction of all tokens selected into this stage (stage 0: 1)
    int capacity = 0;                   // cells allocated per layer
    int n_cells = 0;                    // cells in use
    std::vector<int32_t> cell_pos;      // token position held by each used cell
    bool sorted = true;                 // cell_pos ascending (revival appends out of order)
    bool identity = true;               // cell j holds position j for every used cell (stage 0 of a plain prefill)
    std::vector<int32_t> pos_cell;      // position -> cell, -1 when the token was never computed here
    std::vector<int32_t> selected;      // positions chosen into this stage at the last step (s > 0)
    int64_t revived = 0;                // tokens computed here from the aux cache after prefill
    ggml_context * ctx = nullptr;       // holds k/v tensors of this stage's layers
    std::vector<ggml_backend_buffer_t> bufs;   // their memory: one buffer per device (each layer's on its device)
};

// An I32 tensor created in ctx over the memory of t, an allocated cache tensor whose rows split
// into KV-head rows of D values each; null when such a head row is not a whole number of ints.
ggml_tensor * bits_alias(ggml_context * ctx, ggml_tensor * t, int D);

// Places a (a tensor of any type, not yet allocated) on the memory of t at byte offset offs, as a view
// of t for ggml: backends that reorder a graph (ggml-vulkan's graph_optimize) order two nodes by the
// tensors they view, so a write through an alias and a read or write through t stay in graph order.
// (An alias that ggml did not know as a view let Vulkan run the refresh token's tail-row write before
// the gather that overwrote it: docs/vulkan.md.)
void place_as_view(ggml_tensor * a, ggml_tensor * t, size_t offs);

struct KvStore {
    const Model * model = nullptr;
    int n_ctx = 0;
    KvFormat fmt;                       // flash attention or not, cache types, rotation (attention.h)

    std::vector<Stage> stages;
    std::vector<ggml_tensor *> k, v;    // per layer, pointing into the layer's stage
    // The same memory as k, v seen as I32 [row bytes / 4, capacity]: get_rows on these copies rows bit
    // for bit (on F16 it converts to F32, on quantized types it dequantizes), which the refresh gather
    // uses (recycle.cpp). Null where a KV head's row is not a whole number of ints, or V is transposed.
    std::vector<ggml_tensor *> k_bits, v_bits;
    // aux[s], s >= 1: hidden state entering stage s of every token computed in stage s-1, indexed by
    // position ([n_embd, n_ctx] F32): what a pruned token is revived from.
    std::vector<ggml_tensor *> aux;
    ggml_context * ctx_aux = nullptr;
    std::vector<ggml_backend_buffer_t> bufs_aux;   // aux[s] on the device of stage s's first layer

    // Causal mask template on the GPU, T[j, i] = 0 if j <= tpl_shift + i else -inf ([tpl_shift + n_ubatch +
    // KV_PAD, n_ubatch] F16, filled once). For a batch of consecutive positions p0.. over cells that
    // hold positions 0.. (Stage::identity) the mask is the view starting at column tpl_shift - p0, copied
    // on the device: measured on the H100, building a 64K x 512 mask on the host and uploading it took
    // 45 ms per ubatch, a third of a 64K prefill. Null on the CPU (the host mask costs little there).
    ggml_tensor * causal_tpl = nullptr;
    int tpl_shift = 0;
    ggml_context * ctx_tpl = nullptr;
    ggml_backend_buffer_t buf_tpl = nullptr;

    // Bumped whenever a cache tensor is (re)allocated: a graph built before points at freed tensors.
    uint64_t generation = 0;

    KvStore() = default;
    KvStore(const KvStore &) = delete;
    KvStore & operator=(const KvStore &) = delete;
    ~KvStore();

    // Stages cut after layers[i] keeping keep[i] (empty: one stage), their caches and the aux cache.
    void configure(const std::vector<int> & layers, const std::vector<float> & keep);
    void make_causal_template(int n_ubatch);
    // (Re)allocates the K/V tensors of stage s with `capacity` cells, keeping its used cells.
    void alloc_stage(int s, int capacity);
    // Room for `need` cells in stage s (grows by half at least, padded, at most the context).
    void ensure_capacity(int s, int need);
    void clear_stage(Stage & s) const;
    void clear();   // every stage emptied (allocations kept)
    // Forgets every token at position >= n (one stage only).
    void truncate(int n);
    // Gives the tokens at positions pos new cells at the end of stage s (growing it if needed).
    std::vector<int64_t> assign_cells(int s, const std::vector<int32_t> & pos);
    // Cells of stage s attention reads: the used ones padded to KV_PAD (masked beyond n_cells).
    int n_kv(int s) const { return std::min(pad_to(stages[s].n_cells, KV_PAD), stages[s].capacity); }
    int stage_of(int il) const;
    bool stage_has_swa(int s) const;

    // Views of layer il's cache cells [0, n): K as [D, n, Hkv] (per KV head, one row per cell); V as
    // rows [D, n, Hkv] too (a copy out of the transposed layout: attention.h).
    ggml_tensor * k_rows(ggml_context * ctx0, int il, int64_t n) const;
    ggml_tensor * v_rows(ggml_context * ctx0, int il, int64_t n) const { return v_stage_rows(ctx0, fmt, v[il], 0, n); }

private:
    void free_stage(Stage & s);
    void free_aux();
};

// The attention mask of a batch [n_kv, n] (rows at positions pos): 0 where row i attends to cell j,
// -inf elsewhere. A row sees cells at or before its position that `visible(row, cell_pos)` allows;
// window > 0 also hides cells with pos_row - pos_cell >= window (llama.cpp's LLAMA_SWA_TYPE_STANDARD
// rule), 0 means no window. attend_all: every row sees every earlier cell (causal only).
template <typename Visible>
std::vector<ggml_fp16_t> build_mask(const Stage & st, const std::vector<int32_t> & pos, bool attend_all, Visible visible, int n_kv,
                                    int window) {
    const int n = (int) pos.size();
    const ggml_fp16_t zero = ggml_fp32_to_fp16(0.0f), ninf = ggml_fp32_to_fp16(-INFINITY);
    std::vector<ggml_fp16_t> mask((size_t) n_kv * n, ninf);
    auto in_window = [&](int32_t row_pos, int32_t cell_pos) { return window <= 0 || row_pos - cell_pos < window; };
    if (attend_all && st.sorted) {
        // Causal over position-ordered cells: row i sees a contiguous run of them (the prefill hot path).
        for (int i = 0; i < n; ++i) {
            const auto first = window > 0 ? std::upper_bound(st.cell_pos.begin(), st.cell_pos.end(), pos[i] - window)
                                          : st.cell_pos.begin();
            const auto last = std::upper_bound(st.cell_pos.begin(), st.cell_pos.end(), pos[i]);
            std::fill(mask.begin() + (size_t) i * n_kv + (first - st.cell_pos.begin()),
                      mask.begin() + (size_t) i * n_kv + (last - st.cell_pos.begin()), zero);
        }
        return mask;
    }
    for (int i = 0; i < n; ++i) {
        for (int j = 0; j < st.n_cells; ++j) {
            const int32_t p = st.cell_pos[j];
            if (p <= pos[i] && in_window(pos[i], p) && visible(i, p)) mask[(size_t) i * n_kv + j] = zero;
        }
    }
    return mask;
}

}  // namespace plz
