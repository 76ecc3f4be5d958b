// Context: per-conversation state on top of a shared Model: the KV store (per stage), the aux cache of
// lazy prefill, the graph scheduler and the step statistics.
//
// KV store layout, chosen so lazy prefill and recycled attention need no new storage format:
// the layers are cut into *stages* by the pruning layers (full attention: one stage). All layers of a
// stage hold the same tokens, so each stage has its own cell numbering: a cell holds one token's K/V at
// every layer of the stage, written with set_rows at a host-chosen cell index, RoPE already applied at
// the token's true position. Each layer owns K and V tensors [head_dim * n_head_kv, stage capacity]
// of the context's cache types (V transposed without flash attention: attention.h). `Stage::cell_pos` (cell -> position) is all the attention mask is built from, so:
//  - a later stage holds only the tokens computed there; its tensors are sized by its keep ratio and
//    grow (reallocation) only when decode and revival need more cells;
//  - recycled attention views a layer's K as [head_dim, cells, n_head_kv] and gathers per KV head the
//    top-K cells with get_rows (indices [K, n_head_kv]) into a small recycled cache.
#pragma once
#include "attention.h"
#include "model.h"
#include "recycle.h"

#include <memory>
#include <string>
#include <vector>

namespace plz {

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

// Host-side wall time per phase of running a batch (PYLAZY_PROFILE=1).
struct Profile {
    enum Phase { HOST_INPUTS, BUILD, ALLOC, UPLOAD, COMPUTE, OUTPUTS, N_PHASES };
    bool enabled = false;
    int64_t batches = 0;
    double seconds[N_PHASES] = {};
    void print() const;
};

struct Context {
    Model * model = nullptr;
    int n_ctx = 0, n_ubatch = 512, n_threads = 1;
    int lazy_pool = 0;                  // lazy scores max-pooled over +-lazy_pool cells (0: the paper's)
    int lazy_window = 1;                // lazy scores from the attention of the batch's last lazy_window rows

    std::vector<Stage> stages;
    std::vector<ggml_tensor *> k, v;    // per layer, pointing into the layer's stage
    // The same memory as k, v seen as I32 [row bytes / 4, capacity]: get_rows on these copies rows bit
    // for bit (on F16 it converts to F32, on quantized types it dequantizes), which the refresh gather
    // uses (recycle.cpp). Null where a KV head's row is not a whole number of ints, or V is transposed.
    std::vector<ggml_tensor *> k_bits, v_bits;
    KvFormat kv;                        // flash attention or not, cache types, rotation (attention.h)
    // aux[s], s >= 1: hidden state entering stage s of every token computed in stage s-1, indexed by
    // position ([n_embd, n_ctx] F32): what a pruned token is revived from.
    std::vector<ggml_tensor *> aux;
    ggml_context * ctx_aux = nullptr;
    std::vector<ggml_backend_buffer_t> bufs_aux;   // aux[s] on the device of stage s's first layer

    // Two schedulers, [0] for prefill, full and recycled steps, [1] for refresh steps, each with its
    // last one-token graph, reused while the next step of that kind has the same shape: building and
    // allocating it is skipped, and ggml's CUDA graph for it stays valid. With one scheduler, a refresh
    // evicted the recycled graph and the next refresh rebuilt its own (~2 000 nodes) every stride. A
    // cached graph is dropped when its scheduler builds another or a cache tensor it points at is
    // reallocated.
    ggml_backend_sched_t sched[2] = {nullptr, nullptr};
    std::shared_ptr<void> graph_cache[2];
    std::vector<int> graph_key[2];      // the shape the cached graph was built for (graph_shape)
    bool cuda_gather = false;           // refresh rows copied by native/gather_cuda.cu (CUDA builds, PYLAZY_CUDA_GATHER != 0)
    bool graph_reuse = true;            // PYLAZY_GRAPH_REUSE=0 rebuilds every graph (tests compare the two)
    std::vector<uint8_t> graph_meta;    // memory for graph-building ggml contexts
    // Refresh graphs are built in their own memory: ggml's CUDA backend keys its CUDA graphs by the
    // address of a graph's first node, so refresh and recycled steps then keep one CUDA graph each
    // instead of evicting each other every stride (measured: a 64K refresh went from 26 ms to ...).
    std::vector<uint8_t> graph_meta_refresh;
    int graph_size = 0;

