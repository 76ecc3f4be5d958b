// The forward pass and its bookkeeping. Read build_layer() for one transformer block, run_batch() for
// how one batch of rows goes through one stage, prefill_lazy() and step() for the two ways tokens
// are scheduled through the stages.
#include "context.h"
#include "pylazy.h"

#include "ggml-alloc.h"

#include <algorithm>
#include <cmath>
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

int pad_to(int x, int m) { return (x + m - 1) / m * m; }

ggml_tensor * new_input(ggml_context * ctx0, ggml_type type, int64_t ne0, int64_t ne1, const char * name) {
    ggml_tensor * t = ne1 > 1 ? ggml_new_tensor_2d(ctx0, type, ne0, ne1) : ggml_new_tensor_1d(ctx0, type, ne0);
    ggml_set_name(t, name);
    ggml_set_input(t);
    return t;
}

struct Inputs {
    ggml_tensor * rows = nullptr;     // I32 [n]   token ids (stage 0) or positions to gather from aux
    ggml_tensor * pos = nullptr;      // I32 [n]   RoPE positions
    ggml_tensor * cells = nullptr;    // I64 [n]   cell each row's K/V is written to
    ggml_tensor * mask = nullptr;     // F16 [n_kv, n]
    ggml_tensor * score_bias = nullptr;  // F32 [n_kv]  only when the batch selects for the next stage
};

// One transformer block on hidden states x [n_embd, n] attending to the first n_kv cells of the
// layer's stage. With `scores` set, also returns the last row's attention probabilities averaged over
// heads ([n_kv]) — the lazy-prefill importance of every cell.
ggml_tensor * build_layer(ggml_context * ctx0, ggml_cgraph * gf, const Context & c, int il,
                          ggml_tensor * x, const Inputs & in, int n_kv, ggml_tensor ** scores) {
    const Model & m = *c.model;
    const Hparams & hp = m.hp;
    const LayerWeights & L = m.layers[il];
    const int n = (int) x->ne[1], D = hp.head_dim, H = hp.n_head, Hkv = hp.n_head_kv;
    const float kq_scale = 1.0f / std::sqrt((float) D);

    ggml_tensor * cur = ggml_mul(ctx0, ggml_rms_norm(ctx0, x, hp.rms_eps), L.attn_norm);
    ggml_tensor * q = ggml_reshape_3d(ctx0, ggml_mul_mat(ctx0, L.wq, cur), D, H, n);
    ggml_tensor * k = ggml_reshape_3d(ctx0, ggml_mul_mat(ctx0, L.wk, cur), D, Hkv, n);
    ggml_tensor * v = ggml_mul_mat(ctx0, L.wv, cur);
    q = ggml_rope_ext(ctx0, q, in.pos, nullptr, hp.rope_dim, hp.rope_mode, hp.n_ctx_train,
                      hp.rope_base, hp.rope_freq_scale, 0.0f, 1.0f, 32.0f, 1.0f);
    k = ggml_rope_ext(ctx0, k, in.pos, nullptr, hp.rope_dim, hp.rope_mode, hp.n_ctx_train,
                      hp.rope_base, hp.rope_freq_scale, 0.0f, 1.0f, 32.0f, 1.0f);

    // Write this batch's K/V into its cells first; the attention below reads the cache after it.
    ggml_build_forward_expand(gf, ggml_set_rows(ctx0, c.k[il], ggml_reshape_2d(ctx0, k, D * Hkv, n), in.cells));
    ggml_build_forward_expand(gf, ggml_set_rows(ctx0, c.v[il], v, in.cells));

    // Cache rows viewed as [D, n_kv, Hkv]: per KV head, one row per cell.
    const size_t esz = ggml_element_size(c.k[il]);
    ggml_tensor * kc = ggml_view_3d(ctx0, c.k[il], D, n_kv, Hkv, c.k[il]->nb[1], D * esz, 0);
    ggml_tensor * vc = ggml_view_3d(ctx0, c.v[il], D, n_kv, Hkv, c.v[il]->nb[1], D * esz, 0);

    if (scores) {
        // Last row's query per head, [D, 1, H]; K broadcasts over the query heads of its group.
        ggml_tensor * q_last = ggml_view_3d(ctx0, q, D, 1, H, q->nb[1], q->nb[1], (size_t) (n - 1) * q->nb[2]);
        ggml_tensor * kq = ggml_mul_mat(ctx0, kc, q_last);                      // [n_kv, 1, H]
        ggml_tensor * mask_last = ggml_view_2d(ctx0, in.mask, n_kv, 1, in.mask->nb[1], (size_t) (n - 1) * in.mask->nb[1]);
        kq = ggml_soft_max_ext(ctx0, kq, mask_last, kq_scale, 0.0f);
        kq = ggml_cont(ctx0, ggml_transpose(ctx0, ggml_reshape_2d(ctx0, kq, n_kv, H)));  // [H, n_kv]
        *scores = ggml_add(ctx0, ggml_reshape_1d(ctx0, ggml_mean(ctx0, kq), n_kv), in.score_bias);
    }

    q = ggml_permute(ctx0, q, 0, 2, 1, 3);  // [D, n, H]
    ggml_tensor * attn = ggml_flash_attn_ext(ctx0, q, kc, vc, in.mask, kq_scale, 0.0f, 0.0f);
    ggml_prec_set_acc(attn, GGML_PREC_F32);
    attn = ggml_reshape_2d(ctx0, attn, D * H, n);
    x = ggml_add(ctx0, x, ggml_mul_mat(ctx0, L.wo, attn));

    cur = ggml_mul(ctx0, ggml_rms_norm(ctx0, x, hp.rms_eps), L.ffn_norm);
    cur = ggml_swiglu_split(ctx0, ggml_mul_mat(ctx0, L.ffn_gate, cur), ggml_mul_mat(ctx0, L.ffn_up, cur));
    return ggml_add(ctx0, x, ggml_mul_mat(ctx0, L.ffn_down, cur));
}

