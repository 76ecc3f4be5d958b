// The forward pass as a ggml graph (see graph.h). Read build_layer() for one transformer block and
// GraphResult::build() for how a step's segments become one graph.
#include "graph.h"
#include "pylazy.h"

#include <algorithm>
#include <cstring>
#include <string>

namespace plz {

void check_status(ggml_status st, const char * what) {
    if (st != GGML_STATUS_SUCCESS) throw Error(PLZ_ERR_RUNTIME, std::string(what) + " failed (ggml status " + std::to_string((int) st) + ")");
}

// -- inputs ----------------------------------------------------------------------------------------

InputRows::InputRows(ggml_context * ctx0, const Model & m, const Segment & sg) : m(m), n(sg.n()), stage(sg.b.stage) {
    rows = new_input(ctx0, GGML_TYPE_I32, n, 1, "rows");
    pos  = new_input(ctx0, GGML_TYPE_I32, n, 1, "pos");
    if (stage == 0 && n <= HOST_EMBD_MAX) embd = new_input(ctx0, GGML_TYPE_F32, m.hp.n_embd, n, "embd");
}

// Host embeddings: the same dequantization as get_rows on the CPU backend (the type's to_float), so
// logits do not change.
void InputRows::set_input(const Segment & sg) {
    plz::set_input(rows, sg.b.rows.data(), sizeof(int32_t) * n);
    if (embd) {
        const ggml_tensor * te = m.tok_embd;
        const auto * traits = ggml_get_type_traits(te->type);
        const int n_embd = m.hp.n_embd;
        std::vector<float> data((size_t) n_embd * n);
        for (int i = 0; i < n; ++i) {
            const char * row = (const char *) te->data + (size_t) sg.b.rows[i] * te->nb[1];
            float * out = data.data() + (size_t) i * n_embd;
            if (te->type == GGML_TYPE_F32) std::memcpy(out, row, sizeof(float) * n_embd);
            else if (traits->to_float) traits->to_float(row, out, n_embd);
            else throw Error(PLZ_ERR_RUNTIME, std::string("token_embd type ") + ggml_type_name(te->type) + " cannot be dequantized");
        }
        plz::set_input(embd, data.data(), sizeof(float) * data.size());
    }
    plz::set_input(pos, sg.b.pos.data(), sizeof(int32_t) * n);
}

InputCells::InputCells(ggml_context * ctx0, const Segment & sg) : n(sg.n()) {
    cells = new_input(ctx0, GGML_TYPE_I64, n, 1, "cells");
}

void InputCells::set_input(const Segment & sg) { plz::set_input(cells, sg.cells.data(), sizeof(int64_t) * n); }

InputMask::InputMask(ggml_context * ctx0, const KvStore & kv, const Segment & sg)
    : n(sg.n()), n_kv(sg.n_kv), tpl_p0(sg.tpl_p0), host_empty(sg.mask.empty()) {
    if (tpl_p0 >= 0) {
        ggml_tensor * t = kv.causal_tpl;
        mask = ggml_cont(ctx0, ggml_view_2d(ctx0, t, n_kv, n, t->nb[1], (size_t) (kv.tpl_shift - tpl_p0) * t->nb[0]));
    } else {
        mask = new_input(ctx0, GGML_TYPE_F16, n_kv, n, "mask");
    }
    if (kv.model->hp.n_swa > 0) mask_swa = new_input(ctx0, GGML_TYPE_F16, n_kv, n, "mask_swa");
}

void InputMask::set_input(const Segment & sg) {
    if (!sg.mask.empty()) plz::set_input(mask, sg.mask.data(), sizeof(ggml_fp16_t) * sg.mask.size());
    plz::set_input(mask_swa, sg.mask_swa.data(), sizeof(ggml_fp16_t) * sg.mask_swa.size());
}

bool InputMask::can_reuse(const Segment & sg) const {
    return sg.n() == n && sg.n_kv == n_kv && sg.tpl_p0 == tpl_p0 && sg.mask.empty() == host_empty;
}

InputScoreBias::InputScoreBias(ggml_context * ctx0, const Segment & sg) : n_kv(sg.n_kv) {
    score_bias = new_input(ctx0, GGML_TYPE_F32, n_kv, 1, "score_bias");
}

void InputScoreBias::set_input(const Segment & sg) { plz::set_input(score_bias, sg.bias.data(), sizeof(float) * sg.bias.size()); }

// -- one layer ---------------------------------------------------------------------------------------

namespace {

// The tensors one layer of a segment reads.
struct LayerInputs {
    ggml_tensor * pos = nullptr, * cells = nullptr, * mask = nullptr, * mask_swa = nullptr, * score_bias = nullptr;
    StepKind kind = StepKind::Full;
    bool recycle_stage = false;          // Refresh/Recycled apply to this stage (not one that keeps all)
    RecycleInputs rec;
    std::vector<ggml_tensor *> * sims = nullptr;  // per-layer query similarity outputs (Recycled)
    std::vector<RefreshLayer> * refresh = nullptr; // per-layer refresh scores, gathered after the last layer
};

// Optional tensors (null when the arch/file has none) are skipped: llama, qwen2 (q/k/v biases),
// qwen3 (per-head q/k RMSNorm) and gemma3 (q/k norms, post-norms) share this one graph.
ggml_tensor * add_bias(ggml_context * ctx0, ggml_tensor * t, ggml_tensor * b) { return b ? ggml_add(ctx0, t, b) : t; }
ggml_tensor * rms_norm(ggml_context * ctx0, const Hparams & hp, ggml_tensor * t, ggml_tensor * w) {  // over ne0 (n_embd, or D per head)
    return w ? ggml_mul(ctx0, ggml_rms_norm(ctx0, t, hp.rms_eps), w) : t;
}

struct Qkv {
    ggml_tensor * q, * k, * v;   // [D, H, n], [D, Hkv, n], [D * Hkv, n]
    float kq_scale;
};

// A layer's q, k, v of x: projections, biases, q/k norms, RoPE, and the cache basis (attention.h).
Qkv build_qkv(ggml_context * ctx0, const GraphEnv & env, int il, ggml_tensor * x, ggml_tensor * pos) {
    const Model & m = env.model;
    const Hparams & hp = m.hp;
    const LayerWeights & L = m.layers[il];
    const int n = (int) x->ne[1], D = hp.head_dim, H = hp.n_head, Hkv = hp.n_head_kv;
    const bool swa = hp.is_swa(il);
    ggml_tensor * cur = rms_norm(ctx0, hp, x, L.attn_norm);
    ggml_tensor * q = ggml_reshape_3d(ctx0, add_bias(ctx0, ggml_mul_mat(ctx0, L.wq, cur), L.bq), D, H, n);
    ggml_tensor * k = ggml_reshape_3d(ctx0, add_bias(ctx0, ggml_mul_mat(ctx0, L.wk, cur), L.bk), D, Hkv, n);
    ggml_tensor * v = add_bias(ctx0, ggml_mul_mat(ctx0, L.wv, cur), L.bv);
    q = rms_norm(ctx0, hp, q, L.q_norm);
    k = rms_norm(ctx0, hp, k, L.k_norm);
    // m.rope_freqs (llama3 scaling) divides each rotation frequency; null leaves them as they are.
    // SWA layers rotate with their own base and scale (gemma3: 10000, 1 while global layers use 1e6).
    const float base = swa ? hp.rope_base_swa : hp.rope_base, fscale = swa ? hp.rope_freq_scale_swa : hp.rope_freq_scale;
    q = ggml_rope_ext(ctx0, q, pos, m.rope_freqs, hp.rope_dim, hp.rope_mode, hp.n_ctx_train,
                      base, fscale, 0.0f, 1.0f, 32.0f, 1.0f);
    k = ggml_rope_ext(ctx0, k, pos, m.rope_freqs, hp.rope_dim, hp.rope_mode, hp.n_ctx_train,
                      base, fscale, 0.0f, 1.0f, 32.0f, 1.0f);
    float kq_scale = hp.kq_scale;
    if (hp.scale_q) {   // gemma3 scales q itself (as llama.cpp does), so attention adds no scale
        q = ggml_scale(ctx0, q, kq_scale);
        kq_scale = 1.0f;
    }
    // Quantized caches: q/k (v) in the rotated basis llama.cpp stores them in (attention.h).
    const KvFormat & f = env.kv.fmt;
    return {rotate_qk(ctx0, f, q), rotate_qk(ctx0, f, k), rotate_v(ctx0, f, v), kq_scale};
}

// The importance of a cell: its attention probability from the last W rows of the batch (the
// observation window, LazyPrefill(window=); 1 = the last token only, as LazyLLM), mean over those rows
// and the heads; plus the selection bias.
ggml_tensor * build_lazy_scores(ggml_context * ctx0, const GraphEnv & env, ggml_tensor * q, ggml_tensor * kc, ggml_tensor * mask,
                                float kq_scale, ggml_tensor * score_bias) {
    const int64_t D = q->ne[0], H = q->ne[1], n = q->ne[2], n_kv = kc->ne[1];
    const int64_t W = std::max<int64_t>(1, std::min<int64_t>(n, env.lazy_window));
    ggml_tensor * q_win = ggml_view_3d(ctx0, q, D, W, H, q->nb[2], q->nb[1], (size_t) (n - W) * q->nb[2]);
    ggml_tensor * mask_win = ggml_view_2d(ctx0, mask, n_kv, W, mask->nb[1], (size_t) (n - W) * mask->nb[1]);
    ggml_tensor * kq = ggml_mul_mat(ctx0, kc, q_win);                       // [n_kv, W, H]
    kq = ggml_soft_max_ext(ctx0, kq, mask_win, kq_scale, 0.0f);
    kq = ggml_cont(ctx0, ggml_transpose(ctx0, ggml_reshape_2d(ctx0, kq, n_kv, W * H)));  // [W * H, n_kv]
    ggml_tensor * s = ggml_reshape_1d(ctx0, ggml_mean(ctx0, kq), n_kv);
    // Optional (LazyPrefill(pool=)): a cell also scores as its best neighbour within lazy_pool cells,
    // as recycle.cpp does for the same reason (an attended token's followers come along).
    if (env.lazy_pool > 0) s = ggml_pool_1d(ctx0, s, GGML_OP_POOL_MAX, 2 * env.lazy_pool + 1, 1, env.lazy_pool);
    return ggml_add(ctx0, s, score_bias);
}

// The feed-forward block and its residual.
ggml_tensor * build_ffn(ggml_context * ctx0, const Model & m, int il, ggml_tensor * x) {
    const Hparams & hp = m.hp;
    const LayerWeights & L = m.layers[il];
    ggml_tensor * cur = rms_norm(ctx0, hp, x, L.ffn_norm);
    ggml_tensor * gate = add_bias(ctx0, ggml_mul_mat(ctx0, L.ffn_gate, cur), L.b_gate);
    ggml_tensor * up = add_bias(ctx0, ggml_mul_mat(ctx0, L.ffn_up, cur), L.b_up);
    cur = hp.gelu ? ggml_geglu_split(ctx0, gate, up) : ggml_swiglu_split(ctx0, gate, up);
    return ggml_add(ctx0, x, rms_norm(ctx0, hp, add_bias(ctx0, ggml_mul_mat(ctx0, L.ffn_down, cur), L.b_down), L.ffn_post_norm));
}

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
ggml_tensor * build_layer(ggml_context * ctx0, ggml_cgraph * gf, const GraphEnv & env, int il,
                          ggml_tensor * x, const LayerInputs & in, int n_kv, ggml_tensor ** scores, int n_out) {
    const KvStore & kv = env.kv;
    const KvFormat & f = kv.fmt;
    const Hparams & hp = env.model.hp;
    const LayerWeights & L = env.model.layers[il];
    const int n = (int) x->ne[1], D = hp.head_dim, H = hp.n_head, Hkv = hp.n_head_kv;
    const bool swa = hp.is_swa(il);
    ggml_tensor * mask = swa ? in.mask_swa : in.mask;
    const bool recycle = in.recycle_stage && !swa;
    auto [q, k, v, kq_scale] = build_qkv(ctx0, env, il, x, in.pos);

    // Write this batch's K/V into its cells first; the attention below reads the cache after it.
    // A view (not a reshape) between RoPE and set_rows: ggml's CUDA backend fuses ROPE+VIEW+SET_ROWS.
    ggml_build_forward_expand(gf, ggml_set_rows(ctx0, kv.k[il], ggml_view_2d(ctx0, k, D * Hkv, n, k->nb[2], 0), in.cells));
    ggml_build_forward_expand(gf, store_stage_v(ctx0, f, kv.v[il], v_source(ctx0, f, v), in.cells));

    ggml_tensor * kc = kv.k_rows(ctx0, il, n_kv);

    // Last row's query per head, [D, 1, H]; K broadcasts over the query heads of its group.
    ggml_tensor * q_last = ggml_view_3d(ctx0, q, D, 1, H, q->nb[1], q->nb[1], (size_t) (n - 1) * q->nb[2]);
    ggml_tensor * mask_last = ggml_view_2d(ctx0, mask, n_kv, 1, mask->nb[1], (size_t) (n - 1) * mask->nb[1]);
    // The fresh token is the last row (a refresh batch may start with revived rows).
    ggml_tensor * k_last = ggml_view_3d(ctx0, k, D, Hkv, 1, k->nb[1], k->nb[2], (size_t) (n - 1) * k->nb[2]);
    ggml_tensor * v_last = v_source(ctx0, f, ggml_view_2d(ctx0, v, D * Hkv, 1, v->nb[1], (size_t) (n - 1) * v->nb[1]));
    if (recycle && in.kind == StepKind::Refresh) {
        ggml_tensor * logits = build_refresh_layer(ctx0, gf, env.rec, kv, il, q_last, kc);
        in.refresh->push_back({il, kc, kv.v_rows(ctx0, il, n_kv), logits, ggml_permute(ctx0, k_last, 0, 2, 1, 3),
                               v_last, mask_last, kq_scale});
    }
    if (in.sims) in.sims->push_back(recycle ? build_query_similarity(ctx0, env.rec, il, q_last) : nullptr);
    if (scores) *scores = build_lazy_scores(ctx0, env, q, kc, mask, kq_scale, in.score_bias);

    q = ggml_permute(ctx0, q, 0, 2, 1, 3);  // [D, n, H]
    ggml_tensor * attn;
    if (recycle && in.kind == StepKind::Recycled) {
        attn = build_recycled_attention(ctx0, gf, env.rec, kv, il, q, k_last, v_last, in.rec, kq_scale);
    } else {
        attn = build_attention(ctx0, f, q, kc, v_operand(ctx0, f, kv.v[il], false, n_kv), mask, kq_scale);
    }
    attn = rotate_v(ctx0, f, ggml_reshape_2d(ctx0, attn, D * H, n));
    ggml_tensor * out = add_bias(ctx0, ggml_mul_mat(ctx0, L.wo, attn), L.bo);
    if (n_out < n) {
        auto last_rows = [&](ggml_tensor * t) { return ggml_view_2d(ctx0, t, t->ne[0], n_out, t->nb[1], (size_t) (n - n_out) * t->nb[1]); };
        out = last_rows(out);
        x = last_rows(x);
    }
    // gemma3 normalises each sub-block's output (post-norm) before adding it to the residual.
    x = ggml_add(ctx0, x, rms_norm(ctx0, hp, out, L.attn_post_norm));
    return build_ffn(ctx0, env.model, il, x);
}

ggml_tensor * build_logits(ggml_context * ctx0, const Model & m, ggml_tensor * x) {
    x = ggml_mul(ctx0, ggml_rms_norm(ctx0, x, m.hp.rms_eps), m.output_norm);
    x = ggml_mul_mat(ctx0, m.output, x);
    if (m.hp.final_softcap > 0.0f) {   // c * tanh(logits / c), in llama.cpp's op order
        x = ggml_scale(ctx0, ggml_tanh(ctx0, ggml_scale(ctx0, x, 1.0f / m.hp.final_softcap)), m.hp.final_softcap);
    }
    return x;
}

// The hidden states entering the first segment: token embeddings (stage 0) or aux rows (revival).
ggml_tensor * build_input_rows(ggml_context * ctx0, const GraphEnv & env, const Batch & b, const InputRows & in) {
    const Model & m = env.model;
    ggml_tensor * x = in.embd ? in.embd : ggml_get_rows(ctx0, b.stage == 0 ? m.tok_embd : env.kv.aux[b.stage], in.rows);
    // gemma3 scales embeddings by sqrt(n_embd); aux rows (later stages) are hidden states, already scaled.
    if (b.stage == 0 && m.hp.embd_scale != 1.0f) x = ggml_scale(ctx0, x, m.hp.embd_scale);
    return x;
}

}  // namespace

// -- the graph ---------------------------------------------------------------------------------------

bool GraphResult::Shape::operator==(const Shape & o) const {
    return stage == o.stage && kind == o.kind && n_logits == o.n_logits && n_select == o.n_select && want_sims == o.want_sims &&
           stage_all == o.stage_all;
}

template <typename T> T * GraphResult::add(size_t seg, std::unique_ptr<T> in) {
    T * p = in.get();
    inputs.emplace_back(seg, std::move(in));
    return p;
}

GraphResult::GraphResult(const GraphEnv & env, const std::vector<Segment> & segs, std::vector<uint8_t> & meta)
    : kv_generation(env.kv.generation) {
    ggml_init_params ip = { meta.size(), meta.data(), true };
    ctx.reset(ggml_init(ip));
    gf = ggml_new_graph_custom(ctx.get(), env.graph_size, false);
    for (const Segment & sg : segs) {
        const Batch & b = sg.b;
        shapes.push_back({b.stage, (int) b.kind, b.n_logits, b.n_select, (int) b.want_sims, (int) sg.stage_all});
    }
    build(env, segs);
}

void GraphResult::set_inputs(const std::vector<Segment> & segs) {
    for (auto & [i, in] : inputs) in->set_input(segs[i]);
}

bool GraphResult::can_reuse(const std::vector<Segment> & segs, uint64_t generation) const {
    if (generation != kv_generation || segs.size() != shapes.size()) return false;
    for (size_t i = 0; i < segs.size(); ++i) {
        const Batch & b = segs[i].b;
        if (!(shapes[i] == Shape{b.stage, (int) b.kind, b.n_logits, b.n_select, (int) b.want_sims, (int) segs[i].stage_all})) return false;
    }
    for (const auto & [i, in] : inputs) if (!in->can_reuse(segs[i])) return false;
    return true;
}

// One segment's inputs and layers on hidden states x (null for the first: its rows' embeddings or aux
// rows). Segments after the first continue the first one's rows: they share its positions and take
// their hidden states from the previous stage inside the graph.
ggml_tensor * GraphResult::build_segment(const GraphEnv & env, const Segment & sg, size_t i, ggml_tensor * x, InputRows *& rows,
                                         ggml_tensor ** scores) {
    ggml_context * ctx0 = ctx.get();
    const Batch & b = sg.b;
    const Stage & st = env.kv.stages[b.stage];
    const bool last_stage = b.stage + 1 == (int) env.kv.stages.size();
    LayerInputs in;
    if (i == 0) rows = add(i, std::make_unique<InputRows>(ctx0, env.model, sg));
    in.pos = rows->pos;
    in.cells = add(i, std::make_unique<InputCells>(ctx0, sg))->cells;
    const InputMask * mask = add(i, std::make_unique<InputMask>(ctx0, env.kv, sg));
    in.mask = mask->mask;
    in.mask_swa = mask->mask_swa;
    if (b.n_select > 0) in.score_bias = add(i, std::make_unique<InputScoreBias>(ctx0, sg))->score_bias;
    in.kind = b.kind;
    in.recycle_stage = b.kind != StepKind::Full && !sg.stage_all;
    if (in.recycle_stage) in.rec = add(i, std::make_unique<InputRecycle>(ctx0, env.rec, env.kv, sg))->t;
    if (i == 0) rec0 = in.rec;
    if (b.want_sims && in.recycle_stage && b.kind == StepKind::Recycled) in.sims = &sims[i];
    in.refresh = &refresh;
    if (i == 0) x = build_input_rows(ctx0, env, b, *rows);
    for (int il = st.il0; il < st.il1; ++il) {
        const bool pruning_layer = b.n_select > 0 && il == st.il1 - 1;
        const int n_out = last_stage && il == st.il1 - 1 && b.n_logits > 0 ? b.n_logits : (int) b.rows.size();
        x = build_layer(ctx0, gf, env, il, x, in, sg.n_kv, pruning_layer ? scores : nullptr, n_out);
    }
    if (!last_stage) {
        // Every row's hidden state at the boundary: kept rows go on from here, pruned ones are revived from here.
        ggml_build_forward_expand(gf, ggml_set_rows(ctx0, env.kv.aux[b.stage + 1], x, in.pos));
    }
    if (last_stage && b.n_logits > 0) {
        logits = build_logits(ctx0, env.model, x);
        ggml_set_output(logits);
        ggml_build_forward_expand(gf, logits);
    }
    return x;
}

void GraphResult::build(const GraphEnv & env, const std::vector<Segment> & segs) {
    sims.resize(segs.size());
    ggml_tensor * x = nullptr, * scores = nullptr;
    InputRows * rows = nullptr;
    for (size_t i = 0; i < segs.size(); ++i) x = build_segment(env, segs[i], i, x, rows, &scores);
    add_outputs(env, segs, scores);
}

// After the last layer: the refresh's picks (or its scores, when the picks wait for every stage), the
// query similarities, the scores that choose the cells for the next stage.
void GraphResult::add_outputs(const GraphEnv & env, const std::vector<Segment> & segs, ggml_tensor * scores) {
    ggml_context * ctx0 = ctx.get();
    if (env.rec.defer_picks(segs[0].b.kind, (int) env.kv.stages.size()) && !refresh.empty()) {
        best = build_refresh_best(ctx0, env.rec, refresh);
        ggml_set_output(best);
        ggml_build_forward_expand(gf, best);
    } else {
        gather_idx = build_refresh_gather(ctx0, gf, env.rec, env.kv, refresh, rec0);
    }
    for (const auto & seg_sims : sims) {
        for (ggml_tensor * t : seg_sims) {
            if (!t) continue;   // a sliding-window layer: no similarity
            ggml_set_output(t);
            ggml_build_forward_expand(gf, t);
        }
    }
    // The cells to keep are chosen on the host from these scores (Context::read_outputs), not by
    // ggml_top_k: pooled scores tie often, and backends order ties differently (ggml-vulkan on an
    // NVIDIA GPU even from run to run, docs/vulkan.md). The stage-by-stage step waits for them anyway.
    if (scores) {
        select_scores = scores;
        ggml_set_output(select_scores);
        ggml_build_forward_expand(gf, select_scores);
    }
}

}  // namespace plz
