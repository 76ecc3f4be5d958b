// The extern "C" surface of pylazy.h (test introspection, pylazy_debug.h: api_debug.cpp); every call
// is guarded (api_impl.h).
#include "api_impl.h"
#include "keep.h"

#include <algorithm>
#include <cstring>
#include <new>
#include <string>
#include <vector>

std::string & plz_api::last_error() {
    static thread_local std::string e;
    return e;
}

static int32_t copy_out(const std::string & s, char * buf, int32_t size) {
    if (!buf || size <= 0) return (int32_t) s.size();
    const size_t n = std::min(s.size(), (size_t) size - 1);
    std::memcpy(buf, s.data(), n);
    buf[n] = 0;
    return (int32_t) n;
}

extern "C" {

const char * pylazy_last_error(void) { return plz_api::last_error().c_str(); }

int32_t plz_cpu_extra_bufts(char * buf, int32_t size) {
    std::string names;
    for (ggml_backend_buffer_type_t b : plz::cpu_extra_bufts()) names += (names.empty() ? "" : ",") + std::string(ggml_backend_buft_name(b));
    if (!buf || size <= 0) return (int32_t) names.size();
    const size_t n = std::min(names.size(), (size_t) size - 1);
    std::memcpy(buf, names.data(), n);
    buf[n] = 0;
    return (int32_t) n;
}

static plz::SplitParams split_params(const plz_model_params & p) {
    plz::SplitParams sp;
    sp.n_gpu_layers = p.n_gpu_layers;
    plz_api::require(p.split_mode >= 0 && p.split_mode <= 2, "split_mode must be 0 (none), 1 (layer) or 2 (row)");
    sp.split_mode = p.split_mode;
    sp.main_gpu = p.main_gpu;
    plz_api::require(p.n_tensor_split >= 0 && p.n_tensor_split <= 256 && (p.n_tensor_split == 0 || p.tensor_split), "bad tensor_split");
    if (p.n_tensor_split > 0) sp.tensor_split.assign(p.tensor_split, p.tensor_split + p.n_tensor_split);
    if (p.rpc_servers) sp.rpc_servers = plz::parse_rpc_servers(p.rpc_servers);
    sp.rpc_timeout_ms = p.rpc_timeout_ms > 0 ? p.rpc_timeout_ms : 5000;
    for (const std::string & e : sp.rpc_servers) {
        if (plz::rpc_endpoint_lost(e)) {
            throw plz::Error(PLZ_ERR_LOAD, "the connection to RPC server " + e + " was lost earlier in this process; ggml-rpc "
                                           "keeps one connection per server and process, so restart the process to use it again");
        }
    }
    return sp;
}

int plz_model_load(const char * path, const plz_model_params * params, plz_model ** out) {
    return plz_api::guarded([&] {
        plz_api::require(path && params && out, "null argument");
        *out = nullptr;
        int threads = params->n_threads;
        plz_api::require(threads <= 1024, "n_threads must be <= 1024");
        const plz::SplitParams sp = split_params(*params);
        std::unique_ptr<plz_model> h(new plz_model{nullptr, nullptr});
        auto load = [&] { h->m = plz::load_model(path, sp, threads > 0 ? threads : 1, params->use_extra_bufts != 0); };
        if (sp.rpc_servers.empty() || sp.n_gpu_layers == 0) {
            load();
        } else {
            // Connecting runs on the executor too: ggml-rpc aborts on a failed connect, which the
            // abort handler turns into an exception there only.
            h->executor.reset(new plz::RpcExecutor(sp.rpc_servers));
            h->executor->run(load);
            h->m->rpc_endpoints = sp.rpc_servers;
            h->m->executor = h->executor.get();
            plz::rpc_acquire(sp.rpc_servers, 1);
            plz::rpc_keepalive(sp.rpc_servers);
        }
        *out = h.release();
    });
}

void plz_model_free(plz_model * model) {
    if (!model) return;
    if (model->executor && !model->executor->lost()) {
        try {
            const std::vector<std::string> endpoints = model->m->rpc_endpoints;
            model->executor->run([&] { delete model->m; });
            plz::rpc_acquire(endpoints, -1);
        } catch (...) {
            // lost meanwhile: what is left of the model stays allocated (see below)
        }
    } else if (!model->executor) {
        delete model->m;
    }
    // A lost model's remote buffers cannot be freed (ggml-rpc would wait for the dead server): leaked.
    delete model;
}

int plz_model_lost(const plz_model * model) {
    return model && model->executor && model->executor->lost() ? 1 : 0;
}

int plz_model_layer_device(const plz_model * model, int32_t il, char * buf, int32_t size) {
    if (!model || il < -1 || il > model->m->hp.n_layer) {
        plz_api::last_error() = "layer out of range";
        return PLZ_ERR_ARG;
    }
    if (il < 0) return copy_out("CPU", buf, size);
    return copy_out(ggml_backend_name(model->m->layer_backend(il)), buf, size);
}

int plz_model_devices(const plz_model * model, char * buf, int32_t size) {
    if (!model) return PLZ_ERR_ARG;
    std::string names;
    for (ggml_backend_dev_t d : model->m->devices) {
        names += (names.empty() ? "" : ",") + std::string(ggml_backend_dev_name(d)) + "(" + ggml_backend_dev_description(d) + ")";
    }
    return copy_out(names, buf, size);
}

int plz_rpc_available(void) { return plz::rpc_available() ? 1 : 0; }
int plz_rpc_proto_version(void) { return plz::rpc_proto_version(); }

int plz_local_devices(char * buf, int32_t size) {
    std::string out;
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t d = ggml_backend_dev_get(i);
        size_t free = 0, total = 0;
        ggml_backend_dev_memory(d, &free, &total);
        out += std::string(ggml_backend_dev_name(d)) + ": " + ggml_backend_dev_description(d) + " (" +
               std::to_string(total >> 20) + " MiB, " + std::to_string(free >> 20) + " MiB free)\n";
    }
    return copy_out(out, buf, size);
}

