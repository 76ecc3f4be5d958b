// Graph building: the forward pass of one step's segments (step.h) as one ggml graph, its inputs as
// objects that fill themselves from the segments (set_input) and say whether a cached graph still
// fits the next step (can_reuse), as llama.cpp's llm_graph_input_* and llm_graph_result do.
#pragma once
#include "kv_store.h"
#include "model.h"
#include "recycle.h"
#include "step.h"

#include <memory>
#include <vector>

namespace plz {

// Batches of at most this many fresh tokens get their embedding rows dequantized on the host and
// uploaded as an input, instead of a get_rows in the graph: tok_embd lives in host memory, so with a
// GPU the in-graph lookup is a CPU split (thread-pool wake-up, sync, copy) in front of every decode
// step. Larger batches keep the in-graph lookup (host dequantization would be serial).
constexpr int HOST_EMBD_MAX = 16;

// Token ids (stage 0) or positions to gather from aux (revival), and the rows' RoPE positions.
class InputRows : public GraphInput {
public:
    InputRows(ggml_context * ctx0, const Model & m, const Segment & sg);
    void set_input(const Segment & sg) override;
    bool can_reuse(const Segment & sg) const override { return sg.n() == n && sg.b.stage == stage; }
    ggml_tensor * rows = nullptr;     // I32 [n]
    ggml_tensor * embd = nullptr;     // F32 [n_embd, n] token embeddings looked up on the host (stage 0, small n)
    ggml_tensor * pos = nullptr;      // I32 [n]
private:
    const Model & m;
    int n, stage;
};

// The cell each row's K/V is written to.
class InputCells : public GraphInput {
public:
    InputCells(ggml_context * ctx0, const Segment & sg);
    void set_input(const Segment & sg) override;
    bool can_reuse(const Segment & sg) const override { return sg.n() == n; }
    ggml_tensor * cells = nullptr;    // I64 [n]
private:
    int n;
};

// The attention masks of a segment: uploaded from the host, or (big causal batches) a view of the
// KvStore's causal template on the device; the sliding-window mask for SWA layers.
class InputMask : public GraphInput {
public:
    InputMask(ggml_context * ctx0, const KvStore & kv, const Segment & sg);
    void set_input(const Segment & sg) override;
    bool can_reuse(const Segment & sg) const override;
    ggml_tensor * mask = nullptr;     // F16 [n_kv, n]
    ggml_tensor * mask_swa = nullptr; // F16 [n_kv, n]  the same rows cut to the sliding window (SWA layers)
private:
    int n, n_kv, tpl_p0;
    bool host_empty;                  // built for a segment with no host mask (a recycled step's stage)
};

// The selection bias of a batch that selects for the next stage.
class InputScoreBias : public GraphInput {
public:
    InputScoreBias(ggml_context * ctx0, const Segment & sg);
    void set_input(const Segment & sg) override;
    bool can_reuse(const Segment & sg) const override { return sg.n_kv == n_kv; }
    ggml_tensor * score_bias = nullptr;  // F32 [n_kv]
private:
    int n_kv;
};

// What the graph of a step reads besides its segments.
struct GraphEnv {
    const Model & model;
    const KvStore & kv;
    const RecycleState & rec;
    int lazy_pool = 0, lazy_window = 1;
    int graph_size = 0;
};

// A built graph: its ggml context and graph, the inputs of each segment, the outputs.
class GraphResult {
public:
    // Builds the graph of segs in meta (memory for the ggml context, kept by the caller).
    GraphResult(const GraphEnv & env, const std::vector<Segment> & segs, std::vector<uint8_t> & meta);
    // Uploads the host-side inputs of segs (the segments built for, or ones it can_reuse).
    void set_inputs(const std::vector<Segment> & segs);
    // Whether this graph runs segs as well: the same segment structure and every input fits.
    bool can_reuse(const std::vector<Segment> & segs, uint64_t kv_generation) const;

    ggml_cgraph * gf = nullptr;
    ggml_tensor * logits = nullptr;
    ggml_tensor * select_scores = nullptr;  // F32 [n_kv]: the last row's importance per cell (the host picks)
    std::vector<std::vector<ggml_tensor *>> sims;   // per segment, per layer of its stage (null: SWA layer)
    std::vector<RefreshLayer> refresh;
    ggml_tensor * gather_idx = nullptr; // sorted cells for the CUDA gather kernel (build_refresh_gather)
    ggml_tensor * best = nullptr;       // F32 [n_kv]: the stage's best refresh score per cell (picks deferred)

private:
    struct Shape {   // what a segment's graph is built for, besides its inputs' shapes
        int stage, kind, n_logits, n_select, want_sims, stage_all;
        bool operator==(const Shape & o) const;
    };
    std::unique_ptr<ggml_context, void (*)(ggml_context *)> ctx{nullptr, ggml_free};
    std::vector<std::pair<size_t, std::unique_ptr<GraphInput>>> inputs;   // (segment, input)
    std::vector<Shape> shapes;
    RecycleInputs rec0;                 // the first segment's recycled-attention inputs (refresh gather)
    uint64_t kv_generation = 0;

    template <typename T> T * add(size_t seg, std::unique_ptr<T> in);
    void build(const GraphEnv & env, const std::vector<Segment> & segs);
    ggml_tensor * build_segment(const GraphEnv & env, const Segment & sg, size_t i, ggml_tensor * x, InputRows *& rows,
                                ggml_tensor ** scores);
    void add_outputs(const GraphEnv & env, const std::vector<Segment> & segs, ggml_tensor * scores);
};

}  // namespace plz