ggml_tensor * build_logits(ggml_context * ctx0, const Model & m, ggml_tensor * x) {
    x = ggml_mul(ctx0, ggml_rms_norm(ctx0, x, m.hp.rms_eps), m.output_norm);
    return ggml_mul_mat(ctx0, m.output, x);
}

void check_status(ggml_status st, const char * what) {
    if (st != GGML_STATUS_SUCCESS) throw Error(PLZ_ERR_RUNTIME, std::string(what) + " failed (ggml status " + std::to_string((int) st) + ")");
}

// One batch of rows through one stage. Rows are tokens new to the stage: fresh tokens and, in later
// stages, revived ones; `visible(row, cell)` says which cells each row attends to.
struct Batch {
    int stage = 0;
    std::vector<int32_t> rows;         // token ids (stage 0) or positions (gathered from aux[stage])
    std::vector<int32_t> pos;
    int n_select = 0;                  // > 0: select this many cells for the next stage (last row's view)
    int n_logits = 0;                  // logits of the last n_logits rows (last stage only)
};

struct BatchResult {
    std::vector<int32_t> selected_cells;
};

}  // namespace

// -- storage -------------------------------------------------------------------------------------

static void free_stage(Stage & s) {
    if (s.buf) ggml_backend_buffer_free(s.buf);
    if (s.ctx) ggml_free(s.ctx);
    s.buf = nullptr;
    s.ctx = nullptr;
}

static ggml_backend_t compute_backend(const Context & c) {
    return c.model->backend_gpu ? c.model->backend_gpu : c.model->backend_cpu;
}

