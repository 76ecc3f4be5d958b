// Recycled attention (arXiv 2411.05787 / RefreshKV) during decode.
//
// Per layer, a recycled cache [head_dim, R, n_head_kv] (the stage caches' types; V transposed,
// [R, head_dim, n_head_kv], without flash attention: attention.h) whose rows [0, n_sel) hold, per KV head,
// the K/V of the tokens chosen at the last refresh, and whose tail rows [k, k + n_tail) hold the tokens
// decoded since (the refresh token first). A refresh step is a full step that also scores every
// visible cell (softmax of the one query, max over the query heads sharing the KV head), takes the
// top-k per KV head (ggml_top_k), and copies those rows with get_rows. A recycled step writes its K/V to
// the stage cache as always and to the tail, and attends only to the recycled cache: fixed shapes
// ([.., R, ..]) for every recycled step, so the graph (and CUDA graphs) stay the same.
// Only global layers take part: gemma3's sliding-window layers attend over their window in the stage
// cache at every step (build_layer); their rows here are allocated (one layout for all) but unused.
#pragma once
#include "kv_store.h"
#include "step.h"

#include <vector>

namespace plz {

struct RefreshLayer;

// How the recycled cache is filled at a refresh (the C API's PLZ_RECYCLE_*).
enum class RecycleMode { Off = 0, TopK = 1, Window = 2 };   // Window: sinks + recent window (StreamingLLM)

struct RecycleState {
    RecycleMode mode = RecycleMode::Off;
    int k = 0, tail_cap = 0, sinks = 0;
    int pool = 0;                // top-k mode: neighbours within `pool` cells share a cell's score
    float share = 0.0f;          // top-k mode: + share x the cell's best score over all layers and heads
    int rows = 0;                // R = pad(k + tail_cap)
    int n_sel = 0;               // gathered rows in use (<= k: fewer when fewer tokens were visible)
    int n_tail = 0;              // tail rows in use
    bool valid = false;          // a refresh happened since the last reset
    int refresh_pos = -1;        // position of the token of the last refresh
    std::vector<char> stage_all; // per stage: the refresh kept every visible token there, so recycled
                                 // steps attend as full attention would (K >= context is exact)
    ggml_context * ctx = nullptr;
    std::vector<ggml_backend_buffer_t> bufs;   // one per device: each layer's tensors on its layer's device
    std::vector<ggml_tensor *> rk, rv;  // per layer [D, R, Hkv] (V: [R, D, Hkv] when transposed)
    std::vector<ggml_tensor *> rk_bits, rv_bits;  // the same memory as I32 [head row bytes / 4, R, Hkv], or null
    std::vector<ggml_tensor *> rq;     // per layer [D * H] F32: the query of the last refresh
    std::vector<ggml_tensor *> ridx;  // per layer [k, Hkv] I32: cells chosen at the last refresh
    int64_t full_steps = 0, recycled_steps = 0;
    bool cuda_gather = false;    // refresh rows copied by native/gather_cuda.cu (CUDA builds, PYLAZY_CUDA_GATHER != 0)

    // share > 0 with several lazy stages: a token's best score must come from every stage's layers, but
    // each stage refreshes in its own graph over its own cells. So a stage's refresh graph stops at its
    // per-cell best score (a PendingPick), and the picks are made once every stage has scored
    // (refresh_picks), each stage's scores recomputed from the stored queries.
    struct PendingPick {
        int stage = 0, n_kv = 0, own_cell = 0;
        std::vector<int> layers;                 // the stage's refreshed layers
        float kq_scale = 1.0f;
        std::vector<ggml_fp16_t> mask_row;       // the refresh row's attention mask [n_kv]
        std::vector<float> best;                 // the stage's best score per cell
    };
    std::vector<PendingPick> pending;

    RecycleState() = default;
    RecycleState(const RecycleState &) = delete;
    RecycleState & operator=(const RecycleState &) = delete;
    ~RecycleState() { free_buffers(); }

    // k kept tokens per KV head, tail_cap tokens decoded between refreshes (the stride), sinks (Window),
    // pool and share (TopK: plz_set_recycle). Allocates the recycled cache for kv's layers.
    void configure(const KvStore & kv, RecycleMode mode, int k, int tail_cap, int sinks, int pool, float share);
    void reset(int n_stages);   // no valid recycled cache, counters zeroed
    // The step kind that runs when `asked` is (Full or Recycled, as the stride policy says): Full with
    // recycling off; a Refresh for a Full step with it, or for a Recycled one without a valid cache
    // or with its tail full.
    StepKind choose(StepKind asked) const;
    // After a step of kind `ran` whose token sits at position pos: the tail and counters move on.
    void count(StepKind ran, int pos);
    // Refresh picks wait for every stage's scores (pending): share > 0 with several stages.
    bool defer_picks(StepKind kind, int n_stages) const { return kind == StepKind::Refresh && mode == RecycleMode::TopK && share > 0.0f && n_stages > 1; }

