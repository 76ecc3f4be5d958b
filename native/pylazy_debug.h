// pylazy's test-only introspection: how a context's caches stand (stages, cells, K/V rows, the aux
// cache, the last refresh's picks). Exported from libpylazy with the C API (pylazy.h), bound in
// pylazy/_native.py like it; no production path needs them.
#pragma once
#include "pylazy.h"

#ifdef __cplusplus
extern "C" {
#endif

// Positions chosen per KV head at layer il by the last refresh: [n_head_kv, k]; -1 where the stage
// kept every token (no gather).
PLZ_API int  plz_recycle_positions(const plz_context * ctx, int32_t il, int32_t * positions);
// The query of the last refresh at layer il (after RoPE, as attention used it): [n_head * head_dim] F32.
PLZ_API int  plz_recycle_query(const plz_context * ctx, int32_t il, float * q);

// Stage s: layers [il0, il1), cells in use, positions selected into it at
// the last step (stage 0: none). cell_pos gets n_cells entries, selected n_selected.
PLZ_API int  plz_n_stages(const plz_context * ctx);
PLZ_API int  plz_stage_info(const plz_context * ctx, int32_t s, int32_t * il0, int32_t * il1, int32_t * n_cells, int32_t * n_selected);
PLZ_API int  plz_stage_positions(const plz_context * ctx, int32_t s, int32_t * cell_pos, int32_t * selected);
// K and V rows (as float, RoPE applied) of the tokens at `positions` in layer il: [n, head_dim * n_head_kv]
// each; an error if one of them was never computed at that layer.
PLZ_API int  plz_read_kv(const plz_context * ctx, int32_t il, int32_t n, const int32_t * positions, float * k, float * v);
// Hidden states entering stage s (s >= 1) saved in the aux cache: [n, n_embd].
PLZ_API int  plz_read_aux(const plz_context * ctx, int32_t s, int32_t n, const int32_t * positions, float * h);

#ifdef __cplusplus
}
#endif
