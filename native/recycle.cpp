#include "recycle.h"
#ifdef PLZ_CUDA_GATHER
#include "gather_cuda.h"
#endif
#include "op_report.h"
#include "pylazy.h"

#include "ggml-alloc.h"

#include <algorithm>
#include <cmath>
#include <memory>

namespace plz {

void RecycleState::free_buffers() {
    for (auto * b : bufs) ggml_backend_buffer_free(b);
    if (ctx) ggml_free(ctx);
    bufs.clear();
    ctx = nullptr;
    rk.clear(); rv.clear(); rq.clear(); ridx.clear(); rk_bits.clear(); rv_bits.clear();
}

void RecycleState::configure(const KvStore & kv, RecycleMode mode_in, int k_in, int tail_in, int sinks_in, int pool_in, float share_in) {
    const Hparams & hp = kv.model->hp;
    RecycleState & r = *this;
    free_buffers();
    k = tail_cap = sinks = pool = rows = n_sel = n_tail = 0;
    share = 0.0f;
    valid = false;
    refresh_pos = -1;
    full_steps = recycled_steps = 0;
    pending.clear();
    stage_all.assign(kv.stages.size(), 0);
    mode = mode_in;
    if (mode == RecycleMode::Off) return;
    if (k_in < 1 || tail_in < 1 || sinks_in < 0 || sinks_in > k_in) throw Error(PLZ_ERR_ARG, "recycle: need k >= 1, tail >= 1, 0 <= sinks <= k");
    if (tail_in > kv.n_ctx) throw Error(PLZ_ERR_ARG, "recycle: the stride exceeds the context");
    if (pool_in < 0 || pool_in > 64) throw Error(PLZ_ERR_ARG, "recycle: pool must be in [0, 64]");
    if (!(share_in >= 0.0f && share_in <= 1.0f)) throw Error(PLZ_ERR_ARG, "recycle: share must be in [0, 1]");
    // k >= context keeps every token: no gather ever happens, so the cache need not be larger.
    k = std::min(k_in, kv.n_ctx);
    tail_cap = tail_in;
    sinks = sinks_in;
    pool = pool_in;
    share = share_in;
    rows = (k_in + tail_in + 255) / 256 * 256;  // CUDA flash attention wants a multiple of 256 keys
    const int L = hp.n_layer, D = hp.head_dim, Hkv = hp.n_head_kv;
    ggml_init_params ip = { ggml_tensor_overhead() * (6 * L + 1), nullptr, true };
    r.ctx = ggml_init(ip);
    for (int il = 0; il < L; ++il) {
        r.rk.push_back(new_recycled_cache(r.ctx, kv.fmt, false, r.rows));
        r.rv.push_back(new_recycled_cache(r.ctx, kv.fmt, true, r.rows));
        r.rq.push_back(ggml_new_tensor_1d(r.ctx, GGML_TYPE_F32, (int64_t) D * hp.n_head));
        r.ridx.push_back(ggml_new_tensor_2d(r.ctx, GGML_TYPE_I32, k_in, Hkv));
    }
    // Each layer's recycled cache on its layer's device (zeroed).
    std::vector<std::pair<ggml_tensor *, ggml_backend_t>> place;
    for (int il = 0; il < L; ++il) {
        for (ggml_tensor * t : {r.rk[il], r.rv[il], r.rq[il], r.ridx[il]}) place.push_back({t, kv.model->layer_backend(il)});
    }
    r.bufs = alloc_on_backends(place, "the recycled cache");
    for (int il = 0; il < L; ++il) {
        r.rk_bits.push_back(bits_alias(r.ctx, r.rk[il], D));
        r.rv_bits.push_back(kv.fmt.v_trans ? nullptr : bits_alias(r.ctx, r.rv[il], D));
    }
}

ggml_tensor * build_refresh_layer(ggml_context * ctx0, ggml_cgraph * gf, const RecycleState & r, const KvStore & kv, int il, ggml_tensor * q_last,
                                  ggml_tensor * kc) {
    const Hparams & hp = kv.model->hp;
    const int D = hp.head_dim, H = hp.n_head, Hkv = hp.n_head_kv;
    ggml_build_forward_expand(gf, ggml_cpy(ctx0, ggml_reshape_1d(ctx0, q_last, (int64_t) D * H), r.rq[il]));
    if (r.mode != RecycleMode::TopK) return nullptr;
    // The query heads of a KV head as G columns of one product: its K rows are read once, not G times.
    return ggml_mul_mat(ctx0, kc, ggml_reshape_3d(ctx0, q_last, D, H / Hkv, Hkv));   // [n_kv, G, Hkv]
}

// [n_kv]: per cell, the max over the rows of p [n_kv, rows].
static ggml_tensor * best_of_rows(ggml_context * ctx0, ggml_tensor * p) {
    const int64_t n_kv = p->ne[0], rows = p->ne[1];
    ggml_tensor * best = ggml_pool_2d(ctx0, ggml_reshape_3d(ctx0, p, n_kv, rows, 1), GGML_OP_POOL_MAX,
                                      1, (int) rows, 1, (int) rows, 0.0f, 0.0f);   // [n_kv, 1]
    return ggml_reshape_1d(ctx0, best, n_kv);
}

// Per (layer, KV head) row of [n_kv, rows]: the score of each cell, max over the query heads of the
// group of their attention probability, max-pooled over +-pool cells.
// with_share: add the share term, the best score taken from best_in ([n_kv], every stage) or this stack.
static ggml_tensor * refresh_scores(ggml_context * ctx0, const RecycleState & r, const std::vector<RefreshLayer> & layers,
                                    bool with_share, ggml_tensor * best_in) {
    ggml_tensor * l0 = layers[0].logits;
    const int64_t n_kv = l0->ne[0], G = l0->ne[1], Hkv = l0->ne[2], per_layer = G * Hkv;
    const int64_t n_rows = per_layer * (int64_t) layers.size();
    // Stack: the first layer padded to all rows, the others copied into place. As 2-D blocks of rows:
    // ggml-vulkan's SET (0.25.3) places a source element by the destination's row stride and writes
    // only its first row, so a 1-D source longer than a row (set_1d) lost the other rows there.
    ggml_tensor * all = ggml_pad(ctx0, ggml_reshape_2d(ctx0, l0, n_kv, per_layer), 0, (int) (n_rows - per_layer), 0, 0);
    for (size_t j = 1; j < layers.size(); ++j) {
        all = ggml_set_2d_inplace(ctx0, all, ggml_reshape_2d(ctx0, layers[j].logits, n_kv, per_layer), all->nb[1],
                                  (size_t) j * per_layer * all->nb[1]);
    }
    ggml_tensor * p = ggml_soft_max_ext(ctx0, ggml_reshape_3d(ctx0, all, n_kv, 1, n_rows), layers[0].mask, layers[0].kq_scale, 0.0f);
    // A refresh query attends to where the answer *starts*; the tokens right after it are read by the
    // next steps but score low now (a copied number is read one digit per step). Max-pooling along the
    // cells (SnapKV clusters scores the same way) brings them in; cells are in position order except
    // where lazy revival appended cells out of order. (Two pools, heads then cells: one 2-D pool over
    // both reads G x (2 pool + 1) values per cell, slower on the CPU, where pools run on one thread.)
    p = ggml_pool_2d(ctx0, ggml_reshape_3d(ctx0, p, n_kv, G, n_rows / G), GGML_OP_POOL_MAX, 1, (int) G, 1, (int) G, 0.0f, 0.0f);
    p = ggml_reshape_2d(ctx0, p, n_kv, n_rows / G);   // [n_kv, Hkv * n_layers]
    if (r.pool > 0) p = ggml_pool_1d(ctx0, p, GGML_OP_POOL_MAX, 2 * r.pool + 1, 1, r.pool);
    // share > 0: every row also scores share x the cell's best score over all layers and KV heads. The
    // refresh query of a middle layer often does not attend to what that layer reads in the next steps
    // (a needle the upper layers already attend to); shared, such a cell is kept in every layer.
    if (with_share && r.share > 0.0f) {
        ggml_tensor * best = best_in ? best_in : best_of_rows(ctx0, p);
        p = ggml_add(ctx0, p, ggml_scale(ctx0, ggml_reshape_2d(ctx0, best, n_kv, 1), r.share));
    }
    return p;
}

ggml_tensor * build_refresh_best(ggml_context * ctx0, const RecycleState & r, const std::vector<RefreshLayer> & layers) {
    return best_of_rows(ctx0, refresh_scores(ctx0, r, layers, false, nullptr));
}

// Per KV head, the cells idx [n_take, Hkv] of a stage cache (rows: its [D, n_kv, Hkv] rows) into the first
// n_take rows of a recycled cache. Through the I32 aliases where there are some: bytes copied as they are
// (a whole block placed straight on the recycled cache's memory; quantized rows need this, a round trip
// through F32 could requantize them differently). Otherwise through F32 rows, exact for float types.
static void gather_rows(ggml_context * ctx0, ggml_cgraph * gf, const RecycleState & r, const KvStore & kv, bool is_v, ggml_tensor * src_bits, ggml_tensor * dst_bits,
                        ggml_tensor * rows_src, ggml_tensor * dst, ggml_tensor * idx, bool whole) {
    const int D = kv.model->hp.head_dim, Hkv = kv.model->hp.n_head_kv;
    const int64_t n_take = idx->ne[0], n_kv = rows_src->ne[1];
    const bool float_type = !ggml_is_quantized(dst->type);
    if (src_bits && dst_bits && (whole || !float_type)) {
        const int64_t hi = (int64_t) (ggml_row_size(dst->type, D) / sizeof(int32_t));
        ggml_tensor * src = ggml_view_3d(ctx0, src_bits, hi, n_kv, Hkv, src_bits->nb[1], hi * sizeof(int32_t), 0);
        ggml_tensor * rows = ggml_get_rows(ctx0, src, idx);   // [hi, n_take, Hkv] I32
        if (whole) {
            // get_rows' result has the recycled cache's shape: it is placed on that memory as a view of it
            // (the allocator leaves a tensor that has memory alone), so the rows land there with no copy,
            // and the tail row written after it (write_tail_row) is ordered after it on every backend.
            place_as_view(rows, dst, 0);
            ggml_build_forward_expand(gf, rows);
        } else {
            ggml_build_forward_expand(gf, ggml_cpy(ctx0, rows, ggml_view_3d(ctx0, dst_bits, hi, n_take, Hkv, dst_bits->nb[1], dst_bits->nb[2], 0)));
        }
        return;
    }
    ggml_tensor * rows = ggml_get_rows(ctx0, rows_src, idx);   // [D, n_take, Hkv] F32
    if (is_v) {
        ggml_build_forward_expand(gf, put_recycled_v_rows(ctx0, kv.fmt, dst, rows));
    } else {
        ggml_build_forward_expand(gf, ggml_cpy(ctx0, rows, ggml_view_3d(ctx0, dst, D, n_take, Hkv, dst->nb[1], dst->nb[2], 0)));
    }
}

// The refresh token's K/V into the first tail row (row k): from the fresh rows, or copied from its stage cell.
static void write_tail_row(ggml_context * ctx0, ggml_cgraph * gf, const RecycleState & r, const KvStore & kv, const RefreshLayer & l, const RecycleInputs & in) {
    const int il = l.il, D = kv.model->hp.head_dim, Hkv = kv.model->hp.n_head_kv;
    if (l.src_cell < 0) {
        ggml_build_forward_expand(gf, ggml_set_rows(ctx0, r.rk[il], l.k_fresh, in.tail_row));
        ggml_build_forward_expand(gf, store_recycled_v(ctx0, kv.fmt, r.rv[il], l.v_fresh, in.tail_row));
        return;
    }
    ggml_tensor * k = kv.k[il], * v = kv.v[il], * rk = r.rk[il], * rv = r.rv[il];
    ggml_build_forward_expand(gf, ggml_cpy(ctx0, ggml_view_3d(ctx0, k, D, 1, Hkv, k->nb[1], ggml_row_size(k->type, D), (size_t) l.src_cell * k->nb[1]),
                                           ggml_view_3d(ctx0, rk, D, 1, Hkv, rk->nb[1], rk->nb[2], (size_t) r.k * rk->nb[1])));
    if (kv.fmt.v_trans) {
        const size_t es = ggml_element_size(v);
        ggml_build_forward_expand(gf, ggml_cpy(ctx0, ggml_view_3d(ctx0, v, 1, D, Hkv, v->nb[1], v->nb[1] * D, (size_t) l.src_cell * es),
                                               ggml_view_3d(ctx0, rv, 1, D, Hkv, rv->nb[1], rv->nb[2], (size_t) r.k * es)));
    } else {
        ggml_build_forward_expand(gf, ggml_cpy(ctx0, ggml_view_3d(ctx0, v, D, 1, Hkv, v->nb[1], ggml_row_size(v->type, D), (size_t) l.src_cell * v->nb[1]),
                                               ggml_view_3d(ctx0, rv, D, 1, Hkv, rv->nb[1], rv->nb[2], (size_t) r.k * rv->nb[1])));
    }
}

ggml_tensor * build_refresh_gather(ggml_context * ctx0, ggml_cgraph * gf, const RecycleState & r, const KvStore & kv, const std::vector<RefreshLayer> & layers,
                                   const RecycleInputs & in) {
    if (layers.empty()) return nullptr;
    const int Hkv = kv.model->hp.n_head_kv;
    const int n_kv = (int) layers[0].kc->ne[1];
    // Top-k mode with at least R candidates takes the top R per head, not k, and gathers all R rows:
    // the gathered block [D, R, Hkv] then has the recycled cache's layout and is written in place
    // there. It is gathered as I32 (the *_bits views, gather_rows), so the rows go over bit for bit
    // with no F32 round trip (get_rows of F16 returns F32: the F32 block plus its F16 conversion cost
    // ~9 ms of a 64K refresh on the H100). Rows k.. are overwritten by the tail and masked until then.
    const bool whole = r.mode == RecycleMode::TopK && n_kv >= r.rows;
    const int n_take = whole ? r.rows : r.k;
    ggml_tensor * idx_all = nullptr;   // [n_take, Hkv * n_layers]
    if (r.mode == RecycleMode::TopK) idx_all = ggml_argsort_top_k(ctx0, ggml_add(ctx0, refresh_scores(ctx0, r, layers, true, in.best), in.bias), n_take);
    // On CUDA the copies (and the refresh token's tail row) are one kernel after the graph.
    ggml_tensor * kernel_idx = whole && r.cuda_gather ? idx_all->view_src : nullptr;
    if (kernel_idx) {
        ggml_set_output(kernel_idx);
        ggml_build_forward_expand(gf, kernel_idx);
    }
    for (size_t j = 0; j < layers.size(); ++j) {
        const int il = layers[j].il;
        // Layer j's rows of idx_all (a strided view of the sort: get_rows and cpy take strides).
        ggml_tensor * idx = idx_all ? ggml_view_2d(ctx0, idx_all, n_take, Hkv, idx_all->nb[1], j * Hkv * idx_all->nb[1])
                                    : in.host_idx;
        // The chosen cells, for plz_recycle_positions: the first k per head.
        ggml_build_forward_expand(gf, ggml_cpy(ctx0, ggml_view_2d(ctx0, idx, r.k, Hkv, idx->nb[1], 0), r.ridx[il]));
        if (kernel_idx) continue;
        gather_rows(ctx0, gf, r, kv, false, kv.k_bits[il], r.rk_bits[il], layers[j].kc, r.rk[il], idx, whole);
        gather_rows(ctx0, gf, r, kv, true, kv.v_bits[il], r.rv_bits[il], layers[j].vc, r.rv[il], idx, whole);
        // The refresh token is the first tail row (row k), written after the gather (graph order: the
        // gather of a whole block wrote that row too).
        write_tail_row(ctx0, gf, r, kv, layers[j], in);
    }
    return kernel_idx;
}

ggml_tensor * build_recycled_attention(ggml_context * ctx0, ggml_cgraph * gf, const RecycleState & r, const KvStore & kv, int il,
                                       ggml_tensor * q, ggml_tensor * k_fresh, ggml_tensor * v_fresh,
                                       const RecycleInputs & in, float kq_scale) {
    ggml_build_forward_expand(gf, ggml_set_rows(ctx0, r.rk[il], ggml_permute(ctx0, k_fresh, 0, 2, 1, 3), in.tail_row));
    ggml_build_forward_expand(gf, store_recycled_v(ctx0, kv.fmt, r.rv[il], v_fresh, in.tail_row));
    return build_attention(ctx0, kv.fmt, q, r.rk[il], v_operand(ctx0, kv.fmt, r.rv[il], true, r.rows), in.mask, kq_scale);
}

ggml_tensor * build_query_similarity(ggml_context * ctx0, const RecycleState & r, int il, ggml_tensor * q) {
    ggml_tensor * a = ggml_reshape_1d(ctx0, q, ggml_nelements(q));
    ggml_tensor * b = r.rq[il];
    ggml_tensor * dot = ggml_sum(ctx0, ggml_mul(ctx0, a, b));
    ggml_tensor * norms = ggml_sqrt(ctx0, ggml_mul(ctx0, ggml_sum(ctx0, ggml_sqr(ctx0, a)), ggml_sum(ctx0, ggml_sqr(ctx0, b))));
    return ggml_div(ctx0, dot, norms);
}

// -- step bookkeeping ------------------------------------------------------------------------------

void RecycleState::reset(int n_stages) {
    valid = false;
    n_tail = 0;
    stage_all.assign(n_stages, 0);
    full_steps = recycled_steps = 0;
}

StepKind RecycleState::choose(StepKind asked) const {
    StepKind kind = asked;
    if (mode == RecycleMode::Off) kind = StepKind::Full;
    else if (kind == StepKind::Full) kind = StepKind::Refresh;   // with a recycled cache, a full step refills it
    if (kind == StepKind::Recycled && (!valid || n_tail >= tail_cap)) kind = StepKind::Refresh;
    return kind;
}

void RecycleState::count(StepKind ran, int pos) {
    if (ran == StepKind::Refresh) {
        valid = true;
        n_tail = 1;
        refresh_pos = pos;
        ++full_steps;
    } else if (ran == StepKind::Recycled) {
        ++n_tail;
        ++recycled_steps;
    } else {
        ++full_steps;
    }
}

// -- host-side inputs ------------------------------------------------------------------------------

std::vector<float> refresh_bias(const ggml_fp16_t * last, int n_kv, int own_cell) {
    const ggml_fp16_t zero = ggml_fp32_to_fp16(0.0f);
    std::vector<float> bias(n_kv, FORCE_OUT);
    for (int j = 0; j < n_kv; ++j) if (last[j] == zero && j != own_cell) bias[j] = 0.0f;
    return bias;
}

InputRecycle::InputRecycle(ggml_context * ctx0, const RecycleState & r, const KvStore & kv, const Segment & sg)
    : r(r), kv(kv), kind(sg.b.kind), rows(r.rows), n_kv(sg.n_kv) {
    t.tail_row = new_input(ctx0, GGML_TYPE_I64, 1, 1, "rec_tail_row");
    if (kind == StepKind::Recycled) t.mask = new_input(ctx0, GGML_TYPE_F16, r.rows, 1, "rec_mask");
    if (kind == StepKind::Refresh && r.mode == RecycleMode::TopK) t.bias = new_input(ctx0, GGML_TYPE_F32, n_kv, 1, "rec_bias");
    if (kind == StepKind::Refresh && r.mode == RecycleMode::Window) t.host_idx = new_input(ctx0, GGML_TYPE_I32, r.k, kv.model->hp.n_head_kv, "rec_idx");
}

bool InputRecycle::can_reuse(const Segment & sg) const {
    return sg.b.kind == kind && sg.n_kv == n_kv && r.rows == rows;
}

// Host-side inputs of a Refresh or Recycled step (one fresh row: the last of the batch).
void InputRecycle::set_input(const Segment & sg) {
    const Stage & st = kv.stages[sg.b.stage];
    const int own_cell = sg.own_cell();
    const ggml_fp16_t zero = ggml_fp32_to_fp16(0.0f), ninf = ggml_fp32_to_fp16(-INFINITY);
    const int64_t tail_row = sg.b.kind == StepKind::Refresh ? r.k : r.k + r.n_tail;
    plz::set_input(t.tail_row, &tail_row, sizeof(int64_t));
    if (t.mask) {
        std::vector<ggml_fp16_t> m(r.rows, ninf);
        for (int i = 0; i < r.k + r.n_tail + 1; ++i) m[i] = zero;
        plz::set_input(t.mask, m.data(), sizeof(ggml_fp16_t) * m.size());
    }
    if (t.bias) {
        std::vector<float> bias = refresh_bias(sg.last_mask_row(), sg.n_kv, own_cell);
        plz::set_input(t.bias, bias.data(), sizeof(float) * bias.size());
    }
    if (t.host_idx) {
        const ggml_fp16_t * last = sg.last_mask_row();
        std::vector<std::pair<int32_t, int32_t>> cand;  // (position, cell)
        for (int j = 0; j < st.n_cells; ++j) if (last[j] == zero && j != own_cell) cand.push_back({st.cell_pos[j], j});
        std::sort(cand.begin(), cand.end());
        std::vector<int32_t> keep;
        for (int i = 0; i < r.sinks; ++i) keep.push_back(cand[i].second);
        for (size_t i = cand.size() - (r.k - r.sinks); i < cand.size(); ++i) keep.push_back(cand[i].second);
        std::vector<int32_t> idx;
        for (int h = 0; h < kv.model->hp.n_head_kv; ++h) idx.insert(idx.end(), keep.begin(), keep.end());
        plz::set_input(t.host_idx, idx.data(), sizeof(int32_t) * idx.size());
    }
}

// -- after the graph -------------------------------------------------------------------------------

void RecycleState::run_cuda_gather(const KvStore & kv, const std::vector<RefreshLayer> & layers, const ggml_tensor * sorted,
                                   int own_cell) const {
#ifdef PLZ_CUDA_GATHER
    std::vector<plz_gather_layer> ptrs;
    for (const auto & l : layers) ptrs.push_back({kv.k[l.il]->data, kv.v[l.il]->data, rk[l.il]->data, rv[l.il]->data});
    const Hparams & hp = kv.model->hp;
    if (!plz_cuda_gather(ptrs.data(), (int) ptrs.size(), (const int32_t *) sorted->data, sorted->nb[1] / sizeof(int32_t),
                         rows, hp.n_head_kv, hp.head_dim * (int) sizeof(ggml_fp16_t), kv.k[layers[0].il]->nb[1], k, own_cell)) {
        throw Error(PLZ_ERR_RUNTIME, "the CUDA refresh gather failed");
    }
#else
    GGML_UNUSED(kv); GGML_UNUSED(layers); GGML_UNUSED(sorted); GGML_UNUSED(own_cell);
    throw Error(PLZ_ERR_RUNTIME, "internal: CUDA gather requested in a build without it");
#endif
}

void RecycleState::keep_pending_pick(const Segment & sg, const std::vector<RefreshLayer> & layers, ggml_tensor * best) {
    const int n_kv = sg.n_kv;
    PendingPick pk;
    pk.stage = sg.b.stage;
    pk.n_kv = n_kv;
    pk.own_cell = sg.own_cell();
    for (const auto & l : layers) pk.layers.push_back(l.il);
    pk.kq_scale = layers[0].kq_scale;
    const ggml_fp16_t * last = sg.last_mask_row();
    pk.mask_row.assign(last, last + n_kv);
    pk.best.resize(n_kv);
    ggml_backend_tensor_get(best, pk.best.data(), 0, sizeof(float) * n_kv);
    pending.push_back(std::move(pk));
}

// The deferred refresh picks (RecycleState::pending): a token's best score over every stage's layers,
// then per stage one graph that recomputes the stage's scores from the queries the refresh stored
// (rq) and its cache, adds share x that best score and gathers as build_refresh_gather does. The
// scores are the same ops on the same values as in the stage's refresh graph, so with one stage's
// worth of layers this equals the single-graph refresh bit for bit.
void RecycleState::refresh_picks(const KvStore & kv, ggml_backend_sched_t sched, std::vector<uint8_t> & meta, int graph_size, int n_past) {
    RecycleState & r = *this;
    const Hparams & hp = kv.model->hp;
    const int D = hp.head_dim, H = hp.n_head, Hkv = hp.n_head_kv;
    std::vector<float> best_pos(n_past + 1, -INFINITY);   // by position, over every stage
    for (const auto & pk : r.pending) {
        const Stage & st = kv.stages[pk.stage];
        for (int j = 0; j < std::min(pk.n_kv, st.n_cells); ++j) {
            best_pos[st.cell_pos[j]] = std::max(best_pos[st.cell_pos[j]], pk.best[j]);
        }
    }
    for (const auto & pk : r.pending) {
        const Stage & st = kv.stages[pk.stage];
        std::vector<float> best = pk.best;   // padding cells keep the stage's own value (never candidates)
        for (int j = 0; j < std::min(pk.n_kv, st.n_cells); ++j) best[j] = best_pos[st.cell_pos[j]];

        ggml_backend_sched_reset(sched);
        ggml_init_params ip = { meta.size(), meta.data(), true };
        std::unique_ptr<ggml_context, void (*)(ggml_context *)> ctx{ggml_init(ip), ggml_free};
        ggml_context * ctx0 = ctx.get();
        ggml_cgraph * gf = ggml_new_graph_custom(ctx0, graph_size, false);
        ggml_tensor * mask = new_input(ctx0, GGML_TYPE_F16, pk.n_kv, 1, "pick_mask");
        RecycleInputs in;
        in.bias = new_input(ctx0, GGML_TYPE_F32, pk.n_kv, 1, "pick_bias");
        in.best = new_input(ctx0, GGML_TYPE_F32, pk.n_kv, 1, "pick_best");
        in.tail_row = new_input(ctx0, GGML_TYPE_I64, 1, 1, "pick_tail_row");
        std::vector<RefreshLayer> layers;
        for (int il : pk.layers) {
            ggml_tensor * kc = kv.k_rows(ctx0, il, pk.n_kv);
            ggml_tensor * logits = ggml_mul_mat(ctx0, kc, ggml_reshape_3d(ctx0, r.rq[il], D, H / Hkv, Hkv));
            // The refresh token's K/V are copied from its cell (the refresh graph wrote them there).
            RefreshLayer l{il, kc, kv.v_rows(ctx0, il, pk.n_kv), logits, nullptr, nullptr, mask, pk.kq_scale};
            l.src_cell = pk.own_cell;
            layers.push_back(l);
        }
        ggml_tensor * sorted = build_refresh_gather(ctx0, gf, r, kv, layers, in);
        if (!ggml_backend_sched_alloc_graph(sched, gf)) throw Error(PLZ_ERR_RUNTIME, "cannot allocate the refresh picks graph");
        const int64_t tail_row = r.k;
        set_input(mask, pk.mask_row.data(), sizeof(ggml_fp16_t) * pk.n_kv);
        const std::vector<float> bias = refresh_bias(pk.mask_row.data(), pk.n_kv, pk.own_cell);
        set_input(in.bias, bias.data(), sizeof(float) * pk.n_kv);
        set_input(in.best, best.data(), sizeof(float) * pk.n_kv);
        set_input(in.tail_row, &tail_row, sizeof(int64_t));
        op_report_note(gf);
        check_status(ggml_backend_sched_graph_compute(sched, gf), "refresh picks");
        if (sorted) run_cuda_gather(kv, layers, sorted, pk.own_cell);
    }
    r.pending.clear();
}

}  // namespace plz