int plz_rpc_probe(const char * endpoint, int32_t timeout_ms) {
    return plz_api::guarded([&] {
        plz_api::require(endpoint, "null argument");
        const std::string why = plz::rpc_probe(endpoint, timeout_ms > 0 ? timeout_ms : 5000);
        if (!why.empty()) throw plz::Error(PLZ_ERR_LOAD, std::string("RPC server ") + endpoint + ": " + why);
    });
}

int plz_rpc_serve(const char * endpoint, const char * devices, int32_t n_threads, const char * cache_dir) {
    return plz_api::guarded([&] {
        plz_api::require(endpoint && devices, "null argument");
        const std::string why = plz::rpc_serve(endpoint, plz::split_list(devices), n_threads, cache_dir ? cache_dir : "");
        throw plz::Error(PLZ_ERR_RUNTIME, why);
    });
}

int plz_model_swa_layers(const plz_model * model, int32_t * flags) {
    return plz_api::guarded([&] {
        plz_api::require(model && flags, "plz_model_swa_layers: null argument");
        const plz::Hparams & hp = model->m->hp;
        for (int il = 0; il < hp.n_layer; ++il) flags[il] = hp.is_swa(il) ? 1 : 0;
    });
}

int plz_model_get_info(const plz_model * model, plz_model_info * info) {
    return plz_api::guarded([&] {
        plz_api::require(model && info, "null argument");
        const plz::Model & m = *model->m;
        const plz::Hparams & hp = m.hp;
        std::memset(info, 0, sizeof(*info));
        std::strncpy(info->arch, hp.arch.c_str(), sizeof(info->arch) - 1);
        info->n_vocab = hp.n_vocab; info->n_embd = hp.n_embd; info->n_layer = hp.n_layer;
        info->n_head = hp.n_head; info->n_head_kv = hp.n_head_kv; info->head_dim = hp.head_dim;
        info->n_ff = hp.n_ff; info->n_ctx_train = hp.n_ctx_train;
        info->rms_eps = hp.rms_eps; info->rope_base = hp.rope_base; info->rope_freq_scale = hp.rope_freq_scale;
        info->rope_dim = hp.rope_dim;
        info->tied_output = m.tied_output;
        info->on_gpu = false;
        for (int d : m.layer_dev) info->on_gpu |= d >= 0;
        info->weight_bytes = m.weight_bytes;
        info->n_swa = hp.n_swa;
        for (int il = 0; il < hp.n_layer; ++il) info->n_swa_layers += hp.is_swa(il);
        // the backends computing the layers, in layer order ("CPU", or e.g. "CPU,RPC[127.0.0.1:50052]")
        std::string backends;
        ggml_backend_t prev = nullptr;
        for (int il = 0; il <= hp.n_layer; ++il) {
            if (m.layer_backend(il) == prev) continue;
            prev = m.layer_backend(il);
            backends += (backends.empty() ? "" : ",") + std::string(ggml_backend_name(prev));
        }
        std::strncpy(info->backend, backends.c_str(), sizeof(info->backend) - 1);
        info->n_extra_tensors = m.n_extra_tensors;
        std::string names;
        for (const auto & e : m.ctx_extra) names += (names.empty() ? "" : ",") + std::string(ggml_backend_buft_name(e.first));
        std::strncpy(info->extra_bufts, names.c_str(), sizeof(info->extra_bufts) - 1);
    });
}

