// Context: per-conversation state on top of a shared Model: the KV store, the graph scheduler,
// the last logits.
//
// KV store layout, chosen so lazy prefill and recycled attention need no new storage format:
// each layer owns K and V tensors of shape [head_dim * n_head_kv, capacity] (F16), one row per
// *cell*. A cell holds one token's K/V, written with set_rows at a cell index chosen on the host,
// with RoPE already applied at the token's true position; `Stage::cell_pos` maps cell -> position
// and is the only thing the attention mask is built from. So:
//  - lazy prefill gives each stage (run of layers between pruning layers) its own cell numbering:
//    a later stage simply has fewer cells (the tokens it computed), its layers' tensors hold only
//    those rows, and memory shrinks with the keep ratio;
//  - recycled attention views a layer's K as [head_dim, cells, n_head_kv] and gathers per KV head
//    the top-K cells with get_rows (indices [K, n_head_kv]) into a small recycled cache.
// With full attention there is one stage covering every layer and cell i holds position i.
#pragma once
#include "model.h"

#include <vector>

namespace plz {

struct Stage {
    int il0 = 0, il1 = 0;               // layers [il0, il1)
    int capacity = 0;                   // cells allocated per layer
    int n_cells = 0;                    // cells in use
    std::vector<int32_t> cell_pos;      // token position held by each used cell
};

struct Context {
    Model * model = nullptr;
    int n_ctx = 0, n_ubatch = 512, n_threads = 1;

    std::vector<Stage> stages;
    std::vector<ggml_tensor *> k, v;    // per layer: [head_dim * n_head_kv, stage capacity] F16
    ggml_context * ctx_kv = nullptr;
    ggml_backend_buffer_t buf_kv = nullptr;

    ggml_backend_sched_t sched = nullptr;
    std::vector<uint8_t> graph_meta;    // memory for graph-building ggml contexts
    int graph_size = 0;

    int n_past = 0;

    ~Context();
};

Context * new_context(Model * model, int n_ctx, int n_ubatch, int n_threads);

// Computes tokens at positions n_past.. and writes logits: all rows or the last one.
void eval(Context * c, const int32_t * tokens, int n, bool all_logits, float * logits_out);
void reset(Context * c);

}  // namespace plz
