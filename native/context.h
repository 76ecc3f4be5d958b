// Context: per-conversation state on top of a shared Model, and the scheduler of its steps: which rows
// of which stage run in which graph. Its parts live apart: the KV store and its layout (kv_store.h),
// recycled attention (recycle.h), graph building (graph.h); native/README.md draws the whole.
#pragma once
#include "kv_store.h"
#include "model.h"
#include "recycle.h"
#include "step.h"

#include <memory>
#include <string>
#include <vector>

namespace plz {

class GraphResult;

// Host-side wall time per phase of running a batch (PYLAZY_PROFILE=1).
struct Profile {
    enum Phase { HOST_INPUTS, BUILD, ALLOC, UPLOAD, COMPUTE, OUTPUTS, N_PHASES };
    bool enabled = false;
    int64_t batches = 0;
    double seconds[N_PHASES] = {};
    void print() const;
};

class Context {
public:
    // type_k / type_v: ggml_type values (< 0: F16); flash: ggml_flash_attn_ext instead of llama.cpp's
    // mul_mat + soft_max path (attention.h).
    static Context * create(Model * model, int n_ctx, int n_ubatch, int n_threads, bool flash = false, int type_k = -1, int type_v = -1);
    ~Context();
    Context(const Context &) = delete;
    Context & operator=(const Context &) = delete;

    // Pruning schedule: after layer layers[i], keep the fraction keep[i] of all tokens. Empty = full
    // attention. Only on an empty context (n_past == 0).
    void set_lazy(const std::vector<int> & layers, const std::vector<float> & keep, int pool = 0, int window = 1);
    // Recycled attention (recycle.h): k kept tokens per KV head, tail_cap tokens decoded between
    // refreshes (the stride).
    void set_recycle(RecycleMode mode, int k, int tail_cap, int sinks, int pool, float share);
    void set_threads(int n);
    void bind_threads() const;   // the model's CPU backend runs with this context's thread count

    // Computes tokens at positions n_past.. and writes logits: all rows or the last one. With a lazy
    // schedule and n_past == 0 the prompt is prefilled stage by stage with pruning; otherwise tokens run
    // through every stage, attending at each to the tokens selected for this step (reviving those that
    // were pruned). all_logits is only allowed without pruning.
    void eval(const int32_t * tokens, int n, bool all_logits, float * logits_out);
    // One decoded token under the stride policy's choice. select (lazy stages): re-select at every stage
    // boundary and revive the selected tokens (the LazyLLM step); otherwise every stage attends to its last
    // selection plus the tokens since, in one graph. A Recycled step never selects. Full: plain attention.
    // Refresh: full attention that also refills the recycled cache. Recycled: attention over the recycled
    // cache only (a Refresh is run instead when there is no valid recycled cache or its tail is full).
    // With sims (n_layer floats), a recycled step returns per layer the cosine similarity of its query
    // with the last refresh's. Returns the kind actually run.
    StepKind decode(int32_t token, StepKind kind, bool select, float * logits_out, float * sims);
    void reset();
    // Forgets every token at position >= n (full attention only), as llama.cpp's cache truncation: the
    // next eval continues at n. Used to reuse a prompt's cache across generations.
    void truncate(int n);

    Model * model() const { return model_; }
    int n_past() const { return n_past_; }
    // Per layer: cells in use, tokens revived there, KV bytes (any pointer may be null).
    void layer_stats(int32_t * cells, int64_t * revived, uint64_t * kv_bytes) const;
    void recycle_stats(int64_t * full_steps, int64_t * recycled_steps) const;
    Profile take_profile();   // the phase times so far, then zeroed

    // Introspection (pylazy_debug.h): the caches as they are.
    const KvStore & kv_store() const { return kv; }
    const RecycleState & recycle() const { return rec; }

private:
    struct BatchResult {
        std::vector<int32_t> selected_cells;
        std::vector<std::pair<int, float>> sims;   // (layer, query similarity) of recycled layers (want_sims)
    };
    // A scheduler and its last one-token graph, reused while the next step of that kind fits it
    // (GraphResult::can_reuse): building and allocating it is skipped, and ggml's CUDA graph for it stays
    // valid. [0] runs prefill, full and recycled steps, [1] refresh steps: with one scheduler, a refresh
    // evicted the recycled graph and the next refresh rebuilt its own (~2 000 nodes) every stride.
    // Each slot builds its graphs in its own memory: ggml's CUDA backend keys its CUDA graphs by the
    // address of a graph's first node, so refresh and recycled steps then keep one CUDA graph each
    // instead of evicting each other every stride.
    struct GraphSlot {
        ggml_backend_sched_t sched = nullptr;
        std::shared_ptr<GraphResult> cached;
        std::vector<uint8_t> meta;          // memory for graph-building ggml contexts
    };

    Context(Model * model, int n_ctx, int n_ubatch, int n_threads);
    void init(bool flash, int type_k, int type_v);
    void init_schedulers(bool per_op);
    void drop_graphs();

    // scheduling (context.cpp)
    void prefill_lazy(const int32_t * tokens, int n, float * logits_out);
    void step(const int32_t * tokens, int n, bool all_logits, float * logits_out, StepKind kind = StepKind::Full,
              bool select = true, float * sims = nullptr);
    void step_through_stages(const int32_t * tokens, int n, bool all_logits, float * logits_out, StepKind kind, float * sims);
    void step_with_selection(const int32_t * tokens, int n, bool all_logits, float * logits_out, StepKind kind, bool select,
                             float * sims);
    template <typename Visible> Segment prepare_segment(const Batch & b, Visible visible);
    template <typename Visible> BatchResult run_batch(const Batch & b, Visible visible, float * logits_out);
    BatchResult run_segments(const std::vector<Segment> & segs, float * logits_out);
    BatchResult read_outputs(const std::vector<Segment> & segs, const GraphResult & g, float * logits_out);
    void read_logits(ggml_tensor * logits, float * out, size_t bytes);

    Model * model_ = nullptr;
    int n_ctx = 0, n_ubatch = 512, n_threads = 1;
    int lazy_pool = 0;                  // lazy scores max-pooled over +-lazy_pool cells (0: the paper's)
    int lazy_window = 1;                // lazy scores from the attention of the batch's last lazy_window rows

    KvStore kv;                         // stages, their caches, the aux cache, the mask template
    RecycleState rec;

    GraphSlot slots[2];
    bool graph_reuse = true;            // PYLAZY_GRAPH_REUSE=0 rebuilds every graph (tests compare the two)
    int graph_size = 0;
    Profile profile;

    // Pinned (page-locked) host memory of the GPU device, as llama.cpp uses for its CPU buffers: the
    // schedulers' CPU-side inputs (token rows, positions, masks) and a staging buffer the logits are
    // read into, so the per-step transfers are DMA copies instead of staged pageable ones (H100 A/B,
    // scripts/env_ab.py: prefill 4K +2.7 %, decode within 1 %). Null on the CPU, or with PYLAZY_PINNED=0.
    ggml_backend_buffer_type_t host_buft = nullptr;
    ggml_backend_buffer_t logits_host = nullptr;
    // Vulkan backends of this context's own (see init_schedulers), freed after the schedulers.
    std::vector<ggml_backend_t> own_backends;

    int n_past_ = 0;
    // Lazy stages: position of the step that made the current selections (Stage::selected). Fresh rows of
    // a later stage attend to the selected tokens and to every token at or after this position.
    int select_pos = 0;
};

}  // namespace plz
