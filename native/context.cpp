// The forward pass: one graph per ubatch chunk, read top to bottom in build_layer().
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

int pad_to(int x, int m) { return (x + m - 1) / m * m; }

struct Inputs {
    ggml_tensor * tokens = nullptr;   // I32 [n]
    ggml_tensor * pos = nullptr;      // I32 [n]   RoPE positions
    ggml_tensor * cells = nullptr;    // I64 [n]   cell each token's K/V is written to
    ggml_tensor * mask = nullptr;     // F16 [n_kv, n]
};

ggml_tensor * new_input(ggml_context * ctx0, ggml_type type, int64_t ne0, int64_t ne1, const char * name) {
    ggml_tensor * t = ne1 > 1 ? ggml_new_tensor_2d(ctx0, type, ne0, ne1) : ggml_new_tensor_1d(ctx0, type, ne0);
    ggml_set_name(t, name);
    ggml_set_input(t);
    return t;
}

// One transformer block on hidden states x [n_embd, n] whose tokens attend to the first n_kv cells.
ggml_tensor * build_layer(ggml_context * ctx0, ggml_cgraph * gf, const Context & c, int il,
                          ggml_tensor * x, const Inputs & in, int n_kv) {
    const Model & m = *c.model;
    const Hparams & hp = m.hp;
    const LayerWeights & L = m.layers[il];
    const int n = (int) x->ne[1], D = hp.head_dim, H = hp.n_head, Hkv = hp.n_head_kv;

    ggml_tensor * cur = ggml_mul(ctx0, ggml_rms_norm(ctx0, x, hp.rms_eps), L.attn_norm);
    ggml_tensor * q = ggml_reshape_3d(ctx0, ggml_mul_mat(ctx0, L.wq, cur), D, H, n);
    ggml_tensor * k = ggml_reshape_3d(ctx0, ggml_mul_mat(ctx0, L.wk, cur), D, Hkv, n);
    ggml_tensor * v = ggml_mul_mat(ctx0, L.wv, cur);
    q = ggml_rope_ext(ctx0, q, in.pos, nullptr, hp.rope_dim, hp.rope_mode, hp.n_ctx_train,
                      hp.rope_base, hp.rope_freq_scale, 0.0f, 1.0f, 32.0f, 1.0f);
    k = ggml_rope_ext(ctx0, k, in.pos, nullptr, hp.rope_dim, hp.rope_mode, hp.n_ctx_train,
                      hp.rope_base, hp.rope_freq_scale, 0.0f, 1.0f, 32.0f, 1.0f);

    // Write this chunk's K/V into its cells first; the attention below reads the cache after it.
    ggml_build_forward_expand(gf, ggml_set_rows(ctx0, c.k[il], ggml_reshape_2d(ctx0, k, D * Hkv, n), in.cells));
    ggml_build_forward_expand(gf, ggml_set_rows(ctx0, c.v[il], v, in.cells));

    // Cache rows viewed as [D, n_kv, Hkv]: per KV head, one row per cell.
    const size_t esz = ggml_element_size(c.k[il]);
    ggml_tensor * kc = ggml_view_3d(ctx0, c.k[il], D, n_kv, Hkv, c.k[il]->nb[1], D * esz, 0);
    ggml_tensor * vc = ggml_view_3d(ctx0, c.v[il], D, n_kv, Hkv, c.v[il]->nb[1], D * esz, 0);
    q = ggml_permute(ctx0, q, 0, 2, 1, 3);  // [D, n, H]
    ggml_tensor * attn = ggml_flash_attn_ext(ctx0, q, kc, vc, in.mask, 1.0f / std::sqrt((float) D), 0.0f, 0.0f);
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

struct Graph {
    std::unique_ptr<ggml_context, void (*)(ggml_context *)> ctx{nullptr, ggml_free};
    ggml_cgraph * gf = nullptr;
    Inputs in;
    ggml_tensor * logits = nullptr;
};

// Graph for n tokens through every layer; logits for all rows, the last row, or none.
Graph build_full_graph(Context & c, int n, int n_kv, int n_logits) {
    Graph g;
    ggml_init_params ip = { c.graph_meta.size(), c.graph_meta.data(), true };
    g.ctx.reset(ggml_init(ip));
    ggml_context * ctx0 = g.ctx.get();
    g.gf = ggml_new_graph_custom(ctx0, c.graph_size, false);
    g.in.tokens = new_input(ctx0, GGML_TYPE_I32, n, 1, "tokens");
    g.in.pos    = new_input(ctx0, GGML_TYPE_I32, n, 1, "pos");
    g.in.cells  = new_input(ctx0, GGML_TYPE_I64, n, 1, "cells");
    g.in.mask   = new_input(ctx0, GGML_TYPE_F16, n_kv, n, "mask");

    ggml_tensor * x = ggml_get_rows(ctx0, c.model->tok_embd, g.in.tokens);
    for (int il = 0; il < c.model->hp.n_layer; ++il) x = build_layer(ctx0, g.gf, c, il, x, g.in, n_kv);
    if (n_logits > 0) {
        if (n_logits < n) x = ggml_view_2d(ctx0, x, x->ne[0], n_logits, x->nb[1], (n - n_logits) * x->nb[1]);
        g.logits = build_logits(ctx0, *c.model, x);
        ggml_set_output(g.logits);
        ggml_build_forward_expand(g.gf, g.logits);
    } else {
        ggml_build_forward_expand(g.gf, x);
    }
    return g;
}

void check_status(ggml_status st, const char * what) {
    if (st != GGML_STATUS_SUCCESS) throw Error(PLZ_ERR_RUNTIME, std::string(what) + " failed (ggml status " + std::to_string((int) st) + ")");
}

}  // namespace

