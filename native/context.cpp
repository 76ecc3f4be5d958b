// The forward pass and its bookkeeping. Read build_layer() for one transformer block, run_batch() for
// how one batch of rows goes through one stage, prefill_lazy() and step() for the two ways tokens
// are scheduled through the stages.
#include "context.h"
#ifdef PLZ_CUDA_GATHER
#include "gather_cuda.h"
#endif
#include "keep.h"
#include "op_report.h"
#include "pylazy.h"

#include "ggml-alloc.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>

namespace plz {

namespace {

// n_kv seen by attention is padded so decode graphs keep one shape for 256 steps (CUDA graphs stay
// valid) and CUDA flash attention gets the multiple it wants; padded cells are masked.
constexpr int KV_PAD = 256;
// Scores are probabilities in [0, 1]; these biases force a cell in (the selecting token itself) or
// out (cells it cannot see, whose probability 0 could otherwise tie with a candidate's underflow).
constexpr float FORCE_IN = 2.0f, FORCE_OUT = -2.0f;
// Batches of at most this many fresh tokens get their embedding rows dequantized on the host and
// uploaded as an input, instead of a get_rows in the graph: tok_embd lives in host memory, so with a
// GPU the in-graph lookup is a CPU split (thread-pool wake-up, sync, copy) in front of every decode
// step. Larger batches keep the in-graph lookup (host dequantization would be serial).
constexpr int HOST_EMBD_MAX = 16;

int pad_to(int x, int m) { return (x + m - 1) / m * m; }

// Inputs a graph does not read (e.g. the stage mask of a recycled step) get no buffer: skip them.
void set_input(ggml_tensor * t, const void * data, size_t size) {
    if (t && t->buffer) ggml_backend_tensor_set(t, data, 0, size);
}

ggml_tensor * new_input(ggml_context * ctx0, ggml_type type, int64_t ne0, int64_t ne1, const char * name) {
    ggml_tensor * t = ne1 > 1 ? ggml_new_tensor_2d(ctx0, type, ne0, ne1) : ggml_new_tensor_1d(ctx0, type, ne0);
    ggml_set_name(t, name);
    ggml_set_input(t);
    return t;
}

struct Inputs {
    ggml_tensor * rows = nullptr;     // I32 [n]   token ids (stage 0) or positions to gather from aux
    ggml_tensor * embd = nullptr;     // F32 [n_embd, n] token embeddings looked up on the host (stage 0, small n)
    ggml_tensor * pos = nullptr;      // I32 [n]   RoPE positions
    ggml_tensor * cells = nullptr;    // I64 [n]   cell each row's K/V is written to
    ggml_tensor * mask = nullptr;     // F16 [n_kv, n]
    ggml_tensor * mask_swa = nullptr; // F16 [n_kv, n]  the same rows cut to the sliding window (SWA layers)
    ggml_tensor * score_bias = nullptr;  // F32 [n_kv]  only when the batch selects for the next stage
    StepKind kind = StepKind::Full;
    bool recycle_stage = false;          // Refresh/Recycled apply to this stage (not one that keeps all)
    RecycleInputs rec;
    std::vector<ggml_tensor *> * sims = nullptr;  // per-layer query similarity outputs (Recycled)
    std::vector<RefreshLayer> * refresh = nullptr; // per-layer refresh scores, gathered after the last layer
};

// One transformer block on hidden states x [n_embd, n] attending to the first n_kv cells of the
// layer's stage. With `scores` set, also returns the last row's attention probabilities averaged over
// heads ([n_kv]) — the lazy-prefill importance of every cell. n_out < n (the model's last layer when
// only the last rows' logits are wanted): rows before them stop after attention, as llama.cpp's
// inp_out_ids does; the same row counts per matmul keep ggml's kernels, and so logits, identical.
//
// Sliding-window layers (gemma3) read the stage's full K/V through in.mask_swa, which hides cells
// pos_row - pos_cell >= n_swa. Recycled attention applies to global layers only: an SWA layer sees at
// most n_swa tokens anyway, so at Refresh and Recycled steps it attends as at a full step (stage cache,
// window mask), is not scored for the recycled cache, and reports no query similarity (NaN).
// Cells [c0, c0 + n) of a layer's K or V cache as [D, n, Hkv]: per KV head, one row per cell.
ggml_tensor * cache_rows(ggml_context * ctx0, ggml_tensor * t, int D, int Hkv, int64_t c0, int64_t n) {
    return ggml_view_3d(ctx0, t, D, n, Hkv, t->nb[1], ggml_row_size(t->type, D), (size_t) c0 * t->nb[1]);
}

ggml_tensor * build_layer(ggml_context * ctx0, ggml_cgraph * gf, Context & c, int il,
                          ggml_tensor * x, const Inputs & in, int n_kv, ggml_tensor ** scores, int n_out) {
    const Model & m = *c.model;
    const Hparams & hp = m.hp;
    const LayerWeights & L = m.layers[il];
    const int n = (int) x->ne[1], D = hp.head_dim, H = hp.n_head, Hkv = hp.n_head_kv;
    const bool swa = hp.is_swa(il);
    ggml_tensor * mask = swa ? in.mask_swa : in.mask;
    const bool recycle = in.recycle_stage && !swa;

    // Optional tensors (null when the arch/file has none) are skipped: llama, qwen2 (q/k/v biases),
    // qwen3 (per-head q/k RMSNorm) and gemma3 (q/k norms, post-norms) share this one graph.
    auto bias = [&](ggml_tensor * t, ggml_tensor * b) { return b ? ggml_add(ctx0, t, b) : t; };
    auto norm = [&](ggml_tensor * t, ggml_tensor * w) {  // RMSNorm over ne0 (n_embd, or D per head)
        return w ? ggml_mul(ctx0, ggml_rms_norm(ctx0, t, hp.rms_eps), w) : t;
    };
    ggml_tensor * cur = norm(x, L.attn_norm);
    ggml_tensor * q = ggml_reshape_3d(ctx0, bias(ggml_mul_mat(ctx0, L.wq, cur), L.bq), D, H, n);
    ggml_tensor * k = ggml_reshape_3d(ctx0, bias(ggml_mul_mat(ctx0, L.wk, cur), L.bk), D, Hkv, n);
    ggml_tensor * v = bias(ggml_mul_mat(ctx0, L.wv, cur), L.bv);
    q = norm(q, L.q_norm);
    k = norm(k, L.k_norm);
    // m.rope_freqs (llama3 scaling) divides each rotation frequency; null leaves them as they are.
    // SWA layers rotate with their own base and scale (gemma3: 10000, 1 while global layers use 1e6).
    const float base = swa ? hp.rope_base_swa : hp.rope_base, fscale = swa ? hp.rope_freq_scale_swa : hp.rope_freq_scale;
    q = ggml_rope_ext(ctx0, q, in.pos, m.rope_freqs, hp.rope_dim, hp.rope_mode, hp.n_ctx_train,
                      base, fscale, 0.0f, 1.0f, 32.0f, 1.0f);
    k = ggml_rope_ext(ctx0, k, in.pos, m.rope_freqs, hp.rope_dim, hp.rope_mode, hp.n_ctx_train,
                      base, fscale, 0.0f, 1.0f, 32.0f, 1.0f);
    float kq_scale = hp.kq_scale;
    if (hp.scale_q) {   // gemma3 scales q itself (as llama.cpp does), so attention adds no scale
        q = ggml_scale(ctx0, q, kq_scale);
        kq_scale = 1.0f;
    }
    // Quantized caches: q/k (v) in the rotated basis llama.cpp stores them in (attention.h).
    q = rotate_qk(ctx0, c, q);
    k = rotate_qk(ctx0, c, k);
    v = rotate_v(ctx0, c, v);

    // Write this batch's K/V into its cells first; the attention below reads the cache after it.
    // A view (not a reshape) between RoPE and set_rows: ggml's CUDA backend fuses ROPE+VIEW+SET_ROWS.
    ggml_build_forward_expand(gf, ggml_set_rows(ctx0, c.k[il], ggml_view_2d(ctx0, k, D * Hkv, n, k->nb[2], 0), in.cells));
    ggml_build_forward_expand(gf, store_stage_v(ctx0, c, c.v[il], v_source(ctx0, c, v), in.cells));

    ggml_tensor * kc = cache_rows(ctx0, c.k[il], D, Hkv, 0, n_kv);

    // Last row's query per head, [D, 1, H]; K broadcasts over the query heads of its group.
    ggml_tensor * q_last = ggml_view_3d(ctx0, q, D, 1, H, q->nb[1], q->nb[1], (size_t) (n - 1) * q->nb[2]);
    ggml_tensor * mask_last = ggml_view_2d(ctx0, mask, n_kv, 1, mask->nb[1], (size_t) (n - 1) * mask->nb[1]);
    // The fresh token is the last row (a refresh batch may start with revived rows).
    ggml_tensor * k_last = ggml_view_3d(ctx0, k, D, Hkv, 1, k->nb[1], k->nb[2], (size_t) (n - 1) * k->nb[2]);
    ggml_tensor * v_last = v_source(ctx0, c, ggml_view_2d(ctx0, v, D * Hkv, 1, v->nb[1], (size_t) (n - 1) * v->nb[1]));
    if (recycle && in.kind == StepKind::Refresh) {
        ggml_tensor * logits = build_refresh_layer(ctx0, gf, c, il, q_last, kc);
        in.refresh->push_back({il, kc, v_stage_rows(ctx0, c, c.v[il], 0, n_kv), logits, ggml_permute(ctx0, k_last, 0, 2, 1, 3),
                               v_last, mask_last, kq_scale});
    }
    if (in.sims) in.sims->push_back(recycle ? build_query_similarity(ctx0, c, il, q_last) : nullptr);
    if (scores) {
        // The importance of a cell: its attention probability from the last W rows of the batch (the
        // observation window, LazyPrefill(window=); 1 = the last token only, as LazyLLM), mean over
        // those rows and the heads.
        const int W = std::max(1, std::min(n, c.lazy_window));
        ggml_tensor * q_win = ggml_view_3d(ctx0, q, D, W, H, q->nb[2], q->nb[1], (size_t) (n - W) * q->nb[2]);
        ggml_tensor * mask_win = ggml_view_2d(ctx0, mask, n_kv, W, mask->nb[1], (size_t) (n - W) * mask->nb[1]);
        ggml_tensor * kq = ggml_mul_mat(ctx0, kc, q_win);                       // [n_kv, W, H]
        kq = ggml_soft_max_ext(ctx0, kq, mask_win, kq_scale, 0.0f);
        kq = ggml_cont(ctx0, ggml_transpose(ctx0, ggml_reshape_2d(ctx0, kq, n_kv, W * H)));  // [W * H, n_kv]
        ggml_tensor * s = ggml_reshape_1d(ctx0, ggml_mean(ctx0, kq), n_kv);
        // Optional (LazyPrefill(pool=)): a cell also scores as its best neighbour within lazy_pool cells,
        // as recycle.cpp does for the same reason (an attended token's followers come along).
        if (c.lazy_pool > 0) s = ggml_pool_1d(ctx0, s, GGML_OP_POOL_MAX, 2 * c.lazy_pool + 1, 1, c.lazy_pool);
        *scores = ggml_add(ctx0, s, in.score_bias);
    }

    q = ggml_permute(ctx0, q, 0, 2, 1, 3);  // [D, n, H]
    ggml_tensor * attn;
    if (recycle && in.kind == StepKind::Recycled) {
        attn = build_recycled_attention(ctx0, gf, c, il, q, k_last, v_last, in.rec, kq_scale);
    } else {
        attn = build_attention(ctx0, c, q, kc, v_operand(ctx0, c, c.v[il], false, n_kv), mask, kq_scale);
    }
    attn = rotate_v(ctx0, c, ggml_reshape_2d(ctx0, attn, D * H, n));
    ggml_tensor * out = bias(ggml_mul_mat(ctx0, L.wo, attn), L.bo);
    if (n_out < n) {
        auto last_rows = [&](ggml_tensor * t) { return ggml_view_2d(ctx0, t, t->ne[0], n_out, t->nb[1], (size_t) (n - n_out) * t->nb[1]); };
        out = last_rows(out);
        x = last_rows(x);
    }
    // gemma3 normalises each sub-block's output (post-norm) before adding it to the residual.
    x = ggml_add(ctx0, x, norm(out, L.attn_post_norm));

    cur = norm(x, L.ffn_norm);
    ggml_tensor * gate = bias(ggml_mul_mat(ctx0, L.ffn_gate, cur), L.b_gate);
    ggml_tensor * up = bias(ggml_mul_mat(ctx0, L.ffn_up, cur), L.b_up);
    cur = hp.gelu ? ggml_geglu_split(ctx0, gate, up) : ggml_swiglu_split(ctx0, gate, up);
    return ggml_add(ctx0, x, norm(bias(ggml_mul_mat(ctx0, L.ffn_down, cur), L.b_down), L.ffn_post_norm));
}

ggml_tensor * build_logits(ggml_context * ctx0, const Model & m, ggml_tensor * x) {
    x = ggml_mul(ctx0, ggml_rms_norm(ctx0, x, m.hp.rms_eps), m.output_norm);
    x = ggml_mul_mat(ctx0, m.output, x);
    if (m.hp.final_softcap > 0.0f) {   // c * tanh(logits / c), in llama.cpp's op order
        x = ggml_scale(ctx0, ggml_tanh(ctx0, ggml_scale(ctx0, x, 1.0f / m.hp.final_softcap)), m.hp.final_softcap);
    }
    return x;
}

void check_status(ggml_status st, const char * what) {
    if (st != GGML_STATUS_SUCCESS) throw Error(PLZ_ERR_RUNTIME, std::string(what) + " failed (ggml status " + std::to_string((int) st) + ")");
}

// One batch of rows through one stage. Rows are tokens new to the stage: fresh tokens and, in later
// stages, revived ones; `visible(row, cell)` says which cells each row attends to.
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

struct BatchResult {
    std::vector<int32_t> selected_cells;
    std::vector<std::pair<int, float>> sims;   // (layer, query similarity) of recycled layers (want_sims)
};

}  // namespace

static void drop_graph_slot(Context & c, int slot) {
    c.graph_cache[slot].reset();
    c.graph_key[slot].clear();
}

void drop_graph_cache(Context & c) {
    for (int slot = 0; slot < 2; ++slot) drop_graph_slot(c, slot);
}

// -- storage -------------------------------------------------------------------------------------

static void free_stage(Stage & s) {
    for (auto * b : s.bufs) ggml_backend_buffer_free(b);
    if (s.ctx) ggml_free(s.ctx);
    s.bufs.clear();
    s.ctx = nullptr;
}

// An I32 tensor over the memory of an allocated cache tensor (four bytes of a row as one int).
ggml_tensor * bits_alias(ggml_context * ctx, ggml_tensor * t, int D) {
    if (ggml_row_size(t->type, D) % sizeof(int32_t) != 0) return nullptr;
    ggml_tensor * a = ggml_new_tensor_4d(ctx, GGML_TYPE_I32, ggml_row_size(t->type, t->ne[0]) / sizeof(int32_t), t->ne[1], t->ne[2], t->ne[3]);
    if (ggml_backend_tensor_alloc(t->buffer, a, t->data) != GGML_STATUS_SUCCESS) throw Error(PLZ_ERR_RUNTIME, "cannot alias a cache tensor");
    return a;
}

// (Re)allocates the K/V tensors of a stage with `capacity` cells, keeping the first n_cells rows.
static void alloc_stage(Context & c, Stage & s, int capacity) {
    drop_graph_cache(c);
    const int D = c.model->hp.head_dim;
    ggml_init_params ip = { ggml_tensor_overhead() * (4 * (s.il1 - s.il0) + 1), nullptr, true };
    ggml_context * ctx = ggml_init(ip);
    std::vector<ggml_tensor *> nk, nv;
    for (int il = s.il0; il < s.il1; ++il) {
        nk.push_back(new_stage_cache(ctx, c, false, capacity));
        nv.push_back(new_stage_cache(ctx, c, true, capacity));
    }
    // Each layer's K/V on its layer's device (zeroed: unused cells are masked, but 0 * NaN is NaN in some kernels).
    std::vector<std::pair<ggml_tensor *, ggml_backend_t>> place;
    for (int il = s.il0; il < s.il1; ++il) {
        place.push_back({nk[il - s.il0], c.model->layer_backend(il)});
        place.push_back({nv[il - s.il0], c.model->layer_backend(il)});
    }
    std::vector<ggml_backend_buffer_t> bufs;
    try {
        bufs = alloc_on_backends(place, ("the KV cache (" + std::to_string(capacity) + " cells)").c_str());
    } catch (...) {
        ggml_free(ctx);
        throw;
    }
    if (s.n_cells > 0) {
        for (int il = s.il0; il < s.il1; ++il) {
            copy_stage_cells(c, false, c.k[il], nk[il - s.il0], s.n_cells);
            copy_stage_cells(c, true, c.v[il], nv[il - s.il0], s.n_cells);
        }
    }
    free_stage(s);
    s.ctx = ctx;
    s.bufs = bufs;
    s.capacity = capacity;
    for (int il = s.il0; il < s.il1; ++il) {
        c.k[il] = nk[il - s.il0];
        c.v[il] = nv[il - s.il0];
        c.k_bits[il] = bits_alias(ctx, c.k[il], D);
        c.v_bits[il] = c.kv.v_trans ? nullptr : bits_alias(ctx, c.v[il], D);
    }
}

static void ensure_capacity(Context & c, Stage & s, int need) {
    if (need <= s.capacity) return;
    const int grown = std::max(need, s.capacity + s.capacity / 2);
    alloc_stage(c, s, std::min(pad_to(grown, KV_PAD), pad_to(c.n_ctx, KV_PAD)));
}

static void clear_stage_state(Context & c, Stage & s) {
    s.n_cells = 0;
    s.cell_pos.clear();
    s.sorted = true;
    s.identity = true;
    s.pos_cell.assign(c.n_ctx, -1);
    s.selected.clear();
    s.revived = 0;
}

void Profile::print() const {
    static const char * names[N_PHASES] = {"host inputs (cells, mask)", "graph build", "graph alloc", "upload", "compute", "outputs"};
    double total = 0;
    for (double s : seconds) total += s;
    std::fprintf(stderr, "pylazy profile: %lld batches, %.3f s\n", (long long) batches, total);
    for (int i = 0; i < N_PHASES; ++i) std::fprintf(stderr, "  %-28s %8.3f s  %5.1f %%\n", names[i], seconds[i], total > 0 ? 100 * seconds[i] / total : 0.0);
}

Context::~Context() {
    if (profile.enabled) profile.print();
    for (int i = 0; i < 2; ++i) {
        graph_cache[i].reset();
        if (sched[i]) ggml_backend_sched_free(sched[i]);
    }
    rec.free_buffers();
    kv.free();
    for (auto & s : stages) free_stage(s);
    for (auto * b : bufs_aux) ggml_backend_buffer_free(b);
    if (ctx_aux) ggml_free(ctx_aux);
    if (buf_tpl) ggml_backend_buffer_free(buf_tpl);
    if (ctx_tpl) ggml_free(ctx_tpl);
    if (logits_host) ggml_backend_buffer_free(logits_host);
}

// -- graphs --------------------------------------------------------------------------------------

namespace {

// One stage's part of a batch, made ready on the host: the rows' cells, attention masks and, when the
// batch selects for the next stage, the selection bias. A graph runs one segment (prefill chunks,
// revival, selecting and refresh steps) or, for one-token steps that select nothing, one segment per
// stage: the token then goes through every stage in a single graph.
struct Segment {
    Batch b;
    std::vector<int64_t> cells;
    int n_kv = 0;
    int tpl_p0 = -1;                          // >= 0: the mask is Context::causal_tpl seen from this position
    std::vector<ggml_fp16_t> mask, mask_swa;  // [n_kv, n]; empty when the graph does not read it
    std::vector<float> bias;                  // [n_kv] selection bias (b.n_select > 0)
};

struct Graph {
    std::unique_ptr<ggml_context, void (*)(ggml_context *)> ctx{nullptr, ggml_free};
    ggml_cgraph * gf = nullptr;
    std::vector<Inputs> in;             // per segment
    ggml_tensor * logits = nullptr;
    ggml_tensor * selected = nullptr;   // I32 [n_select] cells chosen for the next stage
    std::vector<std::vector<ggml_tensor *>> sims;   // per segment, per layer of its stage (null: SWA layer)
    std::vector<RefreshLayer> refresh;
    ggml_tensor * gather_idx = nullptr; // sorted cells for the CUDA gather kernel (build_refresh_gather)
    ggml_tensor * best = nullptr;       // F32 [n_kv]: the stage's best refresh score per cell (picks deferred)
};

// What a cached one-token graph was built for. Inputs that change from step to step (token, position,
// cells, masks, recycled-cache rows) are uploaded into the cached graph; anything that changes a
// tensor's shape or the ops is here, and a step whose shape differs builds a new graph.
std::vector<int> graph_shape(const Context & c, const std::vector<Segment> & segs) {
    std::vector<int> shape = {c.rec.rows};
    for (const Segment & sg : segs) {
        const Batch & b = sg.b;
        shape.insert(shape.end(), {b.stage, (int) b.kind, sg.n_kv, b.n_logits, (int) b.want_sims,
                                   (int) c.rec.stage_all[b.stage], (int) sg.mask.empty(), sg.tpl_p0 >= 0});
    }
    return shape;
}

// Refresh picks wait for every stage's scores (RecycleState::pending): share > 0 with several stages.
bool defer_picks(const Context & c, const Batch & b) {
    return b.kind == StepKind::Refresh && c.rec.mode == 1 && c.rec.share > 0.0f && c.stages.size() > 1;
}

// The graph inputs of one segment. Segments after the first continue the first one's rows: they share
// its positions and take their hidden states from the previous stage inside the graph.
void make_inputs(Context & c, ggml_context * ctx0, const Segment & sg, const Inputs * first, Inputs & in) {
    const Batch & b = sg.b;
    const int n = (int) b.rows.size(), n_kv = sg.n_kv;
    if (!first) {
        in.rows = new_input(ctx0, GGML_TYPE_I32, n, 1, "rows");
        in.pos  = new_input(ctx0, GGML_TYPE_I32, n, 1, "pos");
    } else {
        in.pos = first->pos;
    }
    in.cells = new_input(ctx0, GGML_TYPE_I64, n, 1, "cells");
    if (sg.tpl_p0 >= 0) {
        ggml_tensor * t = c.causal_tpl;
        in.mask = ggml_cont(ctx0, ggml_view_2d(ctx0, t, n_kv, n, t->nb[1], (size_t) (c.tpl_shift - sg.tpl_p0) * t->nb[0]));
    } else {
        in.mask = new_input(ctx0, GGML_TYPE_F16, n_kv, n, "mask");
    }
    if (c.model->hp.n_swa > 0) in.mask_swa = new_input(ctx0, GGML_TYPE_F16, n_kv, n, "mask_swa");
    if (b.n_select > 0) in.score_bias = new_input(ctx0, GGML_TYPE_F32, n_kv, 1, "score_bias");
    in.kind = b.kind;
    in.recycle_stage = b.kind != StepKind::Full && !c.rec.stage_all[b.stage];
    if (in.recycle_stage) {
        const int Hkv = c.model->hp.n_head_kv;
        in.rec.tail_row = new_input(ctx0, GGML_TYPE_I64, 1, 1, "rec_tail_row");
        if (b.kind == StepKind::Recycled) in.rec.mask = new_input(ctx0, GGML_TYPE_F16, c.rec.rows, 1, "rec_mask");
        if (b.kind == StepKind::Refresh && c.rec.mode == 1) in.rec.bias = new_input(ctx0, GGML_TYPE_F32, n_kv, 1, "rec_bias");
        if (b.kind == StepKind::Refresh && c.rec.mode == 2) in.rec.host_idx = new_input(ctx0, GGML_TYPE_I32, c.rec.k, Hkv, "rec_idx");
    }
}

// The hidden states entering the first segment: token embeddings (stage 0) or aux rows (revival).
ggml_tensor * build_input_rows(ggml_context * ctx0, Context & c, const Batch & b, Inputs & in) {
    ggml_tensor * x;
    if (b.stage == 0 && (int) b.rows.size() <= HOST_EMBD_MAX) {
        x = in.embd = new_input(ctx0, GGML_TYPE_F32, c.model->hp.n_embd, (int64_t) b.rows.size(), "embd");
    } else {
        x = ggml_get_rows(ctx0, b.stage == 0 ? c.model->tok_embd : c.aux[b.stage], in.rows);
    }
    // gemma3 scales embeddings by sqrt(n_embd); aux rows (later stages) are hidden states, already scaled.
    if (b.stage == 0 && c.model->hp.embd_scale != 1.0f) x = ggml_scale(ctx0, x, c.model->hp.embd_scale);
    return x;
}

void build_graph(Context & c, const std::vector<Segment> & segs, Graph & g) {
    const StepKind kind = segs[0].b.kind;
    std::vector<uint8_t> & meta = kind == StepKind::Refresh ? c.graph_meta_refresh : c.graph_meta;
    ggml_init_params ip = { meta.size(), meta.data(), true };
    g.ctx.reset(ggml_init(ip));
    ggml_context * ctx0 = g.ctx.get();
    g.gf = ggml_new_graph_custom(ctx0, c.graph_size, false);
    g.in.resize(segs.size());
    g.sims.resize(segs.size());
    ggml_tensor * x = nullptr, * scores = nullptr;
    for (size_t i = 0; i < segs.size(); ++i) {
        const Batch & b = segs[i].b;
        const Stage & st = c.stages[b.stage];
        const bool last_stage = b.stage + 1 == (int) c.stages.size();
        Inputs & in = g.in[i];
        make_inputs(c, ctx0, segs[i], i == 0 ? nullptr : &g.in[0], in);
        if (b.want_sims && in.recycle_stage && b.kind == StepKind::Recycled) in.sims = &g.sims[i];
        in.refresh = &g.refresh;
        if (i == 0) x = build_input_rows(ctx0, c, b, in);
        for (int il = st.il0; il < st.il1; ++il) {
            const bool pruning_layer = b.n_select > 0 && il == st.il1 - 1;
            const int n_out = last_stage && il == st.il1 - 1 && b.n_logits > 0 ? b.n_logits : (int) b.rows.size();
            x = build_layer(ctx0, g.gf, c, il, x, in, segs[i].n_kv, pruning_layer ? &scores : nullptr, n_out);
        }
        if (!last_stage) {
            // Every row's hidden state at the boundary: kept rows go on from here, pruned ones are revived from here.
            ggml_build_forward_expand(g.gf, ggml_set_rows(ctx0, c.aux[b.stage + 1], x, in.pos));
        }
        if (last_stage && b.n_logits > 0) {
            g.logits = build_logits(ctx0, *c.model, x);
            ggml_set_output(g.logits);
            ggml_build_forward_expand(g.gf, g.logits);
        }
    }
    const Batch & b0 = segs[0].b;
    if (defer_picks(c, b0) && !g.refresh.empty()) {
        g.best = build_refresh_best(ctx0, c, g.refresh);
        ggml_set_output(g.best);
        ggml_build_forward_expand(g.gf, g.best);
    } else {
        g.gather_idx = build_refresh_gather(ctx0, g.gf, c, g.refresh, g.in[0].rec);
    }
    for (const auto & seg_sims : g.sims) {
        for (ggml_tensor * t : seg_sims) {
            if (!t) continue;   // a sliding-window layer: no similarity
            ggml_set_output(t);
            ggml_build_forward_expand(g.gf, t);
        }
    }
    if (scores) {
        g.selected = ggml_top_k(ctx0, scores, segs.back().b.n_select);
        ggml_set_output(g.selected);
        ggml_build_forward_expand(g.gf, g.selected);
    }
}
// Host-side inputs of a Refresh or Recycled step (one fresh row: the last of the batch).
// Refresh candidates (0) and the rest (FORCE_OUT) from the fresh row's mask: what it sees, except its own
// cell (it is the first tail row).
std::vector<float> refresh_bias(const ggml_fp16_t * last, int n_kv, int own_cell) {
    const ggml_fp16_t zero = ggml_fp32_to_fp16(0.0f);
    std::vector<float> bias(n_kv, FORCE_OUT);
    for (int j = 0; j < n_kv; ++j) if (last[j] == zero && j != own_cell) bias[j] = 0.0f;
    return bias;
}

void set_recycle_inputs(Context & c, const Batch & b, const RecycleInputs & in, const std::vector<ggml_fp16_t> & mask,
                        int n_kv, int own_cell) {
    RecycleState & r = c.rec;
    const Stage & st = c.stages[b.stage];
    const int n = (int) b.rows.size();
    const ggml_fp16_t zero = ggml_fp32_to_fp16(0.0f), ninf = ggml_fp32_to_fp16(-INFINITY);
    const int64_t tail_row = b.kind == StepKind::Refresh ? r.k : r.k + r.n_tail;
    set_input(in.tail_row, &tail_row, sizeof(int64_t));
    if (in.mask) {
        std::vector<ggml_fp16_t> m(r.rows, ninf);
        for (int i = 0; i < r.k + r.n_tail + 1; ++i) m[i] = zero;
        set_input(in.mask, m.data(), sizeof(ggml_fp16_t) * m.size());
    }
    const ggml_fp16_t * last = mask.data() + (size_t) (n - 1) * n_kv;
    if (in.bias) {
        std::vector<float> bias = refresh_bias(last, n_kv, own_cell);
        set_input(in.bias, bias.data(), sizeof(float) * bias.size());
    }
    if (in.host_idx) {
        std::vector<std::pair<int32_t, int32_t>> cand;  // (position, cell)
        for (int j = 0; j < st.n_cells; ++j) if (last[j] == zero && j != own_cell) cand.push_back({st.cell_pos[j], j});
        std::sort(cand.begin(), cand.end());
        std::vector<int32_t> keep;
        for (int i = 0; i < r.sinks; ++i) keep.push_back(cand[i].second);
        for (size_t i = cand.size() - (r.k - r.sinks); i < cand.size(); ++i) keep.push_back(cand[i].second);
        std::vector<int32_t> idx;
        for (int h = 0; h < c.model->hp.n_head_kv; ++h) idx.insert(idx.end(), keep.begin(), keep.end());
        set_input(in.host_idx, idx.data(), sizeof(int32_t) * idx.size());
    }
}

// PYLAZY_PROFILE=1: wall time of each phase of run_batch, summed and printed when the context is freed,
// to see what the host adds around the backend's compute (graph building, allocation, the mask).
struct PhaseClock {
    Profile * prof;
    std::chrono::steady_clock::time_point t = std::chrono::steady_clock::now();
    void lap(int phase) {
        if (!prof) return;
        const auto now = std::chrono::steady_clock::now();
        prof->seconds[phase] += std::chrono::duration<double>(now - t).count();
        t = now;
    }
};

// The attention mask of a batch [n_kv, n]: 0 where row i attends to cell j, -inf elsewhere. A row
// sees cells at or before its position that `visible` allows; window > 0 also hides cells with
// pos_row - pos_cell >= window (llama.cpp's LLAMA_SWA_TYPE_STANDARD rule), 0 means no window.
template <typename Visible>
std::vector<ggml_fp16_t> build_mask(const Stage & st, const Batch & b, Visible visible, int n_kv, int window) {
    const int n = (int) b.rows.size();
    const ggml_fp16_t zero = ggml_fp32_to_fp16(0.0f), ninf = ggml_fp32_to_fp16(-INFINITY);
    std::vector<ggml_fp16_t> mask((size_t) n_kv * n, ninf);
    auto in_window = [&](int32_t row_pos, int32_t cell_pos) { return window <= 0 || row_pos - cell_pos < window; };
    if (b.attend_all && st.sorted) {
        // Causal over position-ordered cells: row i sees a contiguous run of them (the prefill hot path).
        for (int i = 0; i < n; ++i) {
            const auto first = window > 0 ? std::upper_bound(st.cell_pos.begin(), st.cell_pos.end(), b.pos[i] - window)
                                          : st.cell_pos.begin();
            const auto last = std::upper_bound(st.cell_pos.begin(), st.cell_pos.end(), b.pos[i]);
            std::fill(mask.begin() + (size_t) i * n_kv + (first - st.cell_pos.begin()),
                      mask.begin() + (size_t) i * n_kv + (last - st.cell_pos.begin()), zero);
        }
        return mask;
    }
    for (int i = 0; i < n; ++i) {
        for (int j = 0; j < st.n_cells; ++j) {
            const int32_t p = st.cell_pos[j];
            if (p <= b.pos[i] && in_window(b.pos[i], p) && visible(i, p)) mask[(size_t) i * n_kv + j] = zero;
        }
    }
    return mask;
}

bool stage_has_swa(const Model & m, const Stage & st) {
    for (int il = st.il0; il < st.il1; ++il) if (m.hp.is_swa(il)) return true;
    return false;
}

// The refresh copies of a graph built for the CUDA gather kernel (the graph has synchronized).
void run_cuda_gather(Context & c, const std::vector<RefreshLayer> & layers, const ggml_tensor * sorted, int own_cell) {
#ifdef PLZ_CUDA_GATHER
    const RecycleState & r = c.rec;
    std::vector<plz_gather_layer> ptrs;
    for (const auto & l : layers) ptrs.push_back({c.k[l.il]->data, c.v[l.il]->data, r.rk[l.il]->data, r.rv[l.il]->data});
    const Hparams & hp = c.model->hp;
    if (!plz_cuda_gather(ptrs.data(), (int) ptrs.size(), (const int32_t *) sorted->data, sorted->nb[1] / sizeof(int32_t),
                         r.rows, hp.n_head_kv, hp.head_dim * (int) sizeof(ggml_fp16_t), c.k[layers[0].il]->nb[1], r.k, own_cell)) {
        throw Error(PLZ_ERR_RUNTIME, "the CUDA refresh gather failed");
    }
#else
    GGML_UNUSED(c); GGML_UNUSED(layers); GGML_UNUSED(sorted); GGML_UNUSED(own_cell);
    throw Error(PLZ_ERR_RUNTIME, "internal: CUDA gather requested in a build without it");
#endif
}

// Logits to the caller: through the pinned staging buffer when there is one (a DMA copy, then a host
// memcpy, is faster than a device-to-pageable copy for the one-row logits of a decode step). Large
// reads (every row of a prompt) go straight to the caller: pinning that much memory is no gain.
void read_logits(Context & c, ggml_tensor * logits, float * out, size_t bytes) {
    const bool staged = c.host_buft && bytes <= (size_t(4) << 20);
    if (staged && (!c.logits_host || ggml_backend_buffer_get_size(c.logits_host) < bytes)) {
        if (c.logits_host) ggml_backend_buffer_free(c.logits_host);
        c.logits_host = ggml_backend_buft_alloc_buffer(c.host_buft, bytes);
    }
    if (!staged || !c.logits_host) {
        ggml_backend_tensor_get(logits, out, 0, bytes);
        return;
    }
    void * staging = ggml_backend_buffer_get_base(c.logits_host);
    ggml_backend_tensor_get(logits, staging, 0, bytes);
    std::memcpy(out, staging, bytes);
}

// Assigns the batch's cells in its stage and builds its masks (0 where a row attends to a cell) from
// `visible(row, cell_pos)`, and the selection bias when it selects for the next stage.
template <typename Visible>
Segment prepare_segment(Context & c, const Batch & b, Visible visible) {
    Segment sg;
    sg.b = b;
    Stage & st = c.stages[b.stage];
    const int n = (int) b.rows.size();
    ensure_capacity(c, st, st.n_cells + n);
    sg.cells.resize(n);
    for (int i = 0; i < n; ++i) {
        if (st.pos_cell[b.pos[i]] >= 0) throw Error(PLZ_ERR_RUNTIME, "internal: token computed twice at a layer");
        if (!st.cell_pos.empty() && b.pos[i] < st.cell_pos.back()) st.sorted = false;
        if (b.pos[i] != st.n_cells + i) st.identity = false;
        sg.cells[i] = st.n_cells + i;
        st.pos_cell[b.pos[i]] = st.n_cells + i;
        st.cell_pos.push_back(b.pos[i]);
    }
    st.n_cells += n;
    const int n_kv = sg.n_kv = std::min(pad_to(st.n_cells, KV_PAD), st.capacity);

    const ggml_fp16_t zero = ggml_fp32_to_fp16(0.0f);
    // A recycled step attends to the recycled cache only: the stage mask would go unused, except in
    // sliding-window layers, which attend over the stage cache at every step (see build_layer).
    const bool stage_mask = !(b.kind == StepKind::Recycled && !c.rec.stage_all[b.stage]);
    // Big causal batches over position-ordered cells (every stage of a prefill, lazy stages included) take
    // their mask from the GPU template: the rows are the stage's last cells, so row i sees cells up to its
    // own, cells[0] + i. Measured on the H200 before this held for lazy stages: a lazy 128K prefill built
    // and uploaded an [n_kv, 512] host mask per ubatch of every later stage, 23.2 s against 29.2 s full.
    if (c.causal_tpl && n > HOST_EMBD_MAX && b.attend_all && st.sorted && c.model->hp.n_swa == 0 &&
        b.kind == StepKind::Full && n <= c.n_ubatch) {
        sg.tpl_p0 = (int) sg.cells[0];
    }
    if (stage_mask && sg.tpl_p0 < 0) sg.mask = build_mask(st, b, visible, n_kv, 0);
    if (stage_has_swa(*c.model, st)) sg.mask_swa = build_mask(st, b, visible, n_kv, c.model->hp.n_swa);
    if (b.n_select > 0) {
        sg.bias.assign(n_kv, FORCE_OUT);
        for (int j = 0; j < n_kv; ++j) {
            // The last row's view: from the template rule (cells are positions) or the host mask.
            const bool seen = sg.tpl_p0 >= 0 ? j <= sg.cells[n - 1] : sg.mask[(size_t) (n - 1) * n_kv + j] == zero;
            if (seen) sg.bias[j] = 0.0f;
        }
        sg.bias[sg.cells[n - 1]] = FORCE_IN;
    }
    return sg;
}

// Same dequantization as get_rows on the CPU backend (the type's to_float), so logits do not change.
void set_host_embeddings(Context & c, ggml_tensor * embd, const std::vector<int32_t> & tokens) {
    const ggml_tensor * te = c.model->tok_embd;
    const auto * traits = ggml_get_type_traits(te->type);
    const int n_embd = c.model->hp.n_embd;
    std::vector<float> rows((size_t) n_embd * tokens.size());
    for (size_t i = 0; i < tokens.size(); ++i) {
        const char * row = (const char *) te->data + (size_t) tokens[i] * te->nb[1];
        float * out = rows.data() + i * n_embd;
        if (te->type == GGML_TYPE_F32) std::memcpy(out, row, sizeof(float) * n_embd);
        else if (traits->to_float) traits->to_float(row, out, n_embd);
        else throw Error(PLZ_ERR_RUNTIME, std::string("token_embd type ") + ggml_type_name(te->type) + " cannot be dequantized");
    }
    set_input(embd, rows.data(), sizeof(float) * rows.size());
}

void set_segment_inputs(Context & c, const Segment & sg, const Inputs & in, bool first) {
    const Batch & b = sg.b;
    const int n = (int) b.rows.size();
    if (first) {
        set_input(in.rows, b.rows.data(), sizeof(int32_t) * n);
        if (in.embd) set_host_embeddings(c, in.embd, b.rows);
        set_input(in.pos, b.pos.data(), sizeof(int32_t) * n);
    }
    set_input(in.cells, sg.cells.data(), sizeof(int64_t) * n);
    if (!sg.mask.empty()) set_input(in.mask, sg.mask.data(), sizeof(ggml_fp16_t) * sg.mask.size());
    set_input(in.mask_swa, sg.mask_swa.data(), sizeof(ggml_fp16_t) * sg.mask_swa.size());
    set_input(in.score_bias, sg.bias.data(), sizeof(float) * sg.bias.size());
    if (in.recycle_stage) set_recycle_inputs(c, b, in.rec, sg.mask, sg.n_kv, (int) sg.cells[n - 1]);
}

// A stage's refresh scores, kept until every stage has scored (RecycleState::pending).
void keep_pending_pick(Context & c, const Segment & sg, const Graph & g) {
    const int n = (int) sg.b.rows.size(), n_kv = sg.n_kv;
    RecycleState::PendingPick pk;
    pk.stage = sg.b.stage;
    pk.n_kv = n_kv;
    pk.own_cell = (int) sg.cells[n - 1];
    for (const auto & l : g.refresh) pk.layers.push_back(l.il);
    pk.kq_scale = g.refresh[0].kq_scale;
    const ggml_fp16_t * last = sg.mask.data() + (size_t) (n - 1) * n_kv;
    pk.mask_row.assign(last, last + n_kv);
    pk.best.resize(n_kv);
    ggml_backend_tensor_get(g.best, pk.best.data(), 0, sizeof(float) * n_kv);
    c.rec.pending.push_back(std::move(pk));
}

// Runs prepared segments as one graph (reusing the cached one-token graph of the same shape) and reads
// its outputs: logits, the cells selected for the next stage, query similarities, refresh scores.
BatchResult run_segments(Context & c, const std::vector<Segment> & segs, float * logits_out) {
    PhaseClock clock{c.profile.enabled ? &c.profile : nullptr};
    if (clock.prof) ++c.profile.batches;
    const Segment & last = segs.back();
    bool reusable = c.graph_reuse && segs[0].b.rows.size() == 1;
    for (const Segment & sg : segs) reusable = reusable && sg.b.n_select == 0;
    std::vector<int> shape;
    if (reusable) shape = graph_shape(c, segs);
    const int slot = segs[0].b.kind == StepKind::Refresh ? 1 : 0;
    ggml_backend_sched_t sched = c.sched[slot];
    std::shared_ptr<Graph> gp;
    clock.lap(Profile::HOST_INPUTS);
    if (reusable && c.graph_cache[slot] && shape == c.graph_key[slot]) {
        gp = std::static_pointer_cast<Graph>(c.graph_cache[slot]);
    } else {
        drop_graph_slot(c, slot);
        ggml_backend_sched_reset(sched);
        gp = std::make_shared<Graph>();
        build_graph(c, segs, *gp);
        clock.lap(Profile::BUILD);
        if (!ggml_backend_sched_alloc_graph(sched, gp->gf)) throw Error(PLZ_ERR_RUNTIME, "cannot allocate the compute graph");
        clock.lap(Profile::ALLOC);
        if (reusable) {
            c.graph_cache[slot] = gp;
            c.graph_key[slot] = shape;
        }
    }
    Graph & g = *gp;
    for (size_t i = 0; i < segs.size(); ++i) set_segment_inputs(c, segs[i], g.in[i], i == 0);
    clock.lap(Profile::UPLOAD);
    op_report_note(g.gf);
    check_status(ggml_backend_sched_graph_compute(sched, g.gf), "graph compute");
    if (g.gather_idx) run_cuda_gather(c, g.refresh, g.gather_idx, (int) segs[0].cells.back());
    clock.lap(Profile::COMPUTE);

    BatchResult r;
    for (size_t i = 0; i < segs.size(); ++i) {
        const int il0 = c.stages[segs[i].b.stage].il0;
        for (size_t j = 0; j < g.sims[i].size(); ++j) {
            float v = NAN;
            if (g.sims[i][j]) ggml_backend_tensor_get(g.sims[i][j], &v, 0, sizeof(float));
            r.sims.push_back({il0 + (int) j, v});
        }
    }
    if (g.best) keep_pending_pick(c, segs[0], g);
    if (g.selected) {
        r.selected_cells.resize(last.b.n_select);
        ggml_backend_tensor_get(g.selected, r.selected_cells.data(), 0, sizeof(int32_t) * last.b.n_select);
    }
    if (g.logits) read_logits(c, g.logits, logits_out, sizeof(float) * (size_t) last.b.n_logits * c.model->hp.n_vocab);
    clock.lap(Profile::OUTPUTS);
    return r;
}

template <typename Visible>
BatchResult run_batch(Context & c, const Batch & b, Visible visible, float * logits_out) {
    return run_segments(c, {prepare_segment(c, b, visible)}, logits_out);
}

std::vector<int32_t> cells_to_sorted_positions(const Stage & st, const std::vector<int32_t> & cells) {
    std::vector<int32_t> pos;
    pos.reserve(cells.size());
    for (int32_t cell : cells) pos.push_back(st.cell_pos[cell]);
    std::sort(pos.begin(), pos.end());
    return pos;
}

// Stage-major prefill of the whole prompt with pruning between stages.
void prefill_lazy(Context & c, const int32_t * tokens, int n, float * logits_out) {
    std::vector<int32_t> alive(n);
    for (int i = 0; i < n; ++i) alive[i] = i;
    const int S = (int) c.stages.size();
    // A later stage holds what this prompt keeps there plus room for the answer (grown when decoding or
    // revival needs more), so the KV memory after a lazy prefill follows the pruning.
    for (int s = 1; s < S; ++s) {
        const int want = std::min(pad_to(keep_count(c.stages[s].keep, n) + KV_PAD, KV_PAD), pad_to(c.n_ctx, KV_PAD));
        if (c.stages[s].capacity != want) alloc_stage(c, c.stages[s], want);
    }
    for (int s = 0; s < S; ++s) {
        const int n_alive = (int) alive.size();
        std::vector<int32_t> next;
        // The selection reads the last chunk's last lazy_window rows: a chunk that would leave a shorter
        // last one ends early, so the last holds the whole window (with window 1, chunks are n_ubatch).
        const int window = std::min(c.lazy_window, c.n_ubatch);
        for (int off = 0, nc = 0; off < n_alive; off += nc) {
            nc = std::min(c.n_ubatch, n_alive - off);
            const int rest = n_alive - off - nc;
            if (rest > 0 && rest < window) nc -= window - rest;
            const bool last_chunk = off + nc == n_alive;
            Batch b;
            b.stage = s;
            b.attend_all = true;
            b.pos.assign(alive.begin() + off, alive.begin() + off + nc);
            b.rows = s == 0 ? std::vector<int32_t>(tokens + off, tokens + off + nc) : b.pos;
            if (last_chunk && s + 1 < S) b.n_select = std::min(keep_count(c.stages[s + 1].keep, n), c.stages[s].n_cells + nc);
            if (last_chunk && s + 1 == S) b.n_logits = 1;
            BatchResult r = run_batch(c, b, [](int, int) { return true; }, logits_out);
            if (b.n_select > 0) next = cells_to_sorted_positions(c.stages[s], r.selected_cells);
        }
        if (s + 1 < S) {
            c.stages[s + 1].selected = next;
            alive = next;
        }
    }
    c.select_pos = n;
}

// The deferred refresh picks (RecycleState::pending): a token's best score over every stage's layers,
// then per stage one graph that recomputes the stage's scores from the queries the refresh stored
// (rq) and its cache, adds share x that best score and gathers as build_refresh_gather does. The
// scores are the same ops on the same values as in the stage's refresh graph, so with one stage's
// worth of layers this equals the single-graph refresh bit for bit.
void refresh_picks(Context & c) {
    RecycleState & r = c.rec;
    const Hparams & hp = c.model->hp;
    const int D = hp.head_dim, H = hp.n_head, Hkv = hp.n_head_kv;
    std::vector<float> best_pos(c.n_past + 1, -INFINITY);   // by position, over every stage
    for (const auto & pk : r.pending) {
        const Stage & st = c.stages[pk.stage];
        for (int j = 0; j < std::min(pk.n_kv, st.n_cells); ++j) {
            best_pos[st.cell_pos[j]] = std::max(best_pos[st.cell_pos[j]], pk.best[j]);
        }
    }
    ggml_backend_sched_t sched = c.sched[1];
    for (const auto & pk : r.pending) {
        const Stage & st = c.stages[pk.stage];
        std::vector<float> best = pk.best;   // padding cells keep the stage's own value (never candidates)
        for (int j = 0; j < std::min(pk.n_kv, st.n_cells); ++j) best[j] = best_pos[st.cell_pos[j]];

        drop_graph_slot(c, 1);
        ggml_backend_sched_reset(sched);
        ggml_init_params ip = { c.graph_meta_refresh.size(), c.graph_meta_refresh.data(), true };
        std::unique_ptr<ggml_context, void (*)(ggml_context *)> ctx{ggml_init(ip), ggml_free};
        ggml_context * ctx0 = ctx.get();
        ggml_cgraph * gf = ggml_new_graph_custom(ctx0, c.graph_size, false);
        ggml_tensor * mask = new_input(ctx0, GGML_TYPE_F16, pk.n_kv, 1, "pick_mask");
        RecycleInputs in;
        in.bias = new_input(ctx0, GGML_TYPE_F32, pk.n_kv, 1, "pick_bias");
        in.best = new_input(ctx0, GGML_TYPE_F32, pk.n_kv, 1, "pick_best");
        in.tail_row = new_input(ctx0, GGML_TYPE_I64, 1, 1, "pick_tail_row");
        std::vector<RefreshLayer> layers;
        for (int il : pk.layers) {
            ggml_tensor * kc = cache_rows(ctx0, c.k[il], D, Hkv, 0, pk.n_kv);
            ggml_tensor * logits = ggml_mul_mat(ctx0, kc, ggml_reshape_3d(ctx0, r.rq[il], D, H / Hkv, Hkv));
            // The refresh token's K/V are copied from its cell (the refresh graph wrote them there).
            RefreshLayer l{il, kc, v_stage_rows(ctx0, c, c.v[il], 0, pk.n_kv), logits, nullptr, nullptr, mask, pk.kq_scale};
            l.src_cell = pk.own_cell;
            layers.push_back(l);
        }
        ggml_tensor * sorted = build_refresh_gather(ctx0, gf, c, layers, in);
        if (!ggml_backend_sched_alloc_graph(sched, gf)) throw Error(PLZ_ERR_RUNTIME, "cannot allocate the refresh picks graph");
        const int64_t tail_row = r.k;
        set_input(mask, pk.mask_row.data(), sizeof(ggml_fp16_t) * pk.n_kv);
        const std::vector<float> bias = refresh_bias(pk.mask_row.data(), pk.n_kv, pk.own_cell);
        set_input(in.bias, bias.data(), sizeof(float) * pk.n_kv);
        set_input(in.best, best.data(), sizeof(float) * pk.n_kv);
        set_input(in.tail_row, &tail_row, sizeof(int64_t));
        op_report_note(gf);
        check_status(ggml_backend_sched_graph_compute(sched, gf), "refresh picks");
        if (sorted) run_cuda_gather(c, layers, sorted, pk.own_cell);
    }
    r.pending.clear();
}

// What a fresh row of stage s > 0 attends to, by position: the tokens selected into the stage and every
// token from `fresh_from` on (the rows of this step, and those decoded since the selection was made).
std::vector<char> attended_positions(const Stage & st, int n_total) {
    std::vector<char> in_attend(n_total, 0);
    for (int32_t p : st.selected) in_attend[p] = 1;
    return in_attend;
}

void put_sims(const Context & c, const Stage & st, const BatchResult & r, float * sims) {
    if (!sims) return;
    for (int il = st.il0; il < st.il1; ++il) sims[il] = NAN;  // stage that attends fully: no check
    for (const auto & [il, v] : r.sims) sims[il] = v;
}

// A step that selects nothing (one-token decode between selections, or no lazy stages): the rows go
// through every stage in one graph, each stage attending as the last selection said. Decode after a lazy
// prefill thus costs one graph per token, reused from step to step, like full attention; the selection
// and its revivals happen only at the steps the caller marks (step_with_selection).
void step_through_stages(Context & c, const int32_t * tokens, int n, bool all_logits, float * logits_out,
                         StepKind kind, float * sims) {
    const int S = (int) c.stages.size();
    const int p0 = c.n_past, n_total = p0 + n;
    std::vector<Segment> segs;
    std::vector<std::vector<char>> in_attend(S);
    for (int s = 0; s < S; ++s) {
        Batch b;
        b.stage = s;
        b.attend_all = s == 0;
        b.kind = kind;
        b.want_sims = sims != nullptr;
        for (int i = 0; i < n; ++i) b.pos.push_back(p0 + i);
        b.rows = s == 0 ? std::vector<int32_t>(tokens, tokens + n) : b.pos;
        if (s + 1 == S) b.n_logits = all_logits ? n : 1;
        if (s > 0) in_attend[s] = attended_positions(c.stages[s], n_total);
        const std::vector<char> & seen = in_attend[s];
        const int fresh_from = c.select_pos;
        segs.push_back(prepare_segment(c, b, [&](int, int cell_pos) {
            return s == 0 || cell_pos >= fresh_from || seen[cell_pos] != 0;
        }));
    }
    const BatchResult r = run_segments(c, segs, logits_out);
    for (const Stage & st : c.stages) put_sims(c, st, r, sims);
}

// A step stage by stage (the LazyLLM step): in stage s > 0 the tokens selected at the previous boundary
// that were never computed there are revived first (from aux[s], attending causally to the stage's
// cells); fresh rows then attend only to the selected set and to each other; the last fresh row selects
// the next stage's set. With select false (a refresh of recycled attention between selections) nothing
// is selected or revived and stages attend as the last selection said; refresh steps still run stage by
// stage, since each stage scores its own cells.
void step_with_selection(Context & c, const int32_t * tokens, int n, bool all_logits, float * logits_out,
                         StepKind kind, bool select, float * sims) {
    const int S = (int) c.stages.size();
    const int p0 = c.n_past, n_total = p0 + n;
    const int fresh_from = select ? p0 : c.select_pos;
    c.rec.pending.clear();
    for (int s = 0; s < S; ++s) {
        Stage & st = c.stages[s];
        Batch b;
        b.stage = s;
        b.attend_all = s == 0;
        b.kind = kind;
        b.want_sims = sims != nullptr;
        int n_revive = 0;
        for (int32_t p : s > 0 && select ? st.selected : std::vector<int32_t>{}) {
            if (p < p0 && st.pos_cell[p] < 0) {
                b.pos.push_back(p);
                ++n_revive;
            }
        }
        const std::vector<char> in_attend = s > 0 ? attended_positions(st, n_total) : std::vector<char>{};
        for (int i = 0; i < n; ++i) b.pos.push_back(p0 + i);
        b.rows = s == 0 ? std::vector<int32_t>(tokens, tokens + n) : b.pos;
        // What the last fresh row sees besides the fresh rows: earlier cells (stage 0), or the selected set
        // and the tokens since the selection.
        const int n_seen = s == 0 ? st.n_cells : (int) st.selected.size() + (p0 - fresh_from);
        if (kind == StepKind::Refresh) c.rec.stage_all[s] = n_seen <= c.rec.k;
        if (s + 1 < S) {
            if (select) b.n_select = std::min(keep_count(c.stages[s + 1].keep, n_total), n_seen + n);
        } else {
            b.n_logits = all_logits ? n : 1;
        }
        auto visible = [&](int row, int cell_pos) {
            if (s == 0 || row < n_revive) return true;   // causal over the whole stage
            return cell_pos >= fresh_from || in_attend[cell_pos] != 0;
        };
        BatchResult r = run_batch(c, b, visible, logits_out);
        st.revived += n_revive;
        put_sims(c, st, r, sims);
        if (s + 1 < S && select) {
            std::vector<int32_t> sel = cells_to_sorted_positions(st, r.selected_cells);
            // Fresh tokens always go on; the selection decides among the older ones.
            sel.erase(std::remove_if(sel.begin(), sel.end(), [&](int32_t p) { return p >= p0; }), sel.end());
            c.stages[s + 1].selected = sel;
        }
    }
    if (select) c.select_pos = p0;
    if (!c.rec.pending.empty()) refresh_picks(c);
}

// Tokens after the prompt. `select` (lazy stages only): the step re-selects at every boundary and
// revives what it selects (eval() of tokens after a lazy prefill always does; decode() when asked).
// Otherwise the stages keep the last selection and the step runs as one graph, except refreshes of
// recycled attention. A Recycled step never selects.
void step(Context & c, const int32_t * tokens, int n, bool all_logits, float * logits_out,
          StepKind kind = StepKind::Full, bool select = true, float * sims = nullptr) {
    select = select && kind != StepKind::Recycled && c.stages.size() > 1;
    if (select || kind == StepKind::Refresh) {
        step_with_selection(c, tokens, n, all_logits, logits_out, kind, select, sims);
    } else {
        step_through_stages(c, tokens, n, all_logits, logits_out, kind, sims);
    }
}

}  // namespace

// -- public --------------------------------------------------------------------------------------

static void configure_stages(Context & c, const std::vector<int> & layers, const std::vector<float> & keep) {
    drop_graph_cache(c);
    const Hparams & hp = c.model->hp;
    for (auto & s : c.stages) free_stage(s);
    c.stages.clear();
    c.k.assign(hp.n_layer, nullptr);
    c.k_bits.assign(hp.n_layer, nullptr);
    c.v_bits.assign(hp.n_layer, nullptr);
    c.v.assign(hp.n_layer, nullptr);
    int il0 = 0;
    for (size_t i = 0; i <= layers.size(); ++i) {
        Stage s;
        s.il0 = il0;
        s.il1 = i < layers.size() ? layers[i] + 1 : hp.n_layer;
        s.keep = i == 0 ? 1.0f : keep[i - 1];
        il0 = s.il1;
        c.stages.push_back(std::move(s));
    }
    for (auto & s : c.stages) {
        // Stage 0 holds every token; a later stage is sized by each lazy prefill (prefill_lazy).
        clear_stage_state(c, s);
        alloc_stage(c, s, &s == &c.stages[0] ? pad_to(c.n_ctx, KV_PAD) : std::min(KV_PAD, pad_to(c.n_ctx, KV_PAD)));
    }
    for (auto * b : c.bufs_aux) ggml_backend_buffer_free(b);
    if (c.ctx_aux) ggml_free(c.ctx_aux);
    c.bufs_aux.clear();
    c.ctx_aux = nullptr;
    c.aux.assign(c.stages.size(), nullptr);
    if (c.stages.size() > 1) {
        ggml_init_params ip = { ggml_tensor_overhead() * (c.stages.size() + 1), nullptr, true };
        c.ctx_aux = ggml_init(ip);
        // aux[s] is read (revival) by stage s's first layer: on its device.
        std::vector<std::pair<ggml_tensor *, ggml_backend_t>> place;
        for (size_t s = 1; s < c.stages.size(); ++s) {
            c.aux[s] = ggml_new_tensor_2d(c.ctx_aux, GGML_TYPE_F32, hp.n_embd, c.n_ctx);
            place.push_back({c.aux[s], c.model->layer_backend(c.stages[s].il0)});
        }
        c.bufs_aux = alloc_on_backends(place, "the aux cache");
    }
}

static void make_causal_template(Context & c) {
    c.tpl_shift = pad_to(c.n_ctx, KV_PAD);
    const int64_t W = c.tpl_shift + c.n_ubatch + KV_PAD, R = c.n_ubatch;
    ggml_init_params ip = { ggml_tensor_overhead() * 2, nullptr, true };
    c.ctx_tpl = ggml_init(ip);
    c.causal_tpl = ggml_new_tensor_2d(c.ctx_tpl, GGML_TYPE_F16, W, R);
    c.buf_tpl = ggml_backend_alloc_ctx_tensors_from_buft(c.ctx_tpl, ggml_backend_get_default_buffer_type(c.model->output_backend()));
    if (!c.buf_tpl) throw Error(PLZ_ERR_RUNTIME, "out of memory allocating the causal mask template");
    const ggml_fp16_t zero = ggml_fp32_to_fp16(0.0f), ninf = ggml_fp32_to_fp16(-INFINITY);
    std::vector<ggml_fp16_t> row(W);
    for (int64_t i = 0; i < R; ++i) {
        for (int64_t j = 0; j < W; ++j) row[j] = j <= c.tpl_shift + i ? zero : ninf;
        ggml_backend_tensor_set(c.causal_tpl, row.data(), (size_t) i * c.causal_tpl->nb[1], sizeof(ggml_fp16_t) * W);
    }
}

Context * new_context(Model * model, int n_ctx, int n_ubatch, int n_threads, bool flash, int type_k, int type_v) {
    const Hparams & hp = model->hp;
    std::unique_ptr<Context> c(new Context());
    c->model = model;
    c->n_ctx = n_ctx;
    c->n_ubatch = n_ubatch;
    c->n_threads = n_threads;
    // Environment switches: PYLAZY_<name>=value.
    auto env_is = [](const char * name, const char * value) {
        const char * v = std::getenv(name);
        return v && std::strcmp(v, value) == 0;
    };
    const char * prof = std::getenv("PYLAZY_PROFILE");
    c->profile.enabled = prof && *prof && std::strcmp(prof, "0") != 0;
    const bool per_op = env_is("PYLAZY_PROFILE", "ops");
    configure_kv_format(*c, flash, type_k, type_v);
#ifdef PLZ_CUDA_GATHER
    // The kernel copies F16 rows per KV head: the flash-attention layout with F16 caches only.
    // It reads raw device pointers of every layer: only when one CUDA device holds them all.
    c->cuda_gather = model->backend_gpu && model->single_backend() == model->backend_gpu &&
                     std::strncmp(ggml_backend_name(model->backend_gpu), "CUDA", 4) == 0 &&
                     !env_is("PYLAZY_CUDA_GATHER", "0") && !c->kv.v_trans &&
                     c->kv.type_k == GGML_TYPE_F16 && c->kv.type_v == GGML_TYPE_F16;
#endif
    c->graph_reuse = !env_is("PYLAZY_GRAPH_REUSE", "0");
    configure_stages(*c, {}, {});
    c->rec.stage_all.assign(c->stages.size(), 0);

    c->graph_size = std::max(4096, hp.n_layer * 256);  // a refresh step adds ~100 nodes per layer
    c->graph_meta.resize(ggml_tensor_overhead() * c->graph_size + ggml_graph_overhead_custom(c->graph_size, false));
    c->graph_meta_refresh.resize(c->graph_meta.size());
    std::vector<ggml_backend_t> backends;
    std::vector<ggml_backend_buffer_type_t> bufts;
    // One scheduler over every device holding layers (CPU last, as ggml wants): ops run where their
    // weights are, and the hidden state crosses devices through the scheduler's copies, as in llama.cpp.
    for (ggml_backend_t be : model->backends) {
        if (!be) continue;
        backends.push_back(be);
        bufts.push_back(ggml_backend_get_default_buffer_type(be));
    }
    if (model->backend_gpu && !env_is("PYLAZY_PINNED", "0")) {
        c->host_buft = ggml_backend_dev_host_buffer_type(ggml_backend_get_device(model->backend_gpu));
    }
    backends.push_back(model->backend_cpu);
    bufts.push_back(c->host_buft ? c->host_buft : ggml_backend_get_default_buffer_type(model->backend_cpu));
    for (auto & sched : c->sched) {
        sched = ggml_backend_sched_new(backends.data(), bufts.data(), (int) backends.size(), c->graph_size, false, true);
        if (!sched) throw Error(PLZ_ERR_RUNTIME, "cannot create the graph scheduler");
        if (per_op) ggml_backend_sched_set_eval_callback(sched, plz_op_profile_callback, nullptr);
    }
    // PYLAZY_MASK_TEMPLATE=1 uses the template on the CPU too (tests: it must not change any logit).
    if (model->backend_gpu || env_is("PYLAZY_MASK_TEMPLATE", "1")) make_causal_template(*c);
    return c.release();
}

void set_lazy(Context * c, const std::vector<int> & layers, const std::vector<float> & keep, int pool, int window) {
    const int L = c->model->hp.n_layer;
    if (c->n_past != 0) throw Error(PLZ_ERR_ARG, "the lazy schedule can only change on an empty context (reset first)");
    if (layers.size() != keep.size()) throw Error(PLZ_ERR_ARG, "lazy layers and keep ratios differ in length");
    if (layers.size() > 32) throw Error(PLZ_ERR_ARG, "at most 32 pruning layers");
    if (pool < 0 || pool > 64) throw Error(PLZ_ERR_ARG, "lazy pool must be in [0, 64]");
    if (window < 1 || window > 256) throw Error(PLZ_ERR_ARG, "lazy window must be in [1, 256]");
    for (size_t i = 0; i < layers.size(); ++i) {
        if (layers[i] < 0 || layers[i] >= L - 1) throw Error(PLZ_ERR_ARG, "pruning layer " + std::to_string(layers[i]) + " outside [0, n_layer-1)");
        if (i > 0 && layers[i] <= layers[i - 1]) throw Error(PLZ_ERR_ARG, "pruning layers must increase");
        if (!(keep[i] > 0.0f && keep[i] <= 1.0f)) throw Error(PLZ_ERR_ARG, "keep ratios must be in (0, 1]");
        if (i > 0 && keep[i] > keep[i - 1]) throw Error(PLZ_ERR_ARG, "keep ratios must not increase");
    }
    configure_stages(*c, layers, keep);
    c->lazy_pool = pool;
    c->lazy_window = window;
    c->rec.stage_all.assign(c->stages.size(), 0);
}

void reset(Context * c) {
    drop_graph_cache(*c);
    c->n_past = 0;
    c->select_pos = 0;
    for (auto & s : c->stages) clear_stage_state(*c, s);
    c->rec.valid = false;
    c->rec.n_tail = 0;
    c->rec.stage_all.assign(c->stages.size(), 0);
    c->rec.full_steps = c->rec.recycled_steps = 0;
}

void truncate(Context * c, int n) {
    if (c->stages.size() != 1) throw Error(PLZ_ERR_ARG, "truncate needs full attention (no lazy schedule)");
    if (n < 0 || n > c->n_past) throw Error(PLZ_ERR_ARG, "truncate: n must be in [0, n_past]");
    Stage & st = c->stages[0];
    for (int i = n; i < st.n_cells; ++i) st.pos_cell[st.cell_pos[i]] = -1;
    st.cell_pos.resize(n);
    st.n_cells = n;
    c->n_past = n;
    c->rec.valid = false;
}

void set_recycle(Context * c, int mode, int k, int tail_cap, int sinks, int pool, float share) {
    drop_graph_cache(*c);
    configure_recycle(*c, mode, k, tail_cap, sinks, pool, share);
    c->rec.stage_all.assign(c->stages.size(), 0);
}

StepKind decode(Context * c, int32_t token, StepKind kind, bool select, float * logits_out, float * sims) {
    RecycleState & r = c->rec;
    if (r.mode == 0) kind = StepKind::Full;
    else if (kind == StepKind::Full) kind = StepKind::Refresh;   // with a recycled cache, a full step refills it
    if (kind == StepKind::Recycled && (!r.valid || r.n_tail >= r.tail_cap)) kind = StepKind::Refresh;
    if (kind != StepKind::Recycled) sims = nullptr;
    if (c->n_past + 1 > c->n_ctx) throw Error(PLZ_ERR_CONTEXT, "the context window of " + std::to_string(c->n_ctx) + " is full");
    if (token < 0 || token >= c->model->hp.n_vocab) throw Error(PLZ_ERR_ARG, "token id outside the vocabulary");
    try {
        step(*c, &token, 1, false, logits_out, kind, select, sims);
    } catch (...) {
        reset(c);
        throw;
    }
    if (kind == StepKind::Refresh) {
        r.valid = true;
        r.n_tail = 1;
        r.refresh_pos = c->n_past;
        ++r.full_steps;
    } else if (kind == StepKind::Recycled) {
        ++r.n_tail;
        ++r.recycled_steps;
    } else {
        ++r.full_steps;
    }
    c->n_past += 1;
    return kind;
}

void eval(Context * c, const int32_t * tokens, int n, bool all_logits, float * logits_out) {
    const Hparams & hp = c->model->hp;
    if (n <= 0) throw Error(PLZ_ERR_ARG, "no tokens to evaluate");
    if ((int64_t) c->n_past + n > c->n_ctx) {
        throw Error(PLZ_ERR_CONTEXT, "requested tokens (" + std::to_string(c->n_past + n) +
                                     ") exceed the context window of " + std::to_string(c->n_ctx));
    }
    for (int i = 0; i < n; ++i) {
        if (tokens[i] < 0 || tokens[i] >= hp.n_vocab) {
            throw Error(PLZ_ERR_ARG, "token id " + std::to_string(tokens[i]) + " at index " + std::to_string(i) +
                                     " is outside the vocabulary [0, " + std::to_string(hp.n_vocab) + ")");
        }
    }
    c->rec.valid = false;   // tokens evaluated here are not in the recycled cache's tail: refresh next
    const bool lazy = c->stages.size() > 1;
    if (lazy && all_logits) throw Error(PLZ_ERR_ARG, "all_logits is not available with lazy prefill (pruned tokens have no logits)");
    try {
        if (lazy && c->n_past == 0) {
            prefill_lazy(*c, tokens, n, logits_out);
            c->n_past = n;
            return;
        }
        for (int off = 0; off < n; off += c->n_ubatch) {
            const int nc = std::min(c->n_ubatch, n - off);
            // Without all_logits only the very last chunk needs logits; step() writes the last row.
            step(*c, tokens + off, nc, all_logits, logits_out + (all_logits ? (size_t) off * hp.n_vocab : 0));
            c->n_past += nc;
        }
    } catch (...) {
        // A failed step leaves cells half-written: drop the conversation rather than keep a corrupt cache.
        reset(c);
        throw;
    }
}

}  // namespace plz