// (Re)allocates the K/V tensors of a stage with `capacity` cells, keeping the first n_cells rows.
static void alloc_stage(Context & c, Stage & s, int capacity) {
    const Hparams & hp = c.model->hp;
    const int64_t row = (int64_t) hp.head_dim * hp.n_head_kv;
    ggml_init_params ip = { ggml_tensor_overhead() * (2 * (s.il1 - s.il0) + 1), nullptr, true };
    ggml_context * ctx = ggml_init(ip);
    std::vector<ggml_tensor *> nk, nv;
    for (int il = s.il0; il < s.il1; ++il) {
        nk.push_back(ggml_new_tensor_2d(ctx, GGML_TYPE_F16, row, capacity));
        nv.push_back(ggml_new_tensor_2d(ctx, GGML_TYPE_F16, row, capacity));
    }
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx, ggml_backend_get_default_buffer_type(compute_backend(c)));
    if (!buf) {
        ggml_free(ctx);
        throw Error(PLZ_ERR_RUNTIME, "out of memory allocating the KV cache (" + std::to_string(capacity) + " cells)");
    }
    // Unused cells are masked, but 0 * NaN is still NaN inside some attention kernels: start from zeros.
    ggml_backend_buffer_clear(buf, 0);
    if (s.n_cells > 0) {
        std::vector<uint8_t> tmp;
        for (int il = s.il0; il < s.il1; ++il) {
            for (auto pair : { std::make_pair(c.k[il], nk[il - s.il0]), std::make_pair(c.v[il], nv[il - s.il0]) }) {
                const size_t bytes = pair.first->nb[1] * (size_t) s.n_cells;
                tmp.resize(bytes);
                ggml_backend_tensor_get(pair.first, tmp.data(), 0, bytes);
                ggml_backend_tensor_set(pair.second, tmp.data(), 0, bytes);
            }
        }
    }
    free_stage(s);
    s.ctx = ctx;
    s.buf = buf;
    s.capacity = capacity;
    for (int il = s.il0; il < s.il1; ++il) {
        c.k[il] = nk[il - s.il0];
        c.v[il] = nv[il - s.il0];
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
    s.pos_cell.assign(c.n_ctx, -1);
    s.selected.clear();
    s.revived = 0;
}

Context::~Context() {
    if (sched) ggml_backend_sched_free(sched);
    for (auto & s : stages) free_stage(s);
    if (buf_aux) ggml_backend_buffer_free(buf_aux);
    if (ctx_aux) ggml_free(ctx_aux);
}

// -- graphs --------------------------------------------------------------------------------------