    // A stage's refresh scores (best: F32 [n_kv], computed), kept until every stage has scored.
    void keep_pending_pick(const Segment & sg, const std::vector<RefreshLayer> & layers, ggml_tensor * best);
    // The deferred picks: a graph per pending stage on sched (its graphs built in meta).
    void refresh_picks(const KvStore & kv, ggml_backend_sched_t sched, std::vector<uint8_t> & meta, int graph_size, int n_past);
    // The refresh copies of a graph built for the CUDA gather kernel (after the graph has run).
    void run_cuda_gather(const KvStore & kv, const std::vector<RefreshLayer> & layers, const ggml_tensor * sorted, int own_cell) const;

private:
    void free_buffers();
};

// Graph inputs of a decode step with recycling.
struct RecycleInputs {
    ggml_tensor * tail_row = nullptr;   // I64 [1]: tail row the fresh token's K/V goes to
    ggml_tensor * mask = nullptr;       // F16 [R, 1]: valid recycled rows
    ggml_tensor * bias = nullptr;       // F32 [n_kv]: refresh candidates 0, others -2 (top-k mode)
    ggml_tensor * host_idx = nullptr;   // I32 [k, Hkv]: cells to keep (sinks + window mode)
    ggml_tensor * best = nullptr;       // F32 [n_kv]: best score over all stages' layers (share, several stages)
};

// The recycled-attention inputs of one segment of a Refresh or Recycled step, as a graph input.
class InputRecycle : public GraphInput {
public:
    InputRecycle(ggml_context * ctx0, const RecycleState & r, const KvStore & kv, const Segment & sg);
    void set_input(const Segment & sg) override;
    bool can_reuse(const Segment & sg) const override;
    RecycleInputs t;
private:
    const RecycleState & r;
    const KvStore & kv;
    StepKind kind;
    int rows, n_kv;
};

// Refresh candidates (0) and the rest (FORCE_OUT) from the fresh row's mask `last` [n_kv]: what it
// sees, except its own cell (it is the first tail row).
std::vector<float> refresh_bias(const ggml_fp16_t * last, int n_kv, int own_cell);

// Refresh, per layer: keeps the query for similarity checks (the fresh token's K/V becomes the first
// tail row in build_refresh_gather); returns the layer's raw attention logits of the one query
// [n_kv, G, Hkv] (top-k mode; G query heads per KV head) or null (sinks + window mode).
ggml_tensor * build_refresh_layer(ggml_context * ctx0, ggml_cgraph * gf, const RecycleState & r, const KvStore & kv, int il, ggml_tensor * q_last,
                                  ggml_tensor * kc);

// A refreshed layer's cache views and logits, kept until the end of the graph.
struct RefreshLayer {
    int il;
    ggml_tensor * kc;     // [D, n_kv, Hkv] view of the stage cache
    ggml_tensor * vc;
    ggml_tensor * logits; // [n_kv, G, Hkv] or null
    ggml_tensor * k_fresh, * v_fresh;  // the refresh token's K [D, 1, Hkv] and V (v_source): the first tail row
    ggml_tensor * mask;   // the fresh row's attention mask [n_kv, 1] (the same at every layer of a stage)
    float kq_scale;
    int src_cell = -1;    // >= 0: k_fresh/v_fresh unused, the first tail row is copied from this stage cell
};

// Refresh, after the last layer: all layers' logits stacked, then ONE softmax (scale and mask of the
// fresh row), ONE max-pool over the query heads of each KV head and the neighbouring cells, ONE top-k
// sort over every (layer, KV head) row: per-layer ops had launched 32-row kernels over 64K columns
// (too few blocks) and ggml's CUDA top_k runs one CUB call per row. Then per layer get_rows of the
// chosen cells into the recycled cache.
// Returns the sorted cell indices (an output of the graph) when the copy is left to the CUDA gather
// kernel (RecycleState::cuda_gather, run after the graph), else null.
ggml_tensor * build_refresh_gather(ggml_context * ctx0, ggml_cgraph * gf, const RecycleState & r, const KvStore & kv, const std::vector<RefreshLayer> & layers,
                                   const RecycleInputs & in);

// The first half of a refresh with picks deferred (RecycleState::pending): per cell, the best score over
// the layers and KV heads of `layers` [n_kv], before any share term.
ggml_tensor * build_refresh_best(ggml_context * ctx0, const RecycleState & r, const std::vector<RefreshLayer> & layers);

// Attention of a recycled step at layer il over the recycled cache; k_fresh [D, Hkv, 1], v_fresh a v_source.
ggml_tensor * build_recycled_attention(ggml_context * ctx0, ggml_cgraph * gf, const RecycleState & r, const KvStore & kv, int il,
                                       ggml_tensor * q, ggml_tensor * k_fresh, ggml_tensor * v_fresh,
                                       const RecycleInputs & in, float kq_scale);

// Cosine similarity of the query with the last refresh's query at layer il (a scalar tensor).
ggml_tensor * build_query_similarity(ggml_context * ctx0, const RecycleState & r, int il, ggml_tensor * q);

}  // namespace plz
