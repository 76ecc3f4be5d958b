// GGUF loading: metadata and tensor table through ggml's gguf API, every key and shape the
// graph uses checked before any byte of tensor data is read.
#include "model.h"
#include "arch.h"
#include "pylazy.h"
#include "rpc.h"

#include "ggml-alloc.h"
#include "ggml-cpu.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>

namespace plz {

static Error load_error(const std::string & msg) { return Error(PLZ_ERR_LOAD, msg); }

Model::~Model() {
    for (auto * b : buffers) ggml_backend_buffer_free(b);
    if (ctx_cpu) ggml_free(ctx_cpu);
    for (auto * c : ctx_dev) if (c) ggml_free(c);
    for (auto & e : ctx_extra) ggml_free(e.second);
    for (auto * b : backends) if (b) ggml_backend_free(b);
    if (backend_cpu) ggml_backend_free(backend_cpu);
}

ggml_backend_t Model::single_backend() const {
    for (int il = 1; il <= hp.n_layer; ++il) if (layer_dev[il] != layer_dev[0]) return nullptr;
    return layer_backend(0);
}

void set_cpu_threads(ggml_backend_t cpu, int n_threads) {
    ggml_backend_cpu_set_n_threads(cpu, n_threads);
}

namespace {

struct GgufReader {
    gguf_context * g;
    std::string arch;

    int64_t find(const std::string & key) const { return gguf_find_key(g, key.c_str()); }

