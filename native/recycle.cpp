#include "recycle.h"
#include "context.h"
#include "pylazy.h"

#include "ggml-alloc.h"

#include <algorithm>

namespace plz {

void RecycleState::free_buffers() {
    if (buf) ggml_backend_buffer_free(buf);
    if (ctx) ggml_free(ctx);
    buf = nullptr;
    ctx = nullptr;
    rk.clear(); rv.clear(); rq.clear(); ridx.clear();
}

void configure_recycle(Context & c, int mode, int k, int tail_cap, int sinks, int pool) {
    const Hparams & hp = c.model->hp;
    RecycleState & r = c.rec;
    r.free_buffers();
    r = RecycleState();
    r.mode = mode;
    if (mode == 0) return;
    if (k < 1 || tail_cap < 1 || sinks < 0 || sinks > k) throw Error(PLZ_ERR_ARG, "recycle: need k >= 1, tail >= 1, 0 <= sinks <= k");
    if (tail_cap > c.n_ctx) throw Error(PLZ_ERR_ARG, "recycle: the stride exceeds the context");
    if (pool < 0 || pool > 64) throw Error(PLZ_ERR_ARG, "recycle: pool must be in [0, 64]");
    // k >= context keeps every token: no gather ever happens, so the cache need not be larger.
    r.k = std::min(k, c.n_ctx);
    r.tail_cap = tail_cap;
    r.sinks = sinks;
    r.pool = pool;
    r.rows = (k + tail_cap + 255) / 256 * 256;  // CUDA flash attention wants a multiple of 256 keys
    const int L = hp.n_layer, D = hp.head_dim, Hkv = hp.n_head_kv;
    ggml_init_params ip = { ggml_tensor_overhead() * (4 * L + 1), nullptr, true };
    r.ctx = ggml_init(ip);
    for (int il = 0; il < L; ++il) {
        r.rk.push_back(ggml_new_tensor_3d(r.ctx, GGML_TYPE_F16, D, r.rows, Hkv));
        r.rv.push_back(ggml_new_tensor_3d(r.ctx, GGML_TYPE_F16, D, r.rows, Hkv));
        r.rq.push_back(ggml_new_tensor_1d(r.ctx, GGML_TYPE_F32, (int64_t) D * hp.n_head));
        r.ridx.push_back(ggml_new_tensor_2d(r.ctx, GGML_TYPE_I32, k, Hkv));
    }
    ggml_backend_t be = c.model->backend_gpu ? c.model->backend_gpu : c.model->backend_cpu;
    r.buf = ggml_backend_alloc_ctx_tensors_from_buft(r.ctx, ggml_backend_get_default_buffer_type(be));
    if (!r.buf) throw Error(PLZ_ERR_RUNTIME, "out of memory allocating the recycled cache");
    ggml_backend_buffer_clear(r.buf, 0);
}

ggml_tensor * build_refresh_layer(ggml_context * ctx0, ggml_cgraph * gf, Context & c, int il, ggml_tensor * q_last,
                                  ggml_tensor * kc, ggml_tensor * mask_last, ggml_tensor * k_fresh,
                                  ggml_tensor * v_fresh, const RecycleInputs & in, int n_kv, float kq_scale) {
    const Hparams & hp = c.model->hp;
    RecycleState & r = c.rec;
    const int D = hp.head_dim, H = hp.n_head, Hkv = hp.n_head_kv, G = H / Hkv;
    GGML_UNUSED(k_fresh);
    GGML_UNUSED(v_fresh);   // written as the first tail row by build_refresh_gather, after the gather
    ggml_build_forward_expand(gf, ggml_cpy(ctx0, ggml_reshape_1d(ctx0, q_last, (int64_t) D * H), r.rq[il]));
    if (r.mode != 1) return nullptr;
    // Scores of the one query: [n_kv, 1, H] -> per KV head the max over its G query heads.
    ggml_tensor * p = ggml_soft_max_ext(ctx0, ggml_mul_mat(ctx0, kc, q_last), mask_last, kq_scale, 0.0f);
    p = ggml_cont(ctx0, ggml_permute(ctx0, ggml_reshape_3d(ctx0, p, n_kv, G, Hkv), 1, 0, 2, 3));  // [G, n_kv, Hkv]
    p = ggml_pool_1d(ctx0, ggml_reshape_2d(ctx0, p, G, (int64_t) n_kv * Hkv), GGML_OP_POOL_MAX, G, G, 0);
    p = ggml_reshape_2d(ctx0, p, n_kv, Hkv);
    // A refresh query attends to where the answer *starts*; the tokens right after it are read by the
    // next steps but score low now (a copied number is read one digit per step). Max-pooling along the
    // cells (SnapKV clusters scores the same way) brings them in; cells are in position order except
    // where lazy revival appended cells out of order.
    if (r.pool > 0) p = ggml_pool_1d(ctx0, p, GGML_OP_POOL_MAX, 2 * r.pool + 1, 1, r.pool);
    return ggml_add(ctx0, p, in.bias);
}

void build_refresh_gather(ggml_context * ctx0, ggml_cgraph * gf, Context & c, const std::vector<RefreshLayer> & layers,
                          const RecycleInputs & in) {
    if (layers.empty()) return;
    RecycleState & r = c.rec;
    const int D = c.model->hp.head_dim, Hkv = c.model->hp.n_head_kv;
    const int n_kv = (int) layers[0].kc->ne[1];
    // Top-k mode with at least R candidates takes the top R per head, not k, and gathers all R rows:
    // the gathered block [D, R, Hkv] then matches the recycled cache's layout, so the F32 -> F16 copy
    // into it is contiguous (ggml's fast path; the strided copy into [D, k, Hkv] of [D, R, Hkv] cost
    // 6 ms of a 64K refresh on the H100). Rows k.. are overwritten by the tail and masked until then.
    const bool whole = r.mode == 1 && n_kv >= r.rows;
    const int n_take = whole ? r.rows : r.k;
    ggml_tensor * idx_all = nullptr;   // [n_take, Hkv * n_layers]
    if (r.mode == 1) {
        // Stack the scores [n_kv, Hkv] of all layers (pairwise concat: log2(L) copies) and sort once.
        std::vector<ggml_tensor *> level;
        for (const auto & l : layers) level.push_back(l.score);
        while (level.size() > 1) {
            std::vector<ggml_tensor *> next;
            for (size_t i = 0; i + 1 < level.size(); i += 2) next.push_back(ggml_concat(ctx0, level[i], level[i + 1], 1));
            if (level.size() % 2) next.push_back(level.back());
            level.swap(next);
        }
        idx_all = ggml_argsort_top_k(ctx0, level[0], n_take);
    }
    for (size_t j = 0; j < layers.size(); ++j) {
        const int il = layers[j].il;
        ggml_tensor * idx = idx_all ? ggml_cont(ctx0, ggml_view_2d(ctx0, idx_all, n_take, Hkv, idx_all->nb[1], j * Hkv * idx_all->nb[1]))
                                    : in.host_idx;
        // The chosen cells, for plz_recycle_positions: the first k per head.
        ggml_build_forward_expand(gf, ggml_cpy(ctx0, ggml_view_2d(ctx0, idx, r.k, Hkv, idx->nb[1], 0), r.ridx[il]));
        // get_rows over [D, n_kv, Hkv] with indices [n_take, Hkv]: per KV head its own cells.
        ggml_tensor * dst_k = ggml_view_3d(ctx0, r.rk[il], D, n_take, Hkv, r.rk[il]->nb[1], r.rk[il]->nb[2], 0);
        ggml_tensor * dst_v = ggml_view_3d(ctx0, r.rv[il], D, n_take, Hkv, r.rv[il]->nb[1], r.rv[il]->nb[2], 0);
        ggml_tensor * out_k = ggml_cpy(ctx0, ggml_get_rows(ctx0, layers[j].kc, idx), dst_k);
        ggml_tensor * out_v = ggml_cpy(ctx0, ggml_get_rows(ctx0, layers[j].vc, idx), dst_v);
        ggml_build_forward_expand(gf, out_k);
        ggml_build_forward_expand(gf, out_v);
        // The refresh token is the first tail row (row k), written after the gather: with `whole` the
        // gather wrote that row too, so the write goes through the copy's result to order it after it.
        ggml_tensor * tk = whole ? out_k : r.rk[il];
        ggml_tensor * tv = whole ? out_v : r.rv[il];
        ggml_build_forward_expand(gf, ggml_set_rows(ctx0, tk, layers[j].k_fresh, in.tail_row));
        ggml_build_forward_expand(gf, ggml_set_rows(ctx0, tv, layers[j].v_fresh, in.tail_row));
    }
}

ggml_tensor * build_recycled_attention(ggml_context * ctx0, ggml_cgraph * gf, Context & c, int il,
                                       ggml_tensor * q, ggml_tensor * k_fresh, ggml_tensor * v_fresh,
                                       const RecycleInputs & in, float kq_scale) {
    RecycleState & r = c.rec;
    ggml_build_forward_expand(gf, ggml_set_rows(ctx0, r.rk[il], ggml_permute(ctx0, k_fresh, 0, 2, 1, 3), in.tail_row));
    ggml_build_forward_expand(gf, ggml_set_rows(ctx0, r.rv[il], ggml_permute(ctx0, v_fresh, 0, 2, 1, 3), in.tail_row));
    ggml_tensor * attn = ggml_flash_attn_ext(ctx0, q, r.rk[il], r.rv[il], in.mask, kq_scale, 0.0f, 0.0f);
    ggml_prec_set_acc(attn, GGML_PREC_F32);
    return attn;
}

ggml_tensor * build_query_similarity(ggml_context * ctx0, Context & c, int il, ggml_tensor * q) {
    ggml_tensor * a = ggml_reshape_1d(ctx0, q, ggml_nelements(q));
    ggml_tensor * b = c.rec.rq[il];
    ggml_tensor * dot = ggml_sum(ctx0, ggml_mul(ctx0, a, b));
    ggml_tensor * norms = ggml_sqrt(ctx0, ggml_mul(ctx0, ggml_sum(ctx0, ggml_sqr(ctx0, a)), ggml_sum(ctx0, ggml_sqr(ctx0, b))));
    return ggml_div(ctx0, dot, norms);
}

}  // namespace plz
