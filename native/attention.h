// How K/V are stored and attended, chosen per context (plz_context_params) as llama.cpp chooses them:
//  - flash attention (ggml_flash_attn_ext), or llama.cpp's default path: kq = mul_mat(k, q),
//    soft_max_ext(kq, mask, scale), kqv = mul_mat(v^T, kq);
//  - the cache types (type_k / type_v: F16, Q8_0, Q4_0, ...);
//  - without flash attention V is stored transposed (llama.cpp's v_trans): one row of cells per channel,
//    so kqv reads rows of cells as they lie, with no per-step copy of the cache;
//  - with a quantized K (V) cache, llama.cpp rotates q and k (v and the attention output) by a
//    Walsh-Hadamard matrix before they meet the cache (an orthonormal change of basis that spreads
//    outliers over a quantization block); pylazy does the same, or its logits would not match.
// Views of a layer's cache are per KV head: K always [D, n, Hkv] (a row of D per cell and head); V the
// same, or [n, D, Hkv] transposed.
#pragma once
#include "ggml.h"
#include "ggml-backend.h"

namespace plz {

struct Model;

struct KvFormat {
    int head_dim = 0, n_head_kv = 0;      // D and Hkv of the model
    bool flash = false;
    ggml_type type_k = GGML_TYPE_F16, type_v = GGML_TYPE_F16;
    bool v_trans = false;                 // V cache [cells, D * Hkv] (no flash attention)
    int rot_k = 0, rot_v = 0;             // Hadamard block size for q/k and for v (0: none)
    ggml_tensor * had_k = nullptr, * had_v = nullptr;   // [rot, rot] F32, on the compute device
    ggml_context * ctx = nullptr;
    ggml_backend_buffer_t buf = nullptr;
    void free();
};

// Validates and sets `out` for model m (Error PLZ_ERR_ARG on a type or combination llama.cpp would refuse).
// type_k / type_v are ggml_type values (< 0: F16).
void configure_kv_format(KvFormat & out, const Model & m, bool flash, int type_k, int type_v);

// The types a KV cache may have, for messages and the Python side.
bool kv_type_supported(int type);

// A new K or V cache of a stage ([D * Hkv, cells], V transposed: [cells, D * Hkv]) or of the recycled
// cache ([D, cells, Hkv], V transposed: [cells, D, Hkv]).
ggml_tensor * new_stage_cache(ggml_context * ctx, const KvFormat & f, bool is_v, int64_t cells);
ggml_tensor * new_recycled_cache(ggml_context * ctx, const KvFormat & f, bool is_v, int64_t cells);
// Copies the first n cells of a stage cache into a larger one (host round trip; reallocation only).
void copy_stage_cells(const KvFormat & f, bool is_v, ggml_tensor * from, ggml_tensor * to, int64_t n);
// Cell count of a stage or recycled cache tensor.
int64_t cache_cells(const KvFormat & f, bool is_v, bool recycled, const ggml_tensor * t);

// q and k (after RoPE) or v / the attention output, rotated when the cache type asks for it.
ggml_tensor * rotate_qk(ggml_context * ctx0, const KvFormat & f, ggml_tensor * t);
ggml_tensor * rotate_v(ggml_context * ctx0, const KvFormat & f, ggml_tensor * t);

// The V operand of attention over the first n_kv cells of a stage cache or a recycled cache.
ggml_tensor * v_operand(ggml_context * ctx0, const KvFormat & f, ggml_tensor * v, bool recycled, int64_t n_kv);
// V of stage cells [c0, c0 + n) as rows [D, n, Hkv] (a view, or a copy out of the transposed layout).
ggml_tensor * v_stage_rows(ggml_context * ctx0, const KvFormat & f, ggml_tensor * v, int64_t c0, int64_t n);

// A value source for store_stage_v / store_recycled_v: fresh rows v_cur [D * Hkv, n] (any row stride),
// or the value held by one stage cell.
ggml_tensor * v_source(ggml_context * ctx0, const KvFormat & f, ggml_tensor * v_cur);
ggml_tensor * v_source_cell(ggml_context * ctx0, const KvFormat & f, ggml_tensor * v, int64_t cell);
// Writes a value source into stage cells idx (I64 [n]) / recycled rows idx (I64 [1]).
ggml_tensor * store_stage_v(ggml_context * ctx0, const KvFormat & f, ggml_tensor * v, ggml_tensor * src, ggml_tensor * idx);
ggml_tensor * store_recycled_v(ggml_context * ctx0, const KvFormat & f, ggml_tensor * rv, ggml_tensor * src, ggml_tensor * idx);
// Copies F32 rows [D, n, Hkv] into the first n rows of a recycled V cache.
ggml_tensor * put_recycled_v_rows(ggml_context * ctx0, const KvFormat & f, ggml_tensor * rv, ggml_tensor * rows);

// Attention of q [D, n, H] over k [D, n_kv, Hkv] and v (v_operand) under mask [n_kv, n]; [D, H, n].
ggml_tensor * build_attention(ggml_context * ctx0, const KvFormat & f, ggml_tensor * q, ggml_tensor * k, ggml_tensor * v,
                              ggml_tensor * mask, float kq_scale);

// Host side: one cell of a stage cache t (a layer's K or V) as floats [D * Hkv] (dequantized, un-rotated: the model's K/V).
void read_stage_cell(const KvFormat & f, const ggml_tensor * t, bool is_v, int64_t cell, float * out);

}  // namespace plz