    // Any integer type is accepted (files in the wild use u32, i32 and u64 for the same keys).
    bool get_int(const std::string & key, int64_t & out) const {
        int64_t id = find(key);
        if (id < 0) return false;
        switch (gguf_get_kv_type(g, id)) {
            case GGUF_TYPE_UINT8:  out = gguf_get_val_u8(g, id);  break;
            case GGUF_TYPE_INT8:   out = gguf_get_val_i8(g, id);  break;
            case GGUF_TYPE_UINT16: out = gguf_get_val_u16(g, id); break;
            case GGUF_TYPE_INT16:  out = gguf_get_val_i16(g, id); break;
            case GGUF_TYPE_UINT32: out = gguf_get_val_u32(g, id); break;
            case GGUF_TYPE_INT32:  out = gguf_get_val_i32(g, id); break;
            case GGUF_TYPE_UINT64: {
                uint64_t v = gguf_get_val_u64(g, id);
                if (v > (uint64_t) INT64_MAX) throw load_error("metadata '" + key + "' is out of range");
                out = (int64_t) v; break;
            }
            case GGUF_TYPE_INT64:  out = gguf_get_val_i64(g, id); break;
            default: throw load_error("metadata '" + key + "' must be an integer");
        }
        return true;
    }
    int req_int(const std::string & key, int64_t lo, int64_t hi) const {
        int64_t v;
        if (!get_int(arch + "." + key, v)) throw load_error("missing metadata '" + arch + "." + key + "'");
        if (v < lo || v > hi) {
            throw load_error("metadata '" + arch + "." + key + "' = " + std::to_string(v) +
                             " is outside [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
        }
        return (int) v;
    }
    bool get_float(const std::string & key, float & out) const {
        int64_t id = find(key);
        if (id < 0) return false;
        switch (gguf_get_kv_type(g, id)) {
            case GGUF_TYPE_FLOAT32: out = gguf_get_val_f32(g, id); break;
            case GGUF_TYPE_FLOAT64: out = (float) gguf_get_val_f64(g, id); break;
            default: throw load_error("metadata '" + key + "' must be a float");
        }
        if (!std::isfinite(out)) throw load_error("metadata '" + key + "' is not finite");
        return true;
    }
    // An integer array (bool, i32 or u32 elements, as llama.cpp accepts); false when absent or not an array.
    bool get_int_array(const std::string & key, std::vector<int64_t> & out) const {
        int64_t id = find(key);
        if (id < 0 || gguf_get_kv_type(g, id) != GGUF_TYPE_ARRAY) return false;
        const size_t n = gguf_get_arr_n(g, id);
        const void * data = gguf_get_arr_data(g, id);
        out.resize(n);
        for (size_t i = 0; i < n; ++i) {
            switch (gguf_get_arr_type(g, id)) {
                case GGUF_TYPE_BOOL:   out[i] = ((const int8_t *) data)[i] != 0; break;
                case GGUF_TYPE_INT32:  out[i] = ((const int32_t *) data)[i]; break;
                case GGUF_TYPE_UINT32: out[i] = ((const uint32_t *) data)[i]; break;
                default: throw load_error("metadata '" + key + "' must be an array of bool, i32 or u32");
            }
        }
        return true;
    }
    std::string get_str(const std::string & key) const {
        int64_t id = find(key);
        if (id < 0) return "";
        if (gguf_get_kv_type(g, id) != GGUF_TYPE_STRING) throw load_error("metadata '" + key + "' must be a string");
        return gguf_get_val_str(g, id);
    }
};

// gemma3's extras, with llama.cpp's defaults for keys the file leaves out (src/models/gemma3.cpp:
// sliding-window pattern 6, i.e. every 6th layer global; SWA RoPE base 10000 at scale 1).
void read_gemma3(const GgufReader & r, Hparams & hp) {
    hp.embd_scale = std::sqrt((float) hp.n_embd);
    hp.gelu = true;
    hp.scale_q = true;
    // Gemma 3 27B (62 layers) scales by 1/sqrt(n_embd / n_head) (integer quotient), the others by 1/sqrt(head_dim).
    if (hp.n_layer == 62) hp.kq_scale = 1.0f / std::sqrt((float) (hp.n_embd / hp.n_head));
    if (r.get_float(r.arch + ".final_logit_softcapping", hp.final_softcap) && hp.final_softcap < 0.0f) {
        throw load_error("metadata 'final_logit_softcapping' must be >= 0");
    }
    int64_t v = 0;
    if (!r.get_int(r.arch + ".attention.sliding_window", v) || v == 0) return;   // no SWA layers
    if (v < 0 || v > (1 << 24)) throw load_error("metadata 'attention.sliding_window' = " + std::to_string(v) + " is invalid");
    hp.n_swa = (int) v;
    hp.swa_layer.assign(hp.n_layer, 0);
    const std::string pkey = r.arch + ".attention.sliding_window_pattern";
    std::vector<int64_t> flags;
    if (r.get_int_array(pkey, flags)) {
        // One flag per layer (llama.cpp would treat missing trailing layers as global; require all).
        if ((int) flags.size() != hp.n_layer) throw load_error("metadata '" + pkey + "' must have one entry per layer");
        for (int il = 0; il < hp.n_layer; ++il) hp.swa_layer[il] = flags[il] != 0;
    } else {
        // Period n: layers il % n == n - 1 are global, the rest sliding-window; n = 0: all sliding-window.
        int64_t n = 6;
        r.get_int(pkey, n);
        if (n < 0 || n > 4096) throw load_error("metadata '" + pkey + "' = " + std::to_string(n) + " is invalid");
        for (int il = 0; il < hp.n_layer; ++il) hp.swa_layer[il] = n == 0 || il % n < n - 1;
    }
    r.get_float(r.arch + ".rope.freq_base_swa", hp.rope_base_swa);
    if (!(hp.rope_base_swa > 0.0f)) throw load_error("metadata 'rope.freq_base_swa' must be > 0");
}

Hparams read_hparams(const GgufReader & r, const ggml_context * meta) {
    Hparams hp;
    hp.arch = r.arch;
    const int64_t BIG = 1 << 20;
    hp.n_layer     = r.req_int("block_count", 1, 1024);
    hp.n_embd      = r.req_int("embedding_length", 1, BIG);
    hp.n_ff        = r.req_int("feed_forward_length", 1, 16 * BIG);
    hp.n_head      = r.req_int("attention.head_count", 1, 4096);
    hp.n_ctx_train = r.req_int("context_length", 1, 1 << 24);
    int64_t v;
    hp.n_head_kv = r.get_int(r.arch + ".attention.head_count_kv", v) ? (int) v : hp.n_head;
    if (hp.n_head_kv < 1 || hp.n_head % hp.n_head_kv != 0) {
        throw load_error("metadata 'attention.head_count_kv' = " + std::to_string(hp.n_head_kv) +
                         " must divide attention.head_count = " + std::to_string(hp.n_head));
    }
    // Head size: attention.key_length when given (qwen3 files may have n_head * head_dim != n_embd),
    // else n_embd / n_head. V heads must be as large: one D serves q, k and v below.
    if (r.get_int(r.arch + ".attention.key_length", v)) {
        if (v < 2 || v > 4096) throw load_error("metadata 'attention.key_length' = " + std::to_string(v) + " is invalid");
        hp.head_dim = (int) v;
    } else {
        if (hp.n_embd % hp.n_head != 0) {
            throw load_error("metadata 'attention.head_count' = " + std::to_string(hp.n_head) +
                             " must divide embedding_length = " + std::to_string(hp.n_embd));
        }
        hp.head_dim = hp.n_embd / hp.n_head;
    }
    // value_length defaults to n_embd / n_head (as in llama.cpp), not to key_length.
    const int64_t v_len = r.get_int(r.arch + ".attention.value_length", v) ? v
                        : (hp.n_embd % hp.n_head == 0 ? hp.n_embd / hp.n_head : -1);
    if (v_len != hp.head_dim) {
        throw load_error("metadata 'attention.value_length' = " + std::to_string(v_len) +
                         " != key head size " + std::to_string(hp.head_dim) + " is not supported");
    }
    if (hp.head_dim % 2 != 0) throw load_error("head dimension must be even for RoPE");
    hp.rope_dim = hp.head_dim;
    if (r.get_int(r.arch + ".rope.dimension_count", v)) {
        if (v < 2 || v > hp.head_dim || v % 2) throw load_error("metadata 'rope.dimension_count' is invalid");
        hp.rope_dim = (int) v;
    }
    if (!r.get_float(r.arch + ".attention.layer_norm_rms_epsilon", hp.rms_eps)) {
        throw load_error("missing metadata '" + r.arch + ".attention.layer_norm_rms_epsilon'");
    }
    if (!(hp.rms_eps > 0.0f && hp.rms_eps < 1.0f)) throw load_error("metadata 'layer_norm_rms_epsilon' is invalid");
    r.get_float(r.arch + ".rope.freq_base", hp.rope_base);
    if (!(hp.rope_base > 0.0f)) throw load_error("metadata 'rope.freq_base' must be > 0");
    std::string scaling = r.get_str(r.arch + ".rope.scaling.type");
    float factor = 1.0f;
    if (r.get_float(r.arch + ".rope.scaling.factor", factor) && factor != 1.0f && scaling != "none") {
        if (scaling != "linear" && !scaling.empty()) {
            throw load_error("rope scaling type '" + scaling + "' is not supported");
        }
        if (!(factor > 0.0f)) throw load_error("metadata 'rope.scaling.factor' must be > 0");
        hp.rope_freq_scale = 1.0f / factor;
    }
    const ggml_tensor * emb = ggml_get_tensor(const_cast<ggml_context *>(meta), "token_embd.weight");
    if (!emb) throw load_error("missing tensor 'token_embd.weight'");
    hp.n_vocab = (int) emb->ne[1];
    hp.rope_mode = arch_list()[find_arch(hp.arch)].rope_neox ? GGML_ROPE_TYPE_NEOX : GGML_ROPE_TYPE_NORMAL;
    hp.kq_scale = 1.0f / std::sqrt((float) hp.head_dim);
    if (hp.arch == "gemma3") read_gemma3(r, hp);
    return hp;
}

struct TensorPlan {
    ggml_tensor * meta;   // shape/type as in the file
    ggml_tensor ** dst;   // where the loaded tensor goes
    bool on_cpu;
    int layer;            // its layer, -1 for the model-wide tensors
};

}  // namespace

// A TensorRow dimension's size for these hyper-parameters.
static int64_t dim_size(const Hparams & hp, Dim d) {
    switch (d) {
        case DIM_1: return 1;
        case DIM_EMBD: return hp.n_embd;
        case DIM_VOCAB: return hp.n_vocab;
        case DIM_FF: return hp.n_ff;
        case DIM_HEAD: return hp.head_dim;
        case DIM_Q: return (int64_t) hp.head_dim * hp.n_head;
        case DIM_KV: return (int64_t) hp.head_dim * hp.n_head_kv;
        case DIM_ROPE_HALF: return hp.rope_dim / 2;
    }
    throw Error(PLZ_ERR_RUNTIME, "unknown tensor dimension in the architecture table");
}

// Backends and buffers: the CPU always (inputs, embeddings, CPU layers), each offload device that
// holds a layer (devices.cpp) with its layers' weights; the output norm and head go with the head's
// device. CPU matmul weights go to the extra buffer types llama.cpp would use.
static void place_weights(Model & mr, ggml_context * meta, const std::vector<TensorPlan> & plan, const SplitParams & split,
                          int n_threads, bool use_extra_bufts) {
    Model * m = &mr;
    const Hparams & hp = m->hp;
    m->backend_cpu = ggml_backend_init_by_type(GGML_BACKEND_DEVICE_TYPE_CPU, nullptr);
    if (!m->backend_cpu) throw Error(PLZ_ERR_RUNTIME, "cannot initialise the CPU backend");
    m->n_threads = n_threads;
    set_cpu_threads(m->backend_cpu, n_threads);
    m->devices = split.n_gpu_layers != 0 ? offload_devices(split) : std::vector<ggml_backend_dev_t>{};
    m->layer_dev = assign_layers(hp.n_layer, m->devices, split);
    m->backends.assign(m->devices.size(), nullptr);
    m->ctx_dev.assign(m->devices.size(), nullptr);
    const size_t n_tensors = plan.size() + 1;
    ggml_init_params ip = { ggml_tensor_overhead() * (n_tensors + 1), nullptr, /*no_alloc*/ true };
    m->ctx_cpu = ggml_init(ip);
    for (int d : m->layer_dev) {
        if (d < 0 || m->backends[d]) continue;
        m->backends[d] = ggml_backend_dev_init(m->devices[d], nullptr);
        if (!m->backends[d]) throw Error(PLZ_ERR_RUNTIME, std::string("cannot initialise device ") + ggml_backend_dev_name(m->devices[d]));
        m->ctx_dev[d] = ggml_init(ip);
        if (!m->backend_gpu && !is_rpc_device(m->devices[d])) m->backend_gpu = m->backends[d];
    }
    // ggml context of the tensors of "layer" il (n_layer: the head and model-wide tensors).
    auto layer_ctx = [&](int il) { return m->layer_dev[il] < 0 ? m->ctx_cpu : m->ctx_dev[m->layer_dev[il]]; };
    const std::vector<ggml_backend_buffer_type_t> extras = use_extra_bufts ? weight_extra_bufts() : std::vector<ggml_backend_buffer_type_t>{};
    auto extra_ctx = [&](const ggml_tensor * t) { return extra_weight_context(*m, extras, t, ip.mem_size); };
    for (const auto & tp : plan) {
        ggml_context * c = tp.on_cpu ? m->ctx_cpu : layer_ctx(tp.layer < 0 ? hp.n_layer : tp.layer);
        ggml_context * e = c == m->ctx_cpu && tp.dst != &m->tok_embd ? extra_ctx(tp.meta) : nullptr;
        *tp.dst = ggml_dup_tensor(e ? e : c, tp.meta);
        ggml_set_name(*tp.dst, tp.meta->name);
        m->n_extra_tensors += e != nullptr;
    }
    // Tied output head: the matmul should run where the head's layer runs, so an offload device gets
    // its own copy; so does an extra buffer type that takes it (llama.cpp duplicates it the same way).
    if (m->tied_output) {
        ggml_tensor * emb_meta = ggml_get_tensor(meta, "token_embd.weight");
        const bool on_dev = m->layer_dev[hp.n_layer] >= 0;
        ggml_context * e = on_dev ? layer_ctx(hp.n_layer) : extra_ctx(emb_meta);
        if (e) {
            m->output = ggml_dup_tensor(e, emb_meta);
            ggml_set_name(m->output, "output.weight(tied)");
            m->n_extra_tensors += !on_dev;
        } else {
            m->output = m->tok_embd;
        }
    }
    auto alloc = [&](ggml_context * c, ggml_backend_buffer_type_t buft) {
        if (!ggml_get_first_tensor(c)) return;
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(c, buft);
        if (!buf) throw Error(PLZ_ERR_RUNTIME, std::string("out of memory allocating model weights on ") + ggml_backend_buft_name(buft));
        ggml_backend_buffer_set_usage(buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
        m->buffers.push_back(buf);
        m->weight_bytes += ggml_backend_buffer_get_size(buf);
    };
    alloc(m->ctx_cpu, ggml_backend_get_default_buffer_type(m->backend_cpu));
    for (size_t d = 0; d < m->devices.size(); ++d) if (m->ctx_dev[d]) alloc(m->ctx_dev[d], ggml_backend_get_default_buffer_type(m->backends[d]));
    for (auto & e : m->ctx_extra) alloc(e.second, e.first);
}

// Every tensor the graph reads (the architecture table's rows for arch), checked against the file:
// present when required, of the shape it must have, of a known type, with its data inside the file.
static std::vector<TensorPlan> plan_tensors(Model & m, gguf_context * g, ggml_context * meta, int arch, long long file_size) {
    const Hparams & hp = m.hp;
    std::vector<TensorPlan> plan;
    auto want = [&](const std::string & name, std::vector<int64_t> shape, ggml_tensor ** dst, bool on_cpu, bool required, int layer) {
        ggml_tensor * t = ggml_get_tensor(meta, name.c_str());
        if (!t) {
            if (required) throw load_error("missing tensor '" + name + "'");
            return false;
        }
        for (int d = 0; d < GGML_MAX_DIMS; ++d) {
            int64_t expect = d < (int) shape.size() ? shape[d] : 1;
            if (t->ne[d] != expect) {
                throw load_error("tensor '" + name + "' has shape [" + std::to_string(t->ne[0]) + ", " +
                                 std::to_string(t->ne[1]) + "], expected [" + std::to_string(shape[0]) + ", " +
                                 std::to_string(shape.size() > 1 ? shape[1] : 1) + "]");
            }
        }
        if (t->type >= GGML_TYPE_COUNT || ggml_type_size(t->type) == 0 || ggml_blck_size(t->type) <= 0) {
            throw load_error("tensor '" + name + "' has an unsupported type");
        }
        const size_t off = gguf_get_data_offset(g) + gguf_get_tensor_offset(g, gguf_find_tensor(g, name.c_str()));
        if ((long long) (off + ggml_nbytes(t)) > file_size) {
            throw load_error("tensor '" + name + "' data lies beyond the end of the file (truncated file?)");
        }
        plan.push_back({t, dst, on_cpu, layer});
        return true;
    };
    // Every tensor of the architecture table this arch has, bound to its field; absent optional
    // ones stay null (output.weight absent: the head is tied to the embeddings).
    const uint32_t bit = 1u << arch;
    m.layers.resize(hp.n_layer);
    for (const TensorRow & row : tensor_rows()) {
        if (!(row.present & bit)) continue;
        const std::vector<int64_t> shape = {dim_size(hp, row.ne0), dim_size(hp, row.ne1)};
        const bool required = row.required & bit;
        if (!row.per_layer) {
            want(row.name, shape, &(m.*row.model_field), row.on_cpu, required, -1);
            continue;
        }
        for (int il = 0; il < hp.n_layer; ++il) {
            want("blk." + std::to_string(il) + "." + row.name, shape, &(m.layers[il].*row.layer_field), false, required, il);
        }
    }
    m.tied_output = ggml_get_tensor(meta, "output.weight") == nullptr;   // (fields are set below, from the plan)
    for (const auto & tp : plan) {
        if (ggml_n_dims(tp.meta) == 1 && tp.meta->type != GGML_TYPE_F32) {
            throw load_error(std::string("norm tensor '") + tp.meta->name + "' must be F32");
        }
    }
    return plan;
}

static void read_weights(Model & m, const std::string & path, gguf_context * g, ggml_context * meta, const std::vector<TensorPlan> & plan) {
    // Tensor data: one read per tensor straight into host buffers, through a staging vector for the GPU.
    FILE * f = std::fopen(path.c_str(), "rb");
    if (!f) throw load_error("cannot open model file '" + path + "'");
    std::unique_ptr<FILE, int (*)(FILE *)> f_guard(f, std::fclose);
    std::vector<uint8_t> staging;
    auto read_into = [&](ggml_tensor * meta_t, ggml_tensor * dst) {
        const size_t off = gguf_get_data_offset(g) + gguf_get_tensor_offset(g, gguf_find_tensor(g, meta_t->name));
        const size_t n = ggml_nbytes(meta_t);
        if (std::fseek(f, (long) off, SEEK_SET) != 0) throw load_error(std::string("cannot seek to tensor '") + meta_t->name + "'");
        void * target;
        if (ggml_backend_buffer_is_host(dst->buffer)) {
            target = dst->data;
        } else {
            staging.resize(n);
            target = staging.data();
        }
        if (std::fread(target, 1, n, f) != n) throw load_error(std::string("truncated data of tensor '") + meta_t->name + "'");
        if (!ggml_backend_buffer_is_host(dst->buffer)) ggml_backend_tensor_set(dst, target, 0, n);
    };
    for (const auto & tp : plan) read_into(tp.meta, *tp.dst);
    if (m.output != m.tok_embd && m.tied_output) read_into(ggml_get_tensor(meta, "token_embd.weight"), m.output);
}

Model * load_model(const std::string & path, const SplitParams & split, int n_threads, bool use_extra_bufts) {
    FILE * probe = std::fopen(path.c_str(), "rb");
    if (!probe) throw load_error("cannot open model file '" + path + "'");
    std::fseek(probe, 0, SEEK_END);
    const long long file_size = std::ftell(probe);
    std::fclose(probe);

    ggml_context * meta = nullptr;
    gguf_init_params gp = { /*no_alloc*/ true, /*ctx*/ &meta };
    gguf_context * g = gguf_init_from_file(path.c_str(), gp);
    if (!g) throw load_error("'" + path + "' is not a valid GGUF file (bad magic, version, metadata or tensor table)");
    std::unique_ptr<gguf_context, void (*)(gguf_context *)> g_guard(g, gguf_free);
    std::unique_ptr<ggml_context, void (*)(ggml_context *)> meta_guard(meta, ggml_free);

    GgufReader r{g, ""};
    r.arch = r.get_str("general.architecture");
    if (r.arch.empty()) throw load_error("missing metadata 'general.architecture'");
    const int arch = find_arch(r.arch);
    if (arch < 0) throw load_error("unsupported architecture '" + r.arch + "' (supported: " + arch_names() + ")");

    std::unique_ptr<Model> m(new Model());
    m->hp = read_hparams(r, meta);
    const std::vector<TensorPlan> plan = plan_tensors(*m, g, meta, arch, file_size);
    place_weights(*m, meta, plan, split, n_threads, use_extra_bufts);
    read_weights(*m, path, g, meta, plan);
    return m.release();
}

}  // namespace plz
