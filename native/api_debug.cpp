// Test-only introspection of a context (pylazy_debug.h), exported from libpylazy like the C API.
#include "pylazy_debug.h"
#include "api_impl.h"

#include <algorithm>
#include <vector>

extern "C" {

// The context of a read of the last refresh at layer il, after checking there is one.
static const plz::Context & refreshed(const plz_context * ctx, int32_t il, const void * out) {
    plz_api::require(ctx && out, "null argument");
    const plz::Context & c = *ctx->c;
    plz_api::require(c.recycle().mode != plz::RecycleMode::Off && c.recycle().valid, "no recycled cache (recycling off or no refresh yet)");
    plz_api::require(il >= 0 && il < c.model()->hp.n_layer, "layer out of range");
    return c;
}

int plz_recycle_positions(const plz_context * ctx, int32_t il, int32_t * positions) {
    return plz_api::guarded([&] {
        const plz::Context & c = refreshed(ctx, il, positions);
        const plz::RecycleState & r = c.recycle();
        const plz::KvStore & kv = c.kv_store();
        const int s = kv.stage_of(il);
        const int n = r.k * c.model()->hp.n_head_kv;
        if (r.stage_all[s]) {
            std::fill(positions, positions + n, -1);
            return;
        }
        std::vector<int32_t> cells(n);
        plz_api::on_model(c.model(), [&] { ggml_backend_tensor_get(r.ridx[il], cells.data(), 0, sizeof(int32_t) * n); });
        for (int i = 0; i < n; ++i) positions[i] = kv.stages[s].cell_pos[cells[i]];
    });
}

int plz_recycle_query(const plz_context * ctx, int32_t il, float * q) {
    return plz_api::guarded([&] {
        const plz::Context & c = refreshed(ctx, il, q);
        plz_api::on_model(c.model(), [&] { ggml_backend_tensor_get(c.recycle().rq[il], q, 0, ggml_nbytes(c.recycle().rq[il])); });
    });
}

int plz_n_stages(const plz_context * ctx) { return ctx ? (int) ctx->c->kv_store().stages.size() : -1; }

static const plz::Stage & stage_at(const plz_context * ctx, int32_t s) {
    plz_api::require(ctx && s >= 0 && s < (int32_t) ctx->c->kv_store().stages.size(), "stage index out of range");
    return ctx->c->kv_store().stages[s];
}

int plz_stage_info(const plz_context * ctx, int32_t s, int32_t * il0, int32_t * il1, int32_t * n_cells, int32_t * n_selected) {
    return plz_api::guarded([&] {
        const plz::Stage & st = stage_at(ctx, s);
        if (il0) *il0 = st.il0;
        if (il1) *il1 = st.il1;
        if (n_cells) *n_cells = st.n_cells;
        if (n_selected) *n_selected = (int32_t) st.selected.size();
    });
}

int plz_stage_positions(const plz_context * ctx, int32_t s, int32_t * cell_pos, int32_t * selected) {
    return plz_api::guarded([&] {
        const plz::Stage & st = stage_at(ctx, s);
        if (cell_pos) std::copy(st.cell_pos.begin(), st.cell_pos.end(), cell_pos);
        if (selected) std::copy(st.selected.begin(), st.selected.end(), selected);
    });
}

int plz_read_kv(const plz_context * ctx, int32_t il, int32_t n, const int32_t * positions, float * k, float * v) {
    return plz_api::guarded([&] {
        plz_api::require(ctx && positions && k && v && n >= 0, "null argument");
        const plz::Context & c = *ctx->c;
        const plz::KvStore & kv = c.kv_store();
        plz_api::require(il >= 0 && il < c.model()->hp.n_layer, "layer out of range");
        const plz::Stage * st = &kv.stages[kv.stage_of(il)];
        const int64_t row = (int64_t) c.model()->hp.head_dim * c.model()->hp.n_head_kv;
        for (int32_t i = 0; i < n; ++i) {
            plz_api::require(positions[i] >= 0 && positions[i] < kv.n_ctx && st->pos_cell[positions[i]] >= 0,
                    "a requested token was never computed at that layer");
            plz_api::on_model(c.model(), [&] {
                plz::read_stage_cell(kv.fmt, kv.k[il], false, st->pos_cell[positions[i]], k + (size_t) i * row);
                plz::read_stage_cell(kv.fmt, kv.v[il], true, st->pos_cell[positions[i]], v + (size_t) i * row);
            });
        }
    });
}

int plz_read_aux(const plz_context * ctx, int32_t s, int32_t n, const int32_t * positions, float * h) {
    return plz_api::guarded([&] {
        plz_api::require(ctx && positions && h && n >= 0, "null argument");
        const plz::Context & c = *ctx->c;
        const plz::KvStore & kv = c.kv_store();
        plz_api::require(s >= 1 && s < (int32_t) kv.stages.size(), "aux cache exists for stages 1.. only");
        const plz::Stage & prev = kv.stages[s - 1];
        for (int32_t i = 0; i < n; ++i) {
            plz_api::require(positions[i] >= 0 && positions[i] < kv.n_ctx && prev.pos_cell[positions[i]] >= 0,
                    "no hidden state saved for a requested token");
            plz_api::on_model(c.model(), [&] {
                ggml_backend_tensor_get(kv.aux[s], h + (size_t) i * c.model()->hp.n_embd, (size_t) positions[i] * kv.aux[s]->nb[1],
                                        kv.aux[s]->nb[1]);
            });
        }
    });
}

}  // extern "C"
