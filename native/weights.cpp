// Where CPU weights live: llama.cpp's choice (its model loader tries, per weight, the buffer types of
// make_cpu_buft_list in order and takes the first whose device supports the op that reads the weight).
// On a CPU-only machine that list is the CPU backend's "extra" buffer types, then the plain CPU buffer.
// An extra type (CPU_REPACK: Q4_0, IQ4_NL, Q4_K ... in interleaved layouts on AVX2 / NEON) changes the
// matmul kernel and so the logits' last bits: a weight must be placed where llama.cpp places it for
// pylazy's logits to equal llama.cpp's.
#include "model.h"

#include "ggml-cpu.h"

#include <cstdlib>
#include <cstring>
#include <memory>

namespace plz {

std::vector<ggml_backend_buffer_type_t> cpu_extra_bufts() {
    std::vector<ggml_backend_buffer_type_t> out;
    ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (!dev) return out;
    auto get = (ggml_backend_dev_get_extra_bufts_t) ggml_backend_reg_get_proc_address(ggml_backend_dev_backend_reg(dev),
                                                                                       "ggml_backend_dev_get_extra_bufts");
    for (ggml_backend_buffer_type_t * b = get ? get(dev) : nullptr; b && *b; ++b) out.push_back(*b);
    return out;
}

std::vector<ggml_backend_buffer_type_t> weight_extra_bufts() {
    std::vector<ggml_backend_buffer_type_t> out;
    // llama.cpp puts a GPU's pinned host buffer type ahead of the extra ones (and, with mmap, turns it
    // into a plain CPU buffer): with any GPU device present no CPU weight is repacked there.
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        if (ggml_backend_dev_type(ggml_backend_dev_get(i)) == GGML_BACKEND_DEVICE_TYPE_GPU) return out;
    }
    // llama.cpp 0.3.36's AMX matmul segfaulted on the AMX CPUs this project was first run on, so there
    // the reference runs with no extra buffer type at all (pylazy/llama_ref.py) and so does pylazy,
    // unless PYLAZY_AMX=1: the same kernels on both sides.
    const char * amx = std::getenv("PYLAZY_AMX");
    for (ggml_backend_buffer_type_t b : cpu_extra_bufts()) {
        if (std::strcmp(ggml_backend_buft_name(b), "AMX") == 0 && !(amx && std::strcmp(amx, "1") == 0)) return {};
        out.push_back(b);
    }
    return out;
}

// Whether the CPU device runs `op` (GGML_OP_MUL_MAT or GGML_OP_GET_ROWS) on a weight shaped like
// `meta` held in a buffer of type buft, asked as llama.cpp asks it: on a 512-row F32 operand, with a
// zero-size buffer of that type attached to the weight.
bool weight_supported(ggml_backend_buffer_type_t buft, const ggml_tensor * meta, ggml_op op) {
    ggml_init_params ip = { ggml_tensor_overhead() * 4, nullptr, true };
    std::unique_ptr<ggml_context, void (*)(ggml_context *)> ctx{ggml_init(ip), ggml_free};
    ggml_tensor * w = ggml_dup_tensor(ctx.get(), meta);
    ggml_tensor * t = op == GGML_OP_GET_ROWS
        ? ggml_get_rows(ctx.get(), w, ggml_new_tensor_1d(ctx.get(), GGML_TYPE_I32, 512))
        : ggml_mul_mat(ctx.get(), w, ggml_new_tensor_4d(ctx.get(), GGML_TYPE_F32, w->ne[0], 512, w->ne[2], w->ne[3]));
    ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft);
    if (!dev) dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    w->buffer = ggml_backend_buft_alloc_buffer(buft, 0);
    if (!w->buffer) return false;
    const bool ok = ggml_backend_dev_supports_op(dev, t);
    ggml_backend_buffer_free(w->buffer);
    w->buffer = nullptr;
    return ok;
}

ggml_backend_buffer_type_t pick_extra_buft(const std::vector<ggml_backend_buffer_type_t> & extras, const ggml_tensor * meta, ggml_op op) {
    for (ggml_backend_buffer_type_t b : extras) {
        if (weight_supported(b, meta, op)) return b;
    }
    return nullptr;
}

ggml_context * extra_weight_context(Model & m, const std::vector<ggml_backend_buffer_type_t> & extras, const ggml_tensor * meta,
                                    size_t ctx_size) {
    if (extras.empty() || ggml_n_dims(meta) < 2) return nullptr;
    ggml_backend_buffer_type_t b = pick_extra_buft(extras, meta, GGML_OP_MUL_MAT);
    if (!b) return nullptr;
    for (auto & e : m.ctx_extra) if (e.first == b) return e.second;
    ggml_init_params ip = { ctx_size, nullptr, true };
    m.ctx_extra.push_back({b, ggml_init(ip)});
    return m.ctx_extra.back().second;
}

}  // namespace plz
