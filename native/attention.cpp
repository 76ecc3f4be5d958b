// KV cache formats and the attention op (see attention.h).
#include "attention.h"
#include "model.h"
#include "pylazy.h"

#include "ggml-alloc.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace plz {

void KvFormat::free() {
    if (buf) ggml_backend_buffer_free(buf);
    if (ctx) ggml_free(ctx);
    buf = nullptr;
    ctx = nullptr;
    had_k = had_v = nullptr;
}

bool kv_type_supported(int type) {
    switch (type) {
        case GGML_TYPE_F32: case GGML_TYPE_F16: case GGML_TYPE_BF16: case GGML_TYPE_Q8_0:
        case GGML_TYPE_Q4_0: case GGML_TYPE_Q4_1: case GGML_TYPE_Q5_0: case GGML_TYPE_Q5_1: case GGML_TYPE_IQ4_NL:
            return true;
        default:
            return false;
    }
}

namespace {

// The n x n Walsh-Hadamard matrix of Sylvester's construction, scaled to be orthonormal: entry (i, j) is
// +-1/sqrt(n), negative where i and j share an odd number of set bits. It is symmetric and its own inverse.
std::vector<float> hadamard(int n) {
    const float v = (float) (1.0 / std::sqrt((float) n));
    std::vector<float> h((size_t) n * n);
    for (int i = 0; i < n; ++i) {
        for (int j = 0; j < n; ++j) h[(size_t) i * n + j] = __builtin_popcount((unsigned) (i & j)) % 2 ? -v : v;
    }
    return h;
}

ggml_type checked_type(int type, const char * which, int head_dim) {
    const ggml_type t = type < 0 ? GGML_TYPE_F16 : (ggml_type) type;
    if (!kv_type_supported(type < 0 ? GGML_TYPE_F16 : type)) {
        throw Error(PLZ_ERR_ARG, std::string(which) + " " + std::to_string(type) + " is not a supported KV cache type "
                                 "(f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl)");
    }
    if (head_dim % ggml_blck_size(t) != 0) {
        throw Error(PLZ_ERR_ARG, std::string(which) + " " + ggml_type_name(t) + " needs a head size that is a multiple of " +
                                 std::to_string(ggml_blck_size(t)) + " (this model's is " + std::to_string(head_dim) + ")");
    }
    return t;
}

// The rotation llama.cpp applies with a quantized cache type: K by the largest power-of-two block
// (>= 64) dividing the head size, V by 64-blocks; none when the head size is not a multiple of 64 or
// LLAMA_ATTN_ROT_DISABLE is set (llama.cpp's switch, honoured so both sides stay alike).
void choose_rotation(KvFormat & f, int D) {
    const char * off = std::getenv("LLAMA_ATTN_ROT_DISABLE");
    if ((off && std::atoi(off) != 0) || D % 64 != 0) return;
    if (ggml_is_quantized(f.type_k)) {
        int n = 64;
        while (D % (2 * n) == 0) n *= 2;
        f.rot_k = n;
    }
    if (ggml_is_quantized(f.type_v)) f.rot_v = 64;
}

ggml_tensor * rotate(ggml_context * ctx0, ggml_tensor * t, ggml_tensor * had) {
    if (!had) return t;
    const int64_t n = had->ne[0];
    ggml_tensor * r = ggml_is_contiguous(t) ? ggml_reshape_2d(ctx0, t, n, ggml_nelements(t) / n)
                                            : ggml_cont_2d(ctx0, t, n, ggml_nelements(t) / n);
    r = ggml_mul_mat(ctx0, had, r);
    // The CPU backend then runs a fast Walsh-Hadamard transform instead of the product (as in llama.cpp).
    ggml_mul_mat_set_hint(r, GGML_HINT_SRC0_IS_HADAMARD);
    return ggml_reshape_4d(ctx0, r, t->ne[0], t->ne[1], t->ne[2], t->ne[3]);
}

}  // namespace

