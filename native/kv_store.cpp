// The KV store (see kv_store.h): stage caches, the aux cache, the causal mask template.
#include "kv_store.h"
#include "pylazy.h"

#include <string>

namespace plz {

// An I32 tensor over the memory of an allocated cache tensor (four bytes of a row as one int).
ggml_tensor * bits_alias(ggml_context * ctx, ggml_tensor * t, int D) {
    if (ggml_row_size(t->type, D) % sizeof(int32_t) != 0) return nullptr;
    ggml_tensor * a = ggml_new_tensor_4d(ctx, GGML_TYPE_I32, ggml_row_size(t->type, t->ne[0]) / sizeof(int32_t), t->ne[1], t->ne[2], t->ne[3]);
    place_as_view(a, t, 0);
    return a;
}

void place_as_view(ggml_tensor * a, ggml_tensor * t, size_t offs) {
    ggml_tensor * base = t->view_src ? t->view_src : t;
    offs += t->view_src ? t->view_offs : 0;
    if (a->buffer || a->data || !base->buffer || offs + ggml_nbytes(a) > ggml_nbytes(base)) {
        throw Error(PLZ_ERR_RUNTIME, "internal: cannot alias a cache tensor");
    }
    // ggml has no typed view of another type: the fields a ggml_view_* result would carry, then the
    // view's own initialisation on the buffer (data = base data + offset).
    a->view_src = base;
    a->view_offs = offs;
    if (ggml_backend_view_init(a) != GGML_STATUS_SUCCESS) throw Error(PLZ_ERR_RUNTIME, "cannot alias a cache tensor");
}

KvStore::~KvStore() {
    fmt.free();
    for (auto & s : stages) free_stage(s);
    free_aux();
    if (buf_tpl) ggml_backend_buffer_free(buf_tpl);
    if (ctx_tpl) ggml_free(ctx_tpl);
}

void KvStore::free_stage(Stage & s) {
    for (auto * b : s.bufs) ggml_backend_buffer_free(b);
    if (s.ctx) ggml_free(s.ctx);
    s.bufs.clear();
    s.ctx = nullptr;
}

void KvStore::free_aux() {
    for (auto * b : bufs_aux) ggml_backend_buffer_free(b);
    if (ctx_aux) ggml_free(ctx_aux);
    bufs_aux.clear();
    ctx_aux = nullptr;
}

void KvStore::alloc_stage(int si, int capacity) {
    ++generation;
    Stage & s = stages[si];
    const int D = model->hp.head_dim;
    ggml_init_params ip = { ggml_tensor_overhead() * (4 * (s.il1 - s.il0) + 1), nullptr, true };
    ggml_context * ctx = ggml_init(ip);
    std::vector<ggml_tensor *> nk, nv;
    for (int il = s.il0; il < s.il1; ++il) {
        nk.push_back(new_stage_cache(ctx, fmt, false, capacity));
        nv.push_back(new_stage_cache(ctx, fmt, true, capacity));
    }
    // Each layer's K/V on its layer's device (zeroed: unused cells are masked, but 0 * NaN is NaN in some kernels).
    std::vector<std::pair<ggml_tensor *, ggml_backend_t>> place;
    for (int il = s.il0; il < s.il1; ++il) {
        place.push_back({nk[il - s.il0], model->layer_backend(il)});
        place.push_back({nv[il - s.il0], model->layer_backend(il)});
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
            copy_stage_cells(fmt, false, k[il], nk[il - s.il0], s.n_cells);
            copy_stage_cells(fmt, true, v[il], nv[il - s.il0], s.n_cells);
        }
    }
    free_stage(s);
    s.ctx = ctx;
    s.bufs = bufs;
    s.capacity = capacity;
    for (int il = s.il0; il < s.il1; ++il) {
        k[il] = nk[il - s.il0];
        v[il] = nv[il - s.il0];
        k_bits[il] = bits_alias(ctx, k[il], D);
        v_bits[il] = fmt.v_trans ? nullptr : bits_alias(ctx, v[il], D);
    }
}

void KvStore::ensure_capacity(int si, int need) {
    const Stage & s = stages[si];
    if (need <= s.capacity) return;
    const int grown = std::max(need, s.capacity + s.capacity / 2);
    alloc_stage(si, std::min(pad_to(grown, KV_PAD), pad_to(n_ctx, KV_PAD)));
}

void KvStore::clear_stage(Stage & s) const {
    s.n_cells = 0;
    s.cell_pos.clear();
    s.sorted = true;
    s.identity = true;
    s.pos_cell.assign(n_ctx, -1);
    s.selected.clear();
    s.revived = 0;
}

void KvStore::clear() {
    for (auto & s : stages) clear_stage(s);
}

void KvStore::truncate(int n) {
    Stage & st = stages[0];
    for (int i = n; i < st.n_cells; ++i) st.pos_cell[st.cell_pos[i]] = -1;
    st.cell_pos.resize(n);
    st.n_cells = n;
}