int plz_context_new(plz_model * model, const plz_context_params * params, plz_context ** out) {
    return plz_api::guarded([&] {
        plz_api::require(model && params && out, "null argument");
        *out = nullptr;
        const plz::Hparams & hp = model->m->hp;
        int n_ctx = params->n_ctx > 0 ? params->n_ctx : hp.n_ctx_train;
        int n_ubatch = params->n_ubatch > 0 ? params->n_ubatch : 512;
        plz_api::require(n_ctx <= (1 << 24), "n_ctx must be <= 16777216");
        plz_api::require(n_ubatch <= 65536, "n_ubatch must be <= 65536");
        int threads = params->n_threads > 0 ? params->n_threads : model->m->n_threads;
        plz::set_cpu_threads(model->m->backend_cpu, threads);
        plz::Context * c = nullptr;
        plz_api::on_model(model->m, [&] { c = plz::Context::create(model->m, n_ctx, n_ubatch, threads, params->flash_attn != 0, params->type_k, params->type_v); });
        *out = new plz_context{c};
    });
}

void plz_context_free(plz_context * ctx) {
    if (!ctx) return;
    plz::RpcExecutor * ex = ctx->c->model()->executor;
    if (!ex) {
        delete ctx->c;
    } else if (!ex->lost()) {
        try {
            ex->run([&] { delete ctx->c; });
        } catch (...) {
            // lost meanwhile: leaked, as a lost model (plz_model_free)
        }
    }
    delete ctx;
}

int plz_context_set_threads(plz_context * ctx, int32_t n_threads) {
    return plz_api::guarded([&] {
        plz_api::require(ctx && n_threads >= 1 && n_threads <= 1024, "n_threads must be in [1, 1024]");
        ctx->c->set_threads(n_threads);
    });
}

int plz_eval(plz_context * ctx, const int32_t * tokens, int32_t n, int32_t all_logits, float * logits_out) {
    return plz_api::guarded([&] {
        plz_api::require(ctx && tokens && logits_out, "null argument");
        // Contexts of one model share its CPU backend: use this context's thread count.
        ctx->c->bind_threads();
        plz_api::on_model(ctx->c->model(), [&] { ctx->c->eval(tokens, n, all_logits != 0, logits_out); });
    });
}