void configure_kv_format(KvFormat & out, const Model & m, bool flash, int type_k, int type_v) {
    const int D = m.hp.head_dim;
    KvFormat f;
    f.head_dim = D;
    f.n_head_kv = m.hp.n_head_kv;
    f.type_k = checked_type(type_k, "type_k", D);
    f.type_v = checked_type(type_v, "type_v", D);
    if (ggml_is_quantized(f.type_v) && !flash) {
        // A transposed V holds one value per cell and channel: it cannot be cut into quantization blocks.
        throw Error(PLZ_ERR_ARG, std::string("a quantized V cache (type_v ") + ggml_type_name(f.type_v) +
                                 ") needs flash attention (flash_attn=True), as in llama.cpp");
    }
    f.flash = flash;
    f.v_trans = !flash;
    choose_rotation(f, D);
    if (f.rot_k || f.rot_v) {
        ggml_init_params ip = { ggml_tensor_overhead() * 2, nullptr, true };
        f.ctx = ggml_init(ip);
        if (f.rot_k) f.had_k = ggml_new_tensor_2d(f.ctx, GGML_TYPE_F32, f.rot_k, f.rot_k);
        if (f.rot_v) f.had_v = ggml_new_tensor_2d(f.ctx, GGML_TYPE_F32, f.rot_v, f.rot_v);
        f.buf = ggml_backend_alloc_ctx_tensors_from_buft(f.ctx, ggml_backend_get_default_buffer_type(m.output_backend())  /* the scheduler copies them to other devices */);
        if (!f.buf) {
            f.free();
            throw Error(PLZ_ERR_RUNTIME, "out of memory allocating the KV rotation matrices");
        }
        for (ggml_tensor * t : { f.had_k, f.had_v }) {
            if (t) ggml_backend_tensor_set(t, hadamard((int) t->ne[0]).data(), 0, ggml_nbytes(t));
        }
    }
    out.free();
    out = f;
}

ggml_tensor * new_stage_cache(ggml_context * ctx, const KvFormat & f, bool is_v, int64_t cells) {
    const int64_t C = (int64_t) f.head_dim * f.n_head_kv;
    if (is_v && f.v_trans) return ggml_new_tensor_2d(ctx, f.type_v, cells, C);
    return ggml_new_tensor_2d(ctx, is_v ? f.type_v : f.type_k, C, cells);
}

ggml_tensor * new_recycled_cache(ggml_context * ctx, const KvFormat & f, bool is_v, int64_t cells) {
    const int D = f.head_dim, Hkv = f.n_head_kv;
    if (is_v && f.v_trans) return ggml_new_tensor_3d(ctx, f.type_v, cells, D, Hkv);
    return ggml_new_tensor_3d(ctx, is_v ? f.type_v : f.type_k, D, cells, Hkv);
}

int64_t cache_cells(const KvFormat & f, bool is_v, bool recycled, const ggml_tensor * t) {
    (void) recycled;
    return is_v && f.v_trans ? t->ne[0] : t->ne[1];
}

void copy_stage_cells(const KvFormat & f, bool is_v, ggml_tensor * from, ggml_tensor * to, int64_t n) {
    std::vector<uint8_t> tmp;
    if (!(is_v && f.v_trans)) {
        tmp.resize(from->nb[1] * (size_t) n);
        ggml_backend_tensor_get(from, tmp.data(), 0, tmp.size());
        ggml_backend_tensor_set(to, tmp.data(), 0, tmp.size());
        return;
    }
    // Transposed: every channel row keeps its first n cells (one read and one write of the whole tensor).
    std::vector<uint8_t> out(ggml_nbytes(to), 0);
    tmp.resize(ggml_nbytes(from));
    ggml_backend_tensor_get(from, tmp.data(), 0, tmp.size());
    const size_t bytes = ggml_row_size(from->type, n);
    for (int64_t ch = 0; ch < from->ne[1]; ++ch) std::memcpy(out.data() + ch * to->nb[1], tmp.data() + ch * from->nb[1], bytes);
    ggml_backend_tensor_set(to, out.data(), 0, out.size());
}