    RecycleState rec;
    Profile profile;

    // Causal mask template on the GPU, T[j, i] = 0 if j <= tpl_shift + i else -inf ([tpl_shift + n_ubatch +
    // KV_PAD, n_ubatch] F16, filled once). For a batch of consecutive positions p0.. over cells that
    // hold positions 0.. (Stage::identity) the mask is the view starting at column tpl_shift - p0, copied
    // on the device: measured on the H100, building a 64K x 512 mask on the host and uploading it took
    // 45 ms per ubatch, a third of a 64K prefill. Null on the CPU (the host mask costs little there).
    ggml_tensor * causal_tpl = nullptr;
    int tpl_shift = 0;
    ggml_context * ctx_tpl = nullptr;
    ggml_backend_buffer_t buf_tpl = nullptr;

    // Pinned (page-locked) host memory of the GPU device, as llama.cpp uses for its CPU buffers: the
    // schedulers' CPU-side inputs (token rows, positions, masks) and a staging buffer the logits are
    // read into, so the per-step transfers are DMA copies instead of staged pageable ones (H100 A/B,
    // scripts/env_ab.py: prefill 4K +2.7 %, decode within 1 %). Null on the CPU, or with PYLAZY_PINNED=0.
    ggml_backend_buffer_type_t host_buft = nullptr;
    ggml_backend_buffer_t logits_host = nullptr;

    int n_past = 0;
    // Lazy stages: position of the step that made the current selections (Stage::selected). Fresh rows of
    // a later stage attend to the selected tokens and to every token at or after this position.
    int select_pos = 0;

    ~Context();
};

// type_k / type_v: ggml_type values (< 0: F16); flash: ggml_flash_attn_ext instead of llama.cpp's
// mul_mat + soft_max path (attention.h).
Context * new_context(Model * model, int n_ctx, int n_ubatch, int n_threads, bool flash = false, int type_k = -1, int type_v = -1);

// Pruning schedule: after layer layers[i], keep the fraction keep[i] of all tokens. Empty = full
// attention. Only on an empty context (n_past == 0).
void set_lazy(Context * c, const std::vector<int> & layers, const std::vector<float> & keep, int pool = 0, int window = 1);

// Computes tokens at positions n_past.. and writes logits: all rows or the last one. With a lazy
// schedule and n_past == 0 the prompt is prefilled stage by stage with pruning; otherwise tokens run
// through every stage, attending at each to the tokens selected for this step (reviving those that
// were pruned). all_logits is only allowed without pruning.
void eval(Context * c, const int32_t * tokens, int n, bool all_logits, float * logits_out);
void reset(Context * c);
void drop_graph_cache(Context & c);

// An I32 tensor created in ctx over the memory of t, an allocated cache tensor whose rows split
// into KV-head rows of D values each; null when such a head row is not a whole number of ints.
ggml_tensor * bits_alias(ggml_context * ctx, ggml_tensor * t, int D);

// Forgets every token at position >= n (full attention only), as llama.cpp's cache truncation: the
// next eval continues at n. Used to reuse a prompt's cache across generations.
void truncate(Context * c, int n);

// Recycled attention: mode 0 off, 1 top-k by attention, 2 sinks + recent window; k kept tokens per KV
// head, tail_cap tokens decoded between refreshes (the stride).
void set_recycle(Context * c, int mode, int k, int tail_cap, int sinks, int pool, float share);

// One decoded token under the stride policy's choice. select (lazy stages): re-select at every stage
// boundary and revive the selected tokens (the LazyLLM step); otherwise every stage attends to its last
// selection plus the tokens since, in one graph. A Recycled step never selects. Full: plain attention. Refresh: full attention
// that also refills the recycled cache. Recycled: attention over the recycled cache only (a Refresh is
// run instead when there is no valid recycled cache or its tail is full). With sims (n_layer floats),
// a recycled step returns per layer the cosine similarity of its query with the last refresh's.
// Returns the kind actually run.
StepKind decode(Context * c, int32_t token, StepKind kind, bool select, float * logits_out, float * sims);

}  // namespace plz
