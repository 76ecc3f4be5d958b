// What the scheduler (context.cpp) hands the graph builder (graph.cpp) for one step: its kind, the
// batch of rows of each stage and that batch made ready on the host (a Segment); and the interface of
// graph inputs (GraphInput), which fill themselves from a segment and say whether a cached graph fits.
#pragma once
#include "ggml.h"
#include "ggml-backend.h"

#include <cstdint>
#include <string>
#include <vector>

namespace plz {

enum class StepKind { Full, Refresh, Recycled };

// Scores are probabilities in [0, 1]; these biases force a cell in (the selecting token itself) or
// out (cells it cannot see, whose probability 0 could otherwise tie with a candidate's underflow).
constexpr float FORCE_IN = 2.0f, FORCE_OUT = -2.0f;

// One batch of rows through one stage. Rows are tokens new to the stage: fresh tokens and, in later
// stages, revived ones; the scheduler's `visible(row, cell)` says which cells each row attends to.
struct Batch {
    int stage = 0;
    bool attend_all = false;           // every row sees every earlier cell of the stage (causal only)
    std::vector<int32_t> rows;         // token ids (stage 0) or positions (gathered from aux[stage])
    std::vector<int32_t> pos;
    int n_select = 0;                  // > 0: select this many cells for the next stage (last row's view)
    int n_logits = 0;                  // logits of the last n_logits rows (last stage only)
    StepKind kind = StepKind::Full;    // Refresh/Recycled: one fresh row (decode)
    bool want_sims = false;
};

// One stage's part of a batch, made ready on the host: the rows' cells, attention masks and, when the
// batch selects for the next stage, the selection bias. A graph runs one segment (prefill chunks,
// revival, selecting and refresh steps) or, for one-token steps that select nothing, one segment per
// stage: the token then goes through every stage in a single graph.
struct Segment {
    Batch b;
    std::vector<int64_t> cells;
    int n_kv = 0;
    int tpl_p0 = -1;                          // >= 0: the mask is KvStore::causal_tpl seen from this position
    std::vector<ggml_fp16_t> mask, mask_swa;  // [n_kv, n]; empty when the graph does not read it
    std::vector<float> bias;                  // [n_kv] selection bias (b.n_select > 0)
    bool stage_all = false;                   // the last refresh kept every token of this stage (RecycleState)

    int n() const { return (int) b.rows.size(); }
    int own_cell() const { return (int) cells.back(); }   // the cell of the last (fresh) row
    const ggml_fp16_t * last_mask_row() const { return mask.data() + (size_t) (n() - 1) * n_kv; }
};

// A graph input (as llama.cpp's llm_graph_input_*): the tensors it created when the graph was built,
// set_input() filling them from the segment the graph now runs, can_reuse() saying whether a graph
// built for another segment still fits this one (same shapes, same ops).
class GraphInput {
public:
    virtual ~GraphInput() = default;
    virtual void set_input(const Segment & sg) = 0;
    virtual bool can_reuse(const Segment & sg) const = 0;
};

// A named input tensor of a graph being built ([ne0] or [ne0, ne1]).
inline ggml_tensor * new_input(ggml_context * ctx0, ggml_type type, int64_t ne0, int64_t ne1, const char * name) {
    ggml_tensor * t = ne1 > 1 ? ggml_new_tensor_2d(ctx0, type, ne0, ne1) : ggml_new_tensor_1d(ctx0, type, ne0);
    ggml_set_name(t, name);
    ggml_set_input(t);
    return t;
}

// Inputs a graph does not read (e.g. the stage mask of a recycled step) get no buffer: skip them.
inline void set_input(ggml_tensor * t, const void * data, size_t size) {
    if (t && t->buffer) ggml_backend_tensor_set(t, data, 0, size);
}

void check_status(ggml_status st, const char * what);

}  // namespace plz