int plz_reset(plz_context * ctx) {
    return plz_api::guarded([&] {
        plz_api::require(ctx, "null argument");
        ctx->c->reset();
    });
}

int plz_set_lazy(plz_context * ctx, int32_t n, const int32_t * layers, const float * keep, int32_t pool, int32_t window) {
    return plz_api::guarded([&] {
        plz_api::require(ctx && n >= 0 && (n == 0 || (layers && keep)), "bad lazy schedule arguments");
        plz_api::on_model(ctx->c->model(), [&] {
            ctx->c->set_lazy(std::vector<int>(layers, layers + n), std::vector<float>(keep, keep + n), pool, window);
        });
    });
}

static_assert((int) plz::RecycleMode::TopK == PLZ_RECYCLE_TOPK && (int) plz::RecycleMode::Window == PLZ_RECYCLE_WINDOW &&
              (int) plz::RecycleMode::Off == PLZ_RECYCLE_OFF, "RecycleMode follows the C API");

int32_t plz_keep_count(float keep, int32_t n_total) { return plz::keep_count(keep, n_total); }

int plz_layer_stats(const plz_context * ctx, int32_t * cells, int64_t * revived, uint64_t * kv_bytes) {
    return plz_api::guarded([&] {
        plz_api::require(ctx, "null argument");
        ctx->c->layer_stats(cells, revived, kv_bytes);
    });
}

int plz_truncate(plz_context * ctx, int32_t n) {
    return plz_api::guarded([&] {
        plz_api::require(ctx, "null argument");
        ctx->c->truncate(n);
    });
}

int plz_context_take_profile(plz_context * ctx, double * seconds, int64_t * batches) {
    return plz_api::guarded([&] {
        plz_api::require(ctx && seconds, "plz_context_take_profile: null argument");
        const plz::Profile p = ctx->c->take_profile();
        for (int i = 0; i < plz::Profile::N_PHASES; ++i) seconds[i] = p.seconds[i];
        if (batches) *batches = p.batches;
    });
}

int plz_set_recycle(plz_context * ctx, int32_t mode, int32_t k, int32_t tail_cap, int32_t sinks, int32_t pool,
                    float share) {
    return plz_api::guarded([&] {
        plz_api::require(ctx && mode >= 0 && mode <= 2, "recycle mode must be 0, 1 or 2");
        plz_api::on_model(ctx->c->model(), [&] { ctx->c->set_recycle(static_cast<plz::RecycleMode>(mode), k, tail_cap, sinks, pool, share); });
    });
}

int plz_decode(plz_context * ctx, int32_t token, int32_t kind, float * logits, float * sims, int32_t * kind_run) {
    return plz_api::guarded([&] {
        plz_api::require(ctx && logits && (kind == PLZ_STEP_FULL || kind == PLZ_STEP_RECYCLED || kind == PLZ_STEP_SELECT),
                "bad decode arguments");
        ctx->c->bind_threads();
        plz::StepKind ran = plz::StepKind::Full;
        plz_api::on_model(ctx->c->model(), [&] {
            ran = ctx->c->decode(token, kind == PLZ_STEP_RECYCLED ? plz::StepKind::Recycled : plz::StepKind::Full,
                              kind == PLZ_STEP_SELECT, logits, sims);
        });
        if (kind_run) *kind_run = ran == plz::StepKind::Recycled ? PLZ_STEP_RECYCLED : PLZ_STEP_FULL;
    });
}

int plz_recycle_stats(const plz_context * ctx, int64_t * full_steps, int64_t * recycled_steps) {
    return plz_api::guarded([&] {
        plz_api::require(ctx, "null argument");
        ctx->c->recycle_stats(full_steps, recycled_steps);
    });
}

int plz_n_past(const plz_context * ctx) { return ctx ? ctx->c->n_past() : -1; }

}  // extern "C"