ggml_tensor * rotate_qk(ggml_context * ctx0, const KvFormat & f, ggml_tensor * t) { return rotate(ctx0, t, f.had_k); }
ggml_tensor * rotate_v(ggml_context * ctx0, const KvFormat & f, ggml_tensor * t) { return rotate(ctx0, t, f.had_v); }

ggml_tensor * v_operand(ggml_context * ctx0, const KvFormat & f, ggml_tensor * v, bool recycled, int64_t n_kv) {
    const int D = f.head_dim, Hkv = f.n_head_kv;
    if (f.v_trans) return ggml_view_3d(ctx0, v, n_kv, D, Hkv, v->nb[1], v->nb[1] * D, 0);   // [n_kv, D, Hkv]
    if (recycled) return ggml_view_3d(ctx0, v, D, n_kv, Hkv, v->nb[1], v->nb[2], 0);
    return v_stage_rows(ctx0, f, v, 0, n_kv);
}

ggml_tensor * v_stage_rows(ggml_context * ctx0, const KvFormat & f, ggml_tensor * v, int64_t c0, int64_t n) {
    const int D = f.head_dim, Hkv = f.n_head_kv;
    if (!f.v_trans) return ggml_view_3d(ctx0, v, D, n, Hkv, v->nb[1], ggml_row_size(v->type, D), (size_t) c0 * v->nb[1]);
    ggml_tensor * t = ggml_view_3d(ctx0, v, n, D, Hkv, v->nb[1], v->nb[1] * D, (size_t) c0 * ggml_element_size(v));
    return ggml_cont(ctx0, ggml_transpose(ctx0, t));
}

ggml_tensor * v_source(ggml_context * ctx0, const KvFormat & f, ggml_tensor * v_cur) {
    if (!f.v_trans) return v_cur;
    // [1, n, C]: each value a row of its own, so set_rows can place it in its channel's row of cells.
    return ggml_view_3d(ctx0, v_cur, 1, v_cur->ne[1], v_cur->ne[0], v_cur->nb[1], ggml_element_size(v_cur), 0);
}

ggml_tensor * v_source_cell(ggml_context * ctx0, const KvFormat & f, ggml_tensor * v, int64_t cell) {
    if (!f.v_trans) return ggml_view_2d(ctx0, v, v->ne[0], 1, v->nb[1], (size_t) cell * v->nb[1]);
    return ggml_view_3d(ctx0, v, 1, 1, v->ne[1], ggml_element_size(v), v->nb[1], (size_t) cell * ggml_element_size(v));
}

ggml_tensor * store_stage_v(ggml_context * ctx0, const KvFormat & f, ggml_tensor * v, ggml_tensor * src, ggml_tensor * idx) {
    if (!f.v_trans) return ggml_set_rows(ctx0, v, src, idx);
    ggml_tensor * dst = ggml_view_3d(ctx0, v, 1, v->ne[0], v->ne[1], ggml_element_size(v), v->nb[1], 0);   // [1, cells, C]
    return ggml_set_rows(ctx0, dst, src, idx);
}

ggml_tensor * store_recycled_v(ggml_context * ctx0, const KvFormat & f, ggml_tensor * rv, ggml_tensor * src, ggml_tensor * idx) {
    const int D = f.head_dim, Hkv = f.n_head_kv;
    if (!f.v_trans) {
        // [D * Hkv, 1] -> [D, 1, Hkv]: one row per KV head.
        return ggml_set_rows(ctx0, rv, ggml_view_3d(ctx0, src, D, 1, Hkv, src->nb[1], D * ggml_element_size(src), 0), idx);
    }
    ggml_tensor * dst = ggml_view_3d(ctx0, rv, 1, rv->ne[0], (int64_t) D * Hkv, ggml_element_size(rv), rv->nb[1], 0);
    return ggml_set_rows(ctx0, dst, src, idx);
}