void KvStore::configure(const std::vector<int> & layers, const std::vector<float> & keep) {
    ++generation;
    const Hparams & hp = model->hp;
    for (auto & s : stages) free_stage(s);
    stages.clear();
    k.assign(hp.n_layer, nullptr);
    k_bits.assign(hp.n_layer, nullptr);
    v_bits.assign(hp.n_layer, nullptr);
    v.assign(hp.n_layer, nullptr);
    int il0 = 0;
    for (size_t i = 0; i <= layers.size(); ++i) {
        Stage s;
        s.il0 = il0;
        s.il1 = i < layers.size() ? layers[i] + 1 : hp.n_layer;
        s.keep = i == 0 ? 1.0f : keep[i - 1];
        il0 = s.il1;
        stages.push_back(std::move(s));
    }
    for (size_t s = 0; s < stages.size(); ++s) {
        // Stage 0 holds every token; a later stage is sized by each lazy prefill (prefill_lazy).
        clear_stage(stages[s]);
        alloc_stage((int) s, s == 0 ? pad_to(n_ctx, KV_PAD) : std::min(KV_PAD, pad_to(n_ctx, KV_PAD)));
    }
    free_aux();
    aux.assign(stages.size(), nullptr);
    if (stages.size() > 1) {
        ggml_init_params ip = { ggml_tensor_overhead() * (stages.size() + 1), nullptr, true };
        ctx_aux = ggml_init(ip);
        // aux[s] is read (revival) by stage s's first layer: on its device.
        std::vector<std::pair<ggml_tensor *, ggml_backend_t>> place;
        for (size_t s = 1; s < stages.size(); ++s) {
            aux[s] = ggml_new_tensor_2d(ctx_aux, GGML_TYPE_F32, hp.n_embd, n_ctx);
            place.push_back({aux[s], model->layer_backend(stages[s].il0)});
        }
        bufs_aux = alloc_on_backends(place, "the aux cache");
    }
}

void KvStore::make_causal_template(int n_ubatch) {
    tpl_shift = pad_to(n_ctx, KV_PAD);
    const int64_t W = tpl_shift + n_ubatch + KV_PAD, R = n_ubatch;
    ggml_init_params ip = { ggml_tensor_overhead() * 2, nullptr, true };
    ctx_tpl = ggml_init(ip);
    causal_tpl = ggml_new_tensor_2d(ctx_tpl, GGML_TYPE_F16, W, R);
    buf_tpl = ggml_backend_alloc_ctx_tensors_from_buft(ctx_tpl, ggml_backend_get_default_buffer_type(model->output_backend()));
    if (!buf_tpl) throw Error(PLZ_ERR_RUNTIME, "out of memory allocating the causal mask template");
    const ggml_fp16_t zero = ggml_fp32_to_fp16(0.0f), ninf = ggml_fp32_to_fp16(-INFINITY);
    std::vector<ggml_fp16_t> row(W);
    for (int64_t i = 0; i < R; ++i) {
        for (int64_t j = 0; j < W; ++j) row[j] = j <= tpl_shift + i ? zero : ninf;
        ggml_backend_tensor_set(causal_tpl, row.data(), (size_t) i * causal_tpl->nb[1], sizeof(ggml_fp16_t) * W);
    }
}

std::vector<int64_t> KvStore::assign_cells(int si, const std::vector<int32_t> & pos) {
    const int n = (int) pos.size();
    ensure_capacity(si, stages[si].n_cells + n);
    Stage & st = stages[si];
    std::vector<int64_t> cells(n);
    for (int i = 0; i < n; ++i) {
        if (st.pos_cell[pos[i]] >= 0) throw Error(PLZ_ERR_RUNTIME, "internal: token computed twice at a layer");
        if (!st.cell_pos.empty() && pos[i] < st.cell_pos.back()) st.sorted = false;
        if (pos[i] != st.n_cells + i) st.identity = false;
        cells[i] = st.n_cells + i;
        st.pos_cell[pos[i]] = st.n_cells + i;
        st.cell_pos.push_back(pos[i]);
    }
    st.n_cells += n;
    return cells;
}

int KvStore::stage_of(int il) const {
    int s = 0;
    while (!(il >= stages[s].il0 && il < stages[s].il1)) ++s;
    return s;
}

bool KvStore::stage_has_swa(int s) const {
    for (int il = stages[s].il0; il < stages[s].il1; ++il) if (model->hp.is_swa(il)) return true;
    return false;
}

ggml_tensor * KvStore::k_rows(ggml_context * ctx0, int il, int64_t n) const {
    ggml_tensor * t = k[il];
    const int D = fmt.head_dim, Hkv = fmt.n_head_kv;
    return ggml_view_3d(ctx0, t, D, n, Hkv, t->nb[1], ggml_row_size(t->type, D), 0);
}

}  // namespace plz