Context::~Context() {
    if (sched) ggml_backend_sched_free(sched);
    if (buf_kv) ggml_backend_buffer_free(buf_kv);
    if (ctx_kv) ggml_free(ctx_kv);
}

Context * new_context(Model * model, int n_ctx, int n_ubatch, int n_threads) {
    const Hparams & hp = model->hp;
    std::unique_ptr<Context> c(new Context());
    c->model = model;
    c->n_ctx = n_ctx;
    c->n_ubatch = n_ubatch;
    c->n_threads = n_threads;

    Stage full;
    full.il0 = 0;
    full.il1 = hp.n_layer;
    full.capacity = pad_to(n_ctx, KV_PAD);
    c->stages.push_back(full);

    ggml_init_params ip = { ggml_tensor_overhead() * (2 * hp.n_layer + 1), nullptr, true };
    c->ctx_kv = ggml_init(ip);
    for (int il = 0; il < hp.n_layer; ++il) {
        const int cap = c->stages[0].capacity;
        c->k.push_back(ggml_new_tensor_2d(c->ctx_kv, GGML_TYPE_F16, (int64_t) hp.head_dim * hp.n_head_kv, cap));
        c->v.push_back(ggml_new_tensor_2d(c->ctx_kv, GGML_TYPE_F16, (int64_t) hp.head_dim * hp.n_head_kv, cap));
    }
    ggml_backend_t compute = model->backend_gpu ? model->backend_gpu : model->backend_cpu;
    c->buf_kv = ggml_backend_alloc_ctx_tensors_from_buft(c->ctx_kv, ggml_backend_get_default_buffer_type(compute));
    if (!c->buf_kv) throw Error(PLZ_ERR_RUNTIME, "out of memory allocating the KV cache for n_ctx=" + std::to_string(n_ctx));
    // Unused cells are masked, but 0 * NaN is still NaN inside some attention kernels: start from zeros.
    ggml_backend_buffer_clear(c->buf_kv, 0);

    c->graph_size = std::max(2048, hp.n_layer * 64);
    c->graph_meta.resize(ggml_tensor_overhead() * c->graph_size + ggml_graph_overhead_custom(c->graph_size, false));

    std::vector<ggml_backend_t> backends;
    if (model->backend_gpu) backends.push_back(model->backend_gpu);
    backends.push_back(model->backend_cpu);
    c->sched = ggml_backend_sched_new(backends.data(), nullptr, (int) backends.size(), c->graph_size, false, true);
    if (!c->sched) throw Error(PLZ_ERR_RUNTIME, "cannot create the graph scheduler");

    // Reserve compute buffers for the largest prefill chunk so the first eval does not re-plan.
    Graph g = build_full_graph(*c, std::min(n_ubatch, c->stages[0].capacity), c->stages[0].capacity, 1);
    if (!ggml_backend_sched_reserve(c->sched, g.gf)) throw Error(PLZ_ERR_RUNTIME, "out of memory reserving compute buffers");
    return c.release();
}

void reset(Context * c) {
    c->n_past = 0;
    for (auto & s : c->stages) {
        s.n_cells = 0;
        s.cell_pos.clear();
    }
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
    Stage & st = c->stages[0];
    std::vector<int32_t> pos;
    std::vector<int64_t> cells;
    std::vector<ggml_fp16_t> mask;
    const ggml_fp16_t zero = ggml_fp32_to_fp16(0.0f), ninf = ggml_fp32_to_fp16(-INFINITY);

    for (int s = 0; s < n; s += c->n_ubatch) {
        const int nc = std::min(c->n_ubatch, n - s);
        const bool last_chunk = s + nc == n;
        const int n_logits = all_logits ? nc : (last_chunk ? 1 : 0);
        const int n_kv = std::min(pad_to(st.n_cells + nc, KV_PAD), st.capacity);

        pos.resize(nc);
        cells.resize(nc);
        for (int i = 0; i < nc; ++i) {
            pos[i] = c->n_past + s + i;
            cells[i] = st.n_cells + i;
        }
        st.cell_pos.insert(st.cell_pos.end(), pos.begin(), pos.end());
        mask.assign((size_t) n_kv * nc, ninf);
        for (int i = 0; i < nc; ++i) {
            for (int j = 0; j < st.n_cells + nc; ++j) {
                if (st.cell_pos[j] <= pos[i]) mask[(size_t) i * n_kv + j] = zero;
            }
        }

        ggml_backend_sched_reset(c->sched);
        Graph g = build_full_graph(*c, nc, n_kv, n_logits);
        if (!ggml_backend_sched_alloc_graph(c->sched, g.gf)) throw Error(PLZ_ERR_RUNTIME, "cannot allocate the compute graph");
        ggml_backend_tensor_set(g.in.tokens, tokens + s, 0, sizeof(int32_t) * nc);
        ggml_backend_tensor_set(g.in.pos, pos.data(), 0, sizeof(int32_t) * nc);
        ggml_backend_tensor_set(g.in.cells, cells.data(), 0, sizeof(int64_t) * nc);
        ggml_backend_tensor_set(g.in.mask, mask.data(), 0, sizeof(ggml_fp16_t) * mask.size());
        check_status(ggml_backend_sched_graph_compute(c->sched, g.gf), "graph compute");
        st.n_cells += nc;

        if (n_logits > 0) {
            float * dst = logits_out + (all_logits ? (size_t) s * hp.n_vocab : 0);
            ggml_backend_tensor_get(g.logits, dst, 0, sizeof(float) * (size_t) n_logits * hp.n_vocab);
        }
    }
    c->n_past += n;
}

}  // namespace plz