ggml_tensor * put_recycled_v_rows(ggml_context * ctx0, const KvFormat & f, ggml_tensor * rv, ggml_tensor * rows) {
    const int64_t D = rows->ne[0], n = rows->ne[1], Hkv = rows->ne[2];
    if (!f.v_trans) return ggml_cpy(ctx0, rows, ggml_view_3d(ctx0, rv, D, n, Hkv, rv->nb[1], rv->nb[2], 0));
    return ggml_cpy(ctx0, ggml_transpose(ctx0, rows), ggml_view_3d(ctx0, rv, n, D, Hkv, rv->nb[1], rv->nb[2], 0));
}

ggml_tensor * build_attention(ggml_context * ctx0, const KvFormat & f, ggml_tensor * q, ggml_tensor * k, ggml_tensor * v,
                              ggml_tensor * mask, float kq_scale) {
    if (f.flash) {
        // llama.cpp hands flash attention F16 K/V when the cache is F32.
        if (k->type == GGML_TYPE_F32) k = ggml_cast(ctx0, k, GGML_TYPE_F16);
        if (v->type == GGML_TYPE_F32) v = ggml_cast(ctx0, v, GGML_TYPE_F16);
        ggml_tensor * attn = ggml_flash_attn_ext(ctx0, q, k, v, mask, kq_scale, 0.0f, 0.0f);
        ggml_prec_set_acc(attn, GGML_PREC_F32);
        return attn;
    }
    // llama.cpp's path without flash attention (build_attn_mha): the K rows of a KV head serve the
    // query heads of its group by mul_mat's broadcast over dim 2.
    ggml_tensor * kq = ggml_mul_mat(ctx0, k, q);                     // [n_kv, n, H]
    ggml_prec_set_acc(kq, GGML_PREC_F32);
    kq = ggml_soft_max_ext(ctx0, kq, mask, kq_scale, 0.0f);
    ggml_tensor * kqv = ggml_mul_mat(ctx0, v, kq);                   // [D, n, H]
    return ggml_cont(ctx0, ggml_permute(ctx0, kqv, 0, 2, 1, 3));     // [D, H, n]
}

void read_stage_cell(const KvFormat & f, const ggml_tensor * t, bool is_v, int64_t cell, float * out) {
    const int64_t C = (int64_t) f.head_dim * f.n_head_kv;
    const auto * traits = ggml_get_type_traits(t->type);
    std::vector<uint8_t> raw;
    if (is_v && f.v_trans) {
        const size_t es = ggml_element_size(t);
        raw.resize(es * C);
        for (int64_t ch = 0; ch < C; ++ch) ggml_backend_tensor_get(t, raw.data() + ch * es, ch * t->nb[1] + cell * es, es);
    } else {
        raw.resize(t->nb[1]);
        ggml_backend_tensor_get(t, raw.data(), (size_t) cell * t->nb[1], t->nb[1]);
    }
    if (t->type == GGML_TYPE_F32) std::memcpy(out, raw.data(), sizeof(float) * C);
    else traits->to_float(raw.data(), out, C);
    // Back to the model's basis: the rotation is its own inverse.
    const int n = is_v ? f.rot_v : f.rot_k;
    if (n == 0) return;
    const std::vector<float> h = hadamard(n);
    std::vector<float> tmp(n);
    for (int64_t b = 0; b < C; b += n) {
        for (int i = 0; i < n; ++i) {
            double s = 0;
            for (int j = 0; j < n; ++j) s += (double) h[(size_t) i * n + j] * out[b + j];
            tmp[i] = (float) s;
        }
        std::memcpy(out + b, tmp.data(), sizeof(float) * n);
    }
}

}  // namespace plz