namespace {

struct Graph {
    std::unique_ptr<ggml_context, void (*)(ggml_context *)> ctx{nullptr, ggml_free};
    ggml_cgraph * gf = nullptr;
    Inputs in;
    ggml_tensor * logits = nullptr;
    ggml_tensor * selected = nullptr;   // I32 [n_select] cells chosen for the next stage
};

Graph build_stage_graph(Context & c, const Batch & b, int n_kv) {
    const Stage & st = c.stages[b.stage];
    const int n = (int) b.rows.size();
    const bool last_stage = b.stage + 1 == (int) c.stages.size();
    Graph g;
    ggml_init_params ip = { c.graph_meta.size(), c.graph_meta.data(), true };
    g.ctx.reset(ggml_init(ip));
    ggml_context * ctx0 = g.ctx.get();
    g.gf = ggml_new_graph_custom(ctx0, c.graph_size, false);
    g.in.rows  = new_input(ctx0, GGML_TYPE_I32, n, 1, "rows");
    g.in.pos   = new_input(ctx0, GGML_TYPE_I32, n, 1, "pos");
    g.in.cells = new_input(ctx0, GGML_TYPE_I64, n, 1, "cells");
    g.in.mask  = new_input(ctx0, GGML_TYPE_F16, n_kv, n, "mask");
    if (b.n_select > 0) g.in.score_bias = new_input(ctx0, GGML_TYPE_F32, n_kv, 1, "score_bias");

    ggml_tensor * x = b.stage == 0 ? ggml_get_rows(ctx0, c.model->tok_embd, g.in.rows)
                                   : ggml_get_rows(ctx0, c.aux[b.stage], g.in.rows);
    ggml_tensor * scores = nullptr;
    for (int il = st.il0; il < st.il1; ++il) {
        const bool pruning_layer = b.n_select > 0 && il == st.il1 - 1;
        x = build_layer(ctx0, g.gf, c, il, x, g.in, n_kv, pruning_layer ? &scores : nullptr);
    }
    if (!last_stage) {
        // Every row's hidden state at the boundary: kept rows go on from here, pruned ones are revived from here.
        ggml_build_forward_expand(g.gf, ggml_set_rows(ctx0, c.aux[b.stage + 1], x, g.in.pos));
    }
    if (scores) {
        g.selected = ggml_top_k(ctx0, scores, b.n_select);
        ggml_set_output(g.selected);
        ggml_build_forward_expand(g.gf, g.selected);
    }
    if (last_stage && b.n_logits > 0) {
        if (b.n_logits < n) x = ggml_view_2d(ctx0, x, x->ne[0], b.n_logits, x->nb[1], (size_t) (n - b.n_logits) * x->nb[1]);
        g.logits = build_logits(ctx0, *c.model, x);
        ggml_set_output(g.logits);
        ggml_build_forward_expand(g.gf, g.logits);
    }
    return g;
}

// Runs a batch: assigns cells, builds the mask from `visible`, computes, returns the selection.
// attend_all: rows see every cell of the stage at or before their position (prefill and revival);
// otherwise fresh rows (positions >= first_fresh) see only cells whose position is in `attend`.
template <typename Visible>
BatchResult run_batch(Context & c, const Batch & b, Visible visible, float * logits_out) {
    Stage & st = c.stages[b.stage];
    const int n = (int) b.rows.size();
    ensure_capacity(c, st, st.n_cells + n);
    std::vector<int64_t> cells(n);
    for (int i = 0; i < n; ++i) {
        if (st.pos_cell[b.pos[i]] >= 0) throw Error(PLZ_ERR_RUNTIME, "internal: token computed twice at a layer");
        cells[i] = st.n_cells + i;
        st.pos_cell[b.pos[i]] = st.n_cells + i;
        st.cell_pos.push_back(b.pos[i]);
    }
    st.n_cells += n;
    const int n_kv = std::min(pad_to(st.n_cells, KV_PAD), st.capacity);

    const ggml_fp16_t zero = ggml_fp32_to_fp16(0.0f), ninf = ggml_fp32_to_fp16(-INFINITY);
    std::vector<ggml_fp16_t> mask((size_t) n_kv * n, ninf);
    for (int i = 0; i < n; ++i) {
        for (int j = 0; j < st.n_cells; ++j) {
            if (st.cell_pos[j] <= b.pos[i] && visible(i, st.cell_pos[j])) mask[(size_t) i * n_kv + j] = zero;
        }
    }
    std::vector<float> bias;
    if (b.n_select > 0) {
        bias.assign(n_kv, FORCE_OUT);
        for (int j = 0; j < n_kv; ++j) {
            if (mask[(size_t) (n - 1) * n_kv + j] == zero) bias[j] = 0.0f;
        }
        bias[cells[n - 1]] = FORCE_IN;
    }

    ggml_backend_sched_reset(c.sched);
    Graph g = build_stage_graph(c, b, n_kv);
    if (!ggml_backend_sched_alloc_graph(c.sched, g.gf)) throw Error(PLZ_ERR_RUNTIME, "cannot allocate the compute graph");
    std::vector<int64_t> cells64(cells.begin(), cells.end());
    ggml_backend_tensor_set(g.in.rows, b.rows.data(), 0, sizeof(int32_t) * n);
    ggml_backend_tensor_set(g.in.pos, b.pos.data(), 0, sizeof(int32_t) * n);
    ggml_backend_tensor_set(g.in.cells, cells64.data(), 0, sizeof(int64_t) * n);
    ggml_backend_tensor_set(g.in.mask, mask.data(), 0, sizeof(ggml_fp16_t) * mask.size());
    if (g.in.score_bias) ggml_backend_tensor_set(g.in.score_bias, bias.data(), 0, sizeof(float) * bias.size());
    check_status(ggml_backend_sched_graph_compute(c.sched, g.gf), "graph compute");

    BatchResult r;
    if (g.selected) {
        r.selected_cells.resize(b.n_select);
        ggml_backend_tensor_get(g.selected, r.selected_cells.data(), 0, sizeof(int32_t) * b.n_select);
    }
    if (g.logits) ggml_backend_tensor_get(g.logits, logits_out, 0, sizeof(float) * (size_t) b.n_logits * c.model->hp.n_vocab);
    return r;
}

// How many of `n_total` tokens a stage with keep ratio `keep` holds: ceil(keep * n) with the product
// rounded to 6 decimals first (so 0.7 * 10 is 7, not 8), at least 1. tests/reference.py uses the same rule.
int keep_count(float keep, int n_total) {
    const double prod = std::round((double) keep * n_total * 1e6) / 1e6;
    return std::max(1, (int) std::ceil(prod));
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
    for (int s = 0; s < S; ++s) {
        const int n_alive = (int) alive.size();
        std::vector<int32_t> next;
        for (int off = 0; off < n_alive; off += c.n_ubatch) {
            const int nc = std::min(c.n_ubatch, n_alive - off);
            const bool last_chunk = off + nc == n_alive;
            Batch b;
            b.stage = s;
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
}

// Tokens after the prompt: each chunk of fresh tokens runs through every stage. In stage s > 0 the
// tokens selected at the previous boundary that were never computed there are revived first (from
// aux[s], attending causally to the stage's cells); fresh rows then attend only to the selected set
// and to each other. The last fresh row selects the next stage's set.
void step(Context & c, const int32_t * tokens, int n, bool all_logits, float * logits_out) {
    const int S = (int) c.stages.size();
    const int p0 = c.n_past;
    const int n_total = p0 + n;
    std::vector<char> in_attend;  // by position: attended by fresh rows of the current stage
    for (int s = 0; s < S; ++s) {
        Stage & st = c.stages[s];
        Batch b;
        b.stage = s;
        int n_revive = 0;
        if (s > 0) {
            for (int32_t p : st.selected) {
                if (p < p0 && st.pos_cell[p] < 0) {
                    b.pos.push_back(p);
                    ++n_revive;
                }
            }
            in_attend.assign(n_total, 0);
            for (int32_t p : st.selected) in_attend[p] = 1;
        }
        for (int i = 0; i < n; ++i) b.pos.push_back(p0 + i);
        b.rows = s == 0 ? std::vector<int32_t>(tokens, tokens + n) : b.pos;
        if (s + 1 < S) {
            // What the last fresh row sees: earlier cells (stage 0) or the selected set, plus the fresh rows.
            const int n_visible = (s == 0 ? st.n_cells : (int) st.selected.size()) + n;
            b.n_select = std::min(keep_count(c.stages[s + 1].keep, n_total), n_visible);
        } else {
            b.n_logits = all_logits ? n : 1;
        }
        auto visible = [&](int row, int cell_pos) {
            if (s == 0 || row < n_revive) return true;   // causal over the whole stage
            return cell_pos >= p0 || in_attend[cell_pos] != 0;
        };
        BatchResult r = run_batch(c, b, visible, logits_out);
        st.revived += n_revive;
        if (s + 1 < S) {
            std::vector<int32_t> sel = cells_to_sorted_positions(st, r.selected_cells);
            // Fresh tokens always go on; the selection decides among the older ones.
            sel.erase(std::remove_if(sel.begin(), sel.end(), [&](int32_t p) { return p >= p0; }), sel.end());
            c.stages[s + 1].selected = sel;
        }
    }
}

}  // namespace

// -- public --------------------------------------------------------------------------------------

static void configure_stages(Context & c, const std::vector<int> & layers, const std::vector<float> & keep) {
    const Hparams & hp = c.model->hp;
    for (auto & s : c.stages) free_stage(s);
    c.stages.clear();
    c.k.assign(hp.n_layer, nullptr);
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
        // A later stage starts with room for its share of a full context; decode and revival grow it.
        clear_stage_state(c, s);
        alloc_stage(c, s, std::min(pad_to(keep_count(s.keep, c.n_ctx), KV_PAD), pad_to(c.n_ctx, KV_PAD)));
    }
    if (c.buf_aux) ggml_backend_buffer_free(c.buf_aux);
    if (c.ctx_aux) ggml_free(c.ctx_aux);
    c.buf_aux = nullptr;
    c.ctx_aux = nullptr;
    c.aux.assign(c.stages.size(), nullptr);
    if (c.stages.size() > 1) {
        ggml_init_params ip = { ggml_tensor_overhead() * (c.stages.size() + 1), nullptr, true };
        c.ctx_aux = ggml_init(ip);
        for (size_t s = 1; s < c.stages.size(); ++s) c.aux[s] = ggml_new_tensor_2d(c.ctx_aux, GGML_TYPE_F32, hp.n_embd, c.n_ctx);
        c.buf_aux = ggml_backend_alloc_ctx_tensors_from_buft(c.ctx_aux, ggml_backend_get_default_buffer_type(compute_backend(c)));
        if (!c.buf_aux) throw Error(PLZ_ERR_RUNTIME, "out of memory allocating the aux cache");
    }
}

Context * new_context(Model * model, int n_ctx, int n_ubatch, int n_threads) {
    const Hparams & hp = model->hp;
    std::unique_ptr<Context> c(new Context());
    c->model = model;
    c->n_ctx = n_ctx;
    c->n_ubatch = n_ubatch;
    c->n_threads = n_threads;
    configure_stages(*c, {}, {});

    c->graph_size = std::max(2048, hp.n_layer * 64);
    c->graph_meta.resize(ggml_tensor_overhead() * c->graph_size + ggml_graph_overhead_custom(c->graph_size, false));
    std::vector<ggml_backend_t> backends;
    if (model->backend_gpu) backends.push_back(model->backend_gpu);
    backends.push_back(model->backend_cpu);
    c->sched = ggml_backend_sched_new(backends.data(), nullptr, (int) backends.size(), c->graph_size, false, true);
    if (!c->sched) throw Error(PLZ_ERR_RUNTIME, "cannot create the graph scheduler");
    return c.release();
}

void set_lazy(Context * c, const std::vector<int> & layers, const std::vector<float> & keep) {
    const int L = c->model->hp.n_layer;
    if (c->n_past != 0) throw Error(PLZ_ERR_ARG, "the lazy schedule can only change on an empty context (reset first)");
    if (layers.size() != keep.size()) throw Error(PLZ_ERR_ARG, "lazy layers and keep ratios differ in length");
    if (layers.size() > 32) throw Error(PLZ_ERR_ARG, "at most 32 pruning layers");
    for (size_t i = 0; i < layers.size(); ++i) {
        if (layers[i] < 0 || layers[i] >= L - 1) throw Error(PLZ_ERR_ARG, "pruning layer " + std::to_string(layers[i]) + " outside [0, n_layer-1)");
        if (i > 0 && layers[i] <= layers[i - 1]) throw Error(PLZ_ERR_ARG, "pruning layers must increase");
        if (!(keep[i] > 0.0f && keep[i] <= 1.0f)) throw Error(PLZ_ERR_ARG, "keep ratios must be in (0, 1]");
        if (i > 0 && keep[i] > keep[i - 1]) throw Error(PLZ_ERR_ARG, "keep ratios must not increase");
    }
    configure_stages(*c, layers, keep);
}

void reset(Context * c) {
    c->n_past = 0;
    c->n_prompt_lazy = 0;
    for (auto & s : c->stages) clear_stage_state(*c, s);
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
    const bool lazy = c->stages.size() > 1;
    if (lazy && all_logits) throw Error(PLZ_ERR_ARG, "all_logits is not available with lazy prefill (pruned tokens have no logits)");
    try {
        if (lazy && c->n_past == 0) {
            prefill_lazy(*c, tokens, n, logits_out);
            c->n_prompt_lazy = n;
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
