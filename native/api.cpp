// extern "C" surface: converts C++ exceptions into return codes + a thread-local message,
// so nothing thrown inside the engine ever crosses into Python.
#include "pylazy.h"
#include "context.h"
#include "keep.h"
#include "model.h"
#include "rpc.h"

#include <algorithm>
#include <cstring>
#include <new>
#include <string>
#include <vector>

struct plz_model {
    plz::Model * m;
    std::unique_ptr<plz::RpcExecutor> executor;   // with RPC servers: every call runs on it (rpc.h)
};
struct plz_context { plz::Context * c; };

static thread_local std::string g_last_error;

template <typename F>
static int guarded(F && f) {
    try {
        f();
        return PLZ_OK;
    } catch (const plz::Error & e) {
        g_last_error = e.what();
        return e.code;
    } catch (const std::bad_alloc &) {
        g_last_error = "out of host memory";
        return PLZ_ERR_RUNTIME;
    } catch (const std::exception & e) {
        g_last_error = e.what();
        return PLZ_ERR_RUNTIME;
    }
}

static void require(bool ok, const char * msg) {
    if (!ok) throw plz::Error(PLZ_ERR_ARG, msg);
}

// Runs f where calls of model m run: inline, or on its RPC executor (which throws when a server's
// connection is lost meanwhile, or was lost before).
template <typename F>
static void on_model(const plz::Model * m, F && f) {
    if (m->executor) m->executor->run(f);
    else f();
}

static int32_t copy_out(const std::string & s, char * buf, int32_t size) {
    if (!buf || size <= 0) return (int32_t) s.size();
    const size_t n = std::min(s.size(), (size_t) size - 1);
    std::memcpy(buf, s.data(), n);
    buf[n] = 0;
    return (int32_t) n;
}

extern "C" {

const char * pylazy_last_error(void) { return g_last_error.c_str(); }

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
    require(p.split_mode >= 0 && p.split_mode <= 2, "split_mode must be 0 (none), 1 (layer) or 2 (row)");
    sp.split_mode = p.split_mode;
    sp.main_gpu = p.main_gpu;
    require(p.n_tensor_split >= 0 && p.n_tensor_split <= 256 && (p.n_tensor_split == 0 || p.tensor_split), "bad tensor_split");
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
    return guarded([&] {
        require(path && params && out, "null argument");
        *out = nullptr;
        int threads = params->n_threads;
        require(threads <= 1024, "n_threads must be <= 1024");
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
        g_last_error = "layer out of range";
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
    return guarded([&] {
        require(endpoint, "null argument");
        const std::string why = plz::rpc_probe(endpoint, timeout_ms > 0 ? timeout_ms : 5000);
        if (!why.empty()) throw plz::Error(PLZ_ERR_LOAD, std::string("RPC server ") + endpoint + ": " + why);
    });
}

int plz_rpc_serve(const char * endpoint, const char * devices, int32_t n_threads, const char * cache_dir) {
    return guarded([&] {
        require(endpoint && devices, "null argument");
        const std::string why = plz::rpc_serve(endpoint, plz::split_list(devices), n_threads, cache_dir ? cache_dir : "");
        throw plz::Error(PLZ_ERR_RUNTIME, why);
    });
}

int plz_model_swa_layers(const plz_model * model, int32_t * flags) {
    return guarded([&] {
        require(model && flags, "plz_model_swa_layers: null argument");
        const plz::Hparams & hp = model->m->hp;
        for (int il = 0; il < hp.n_layer; ++il) flags[il] = hp.is_swa(il) ? 1 : 0;
    });
}

int plz_model_get_info(const plz_model * model, plz_model_info * info) {
    return guarded([&] {
        require(model && info, "null argument");
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
    return guarded([&] {
        require(model && params && out, "null argument");
        *out = nullptr;
        const plz::Hparams & hp = model->m->hp;
        int n_ctx = params->n_ctx > 0 ? params->n_ctx : hp.n_ctx_train;
        int n_ubatch = params->n_ubatch > 0 ? params->n_ubatch : 512;
        require(n_ctx <= (1 << 24), "n_ctx must be <= 16777216");
        require(n_ubatch <= 65536, "n_ubatch must be <= 65536");
        int threads = params->n_threads > 0 ? params->n_threads : model->m->n_threads;
        plz::set_cpu_threads(model->m->backend_cpu, threads);
        plz::Context * c = nullptr;
        on_model(model->m, [&] { c = plz::new_context(model->m, n_ctx, n_ubatch, threads, params->flash_attn != 0, params->type_k, params->type_v); });
        *out = new plz_context{c};
    });
}

void plz_context_free(plz_context * ctx) {
    if (!ctx) return;
    plz::RpcExecutor * ex = ctx->c->model->executor;
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
    return guarded([&] {
        require(ctx && n_threads >= 1 && n_threads <= 1024, "n_threads must be in [1, 1024]");
        ctx->c->n_threads = n_threads;
        plz::set_cpu_threads(ctx->c->model->backend_cpu, n_threads);
    });
}

int plz_eval(plz_context * ctx, const int32_t * tokens, int32_t n, int32_t all_logits, float * logits_out) {
    return guarded([&] {
        require(ctx && tokens && logits_out, "null argument");
        // Contexts of one model share its CPU backend: use this context's thread count.
        plz::set_cpu_threads(ctx->c->model->backend_cpu, ctx->c->n_threads);
        on_model(ctx->c->model, [&] { plz::eval(ctx->c, tokens, n, all_logits != 0, logits_out); });
    });
}

int plz_reset(plz_context * ctx) {
    return guarded([&] {
        require(ctx, "null argument");
        plz::reset(ctx->c);
    });
}

int plz_set_lazy(plz_context * ctx, int32_t n, const int32_t * layers, const float * keep, int32_t pool, int32_t window) {
    return guarded([&] {
        require(ctx && n >= 0 && (n == 0 || (layers && keep)), "bad lazy schedule arguments");
        on_model(ctx->c->model, [&] {
            plz::set_lazy(ctx->c, std::vector<int>(layers, layers + n), std::vector<float>(keep, keep + n), pool, window);
        });
    });
}

int32_t plz_keep_count(float keep, int32_t n_total) { return plz::keep_count(keep, n_total); }

int plz_layer_stats(const plz_context * ctx, int32_t * cells, int64_t * revived, uint64_t * kv_bytes) {
    return guarded([&] {
        require(ctx, "null argument");
        for (const plz::Stage & s : ctx->c->stages) {
            for (int il = s.il0; il < s.il1; ++il) {
                if (cells) cells[il] = s.n_cells;
                if (revived) revived[il] = s.revived;
                if (kv_bytes) kv_bytes[il] = ggml_nbytes(ctx->c->k[il]) + ggml_nbytes(ctx->c->v[il]);
            }
        }
    });
}

int plz_truncate(plz_context * ctx, int32_t n) {
    return guarded([&] {
        require(ctx, "null argument");
        plz::truncate(ctx->c, n);
    });
}

int plz_context_take_profile(plz_context * ctx, double * seconds, int64_t * batches) {
    return guarded([&] {
        require(ctx && seconds, "plz_context_take_profile: null argument");
        plz::Profile & p = ctx->c->profile;
        for (int i = 0; i < plz::Profile::N_PHASES; ++i) seconds[i] = p.seconds[i];
        if (batches) *batches = p.batches;
        p = plz::Profile{p.enabled};
    });
}

int plz_set_recycle(plz_context * ctx, int32_t mode, int32_t k, int32_t tail_cap, int32_t sinks, int32_t pool,
                    float share) {
    return guarded([&] {
        require(ctx && mode >= 0 && mode <= 2, "recycle mode must be 0, 1 or 2");
        on_model(ctx->c->model, [&] { plz::set_recycle(ctx->c, mode, k, tail_cap, sinks, pool, share); });
    });
}

int plz_decode(plz_context * ctx, int32_t token, int32_t kind, float * logits, float * sims, int32_t * kind_run) {
    return guarded([&] {
        require(ctx && logits && (kind == PLZ_STEP_FULL || kind == PLZ_STEP_RECYCLED || kind == PLZ_STEP_SELECT),
                "bad decode arguments");
        plz::set_cpu_threads(ctx->c->model->backend_cpu, ctx->c->n_threads);
        plz::StepKind ran = plz::StepKind::Full;
        on_model(ctx->c->model, [&] {
            ran = plz::decode(ctx->c, token, kind == PLZ_STEP_RECYCLED ? plz::StepKind::Recycled : plz::StepKind::Full,
                              kind == PLZ_STEP_SELECT, logits, sims);
        });
        if (kind_run) *kind_run = ran == plz::StepKind::Recycled ? PLZ_STEP_RECYCLED : PLZ_STEP_FULL;
    });
}

int plz_recycle_stats(const plz_context * ctx, int64_t * full_steps, int64_t * recycled_steps) {
    return guarded([&] {
        require(ctx, "null argument");
        if (full_steps) *full_steps = ctx->c->rec.full_steps;
        if (recycled_steps) *recycled_steps = ctx->c->rec.recycled_steps;
    });
}

// The context of a read of the last refresh at layer il, after checking there is one.
static const plz::Context & refreshed(const plz_context * ctx, int32_t il, const void * out) {
    require(ctx && out, "null argument");
    const plz::Context & c = *ctx->c;
    require(c.rec.mode != 0 && c.rec.valid, "no recycled cache (recycling off or no refresh yet)");
    require(il >= 0 && il < c.model->hp.n_layer, "layer out of range");
    return c;
}

int plz_recycle_positions(const plz_context * ctx, int32_t il, int32_t * positions) {
    return guarded([&] {
        const plz::Context & c = refreshed(ctx, il, positions);
        const plz::RecycleState & r = c.rec;
        size_t s = 0;
        while (!(il >= c.stages[s].il0 && il < c.stages[s].il1)) ++s;
        const int n = r.k * c.model->hp.n_head_kv;
        if (r.stage_all[s]) {
            std::fill(positions, positions + n, -1);
            return;
        }
        std::vector<int32_t> cells(n);
        on_model(c.model, [&] { ggml_backend_tensor_get(r.ridx[il], cells.data(), 0, sizeof(int32_t) * n); });
        for (int i = 0; i < n; ++i) positions[i] = c.stages[s].cell_pos[cells[i]];
    });
}

int plz_recycle_query(const plz_context * ctx, int32_t il, float * q) {
    return guarded([&] {
        const plz::Context & c = refreshed(ctx, il, q);
        on_model(c.model, [&] { ggml_backend_tensor_get(c.rec.rq[il], q, 0, ggml_nbytes(c.rec.rq[il])); });
    });
}

int plz_n_stages(const plz_context * ctx) { return ctx ? (int) ctx->c->stages.size() : -1; }

static const plz::Stage & stage_at(const plz_context * ctx, int32_t s) {
    require(ctx && s >= 0 && s < (int32_t) ctx->c->stages.size(), "stage index out of range");
    return ctx->c->stages[s];
}

int plz_stage_info(const plz_context * ctx, int32_t s, int32_t * il0, int32_t * il1, int32_t * n_cells, int32_t * n_selected) {
    return guarded([&] {
        const plz::Stage & st = stage_at(ctx, s);
        if (il0) *il0 = st.il0;
        if (il1) *il1 = st.il1;
        if (n_cells) *n_cells = st.n_cells;
        if (n_selected) *n_selected = (int32_t) st.selected.size();
    });
}

int plz_stage_positions(const plz_context * ctx, int32_t s, int32_t * cell_pos, int32_t * selected) {
    return guarded([&] {
        const plz::Stage & st = stage_at(ctx, s);
        if (cell_pos) std::copy(st.cell_pos.begin(), st.cell_pos.end(), cell_pos);
        if (selected) std::copy(st.selected.begin(), st.selected.end(), selected);
    });
}

int plz_read_kv(const plz_context * ctx, int32_t il, int32_t n, const int32_t * positions, float * k, float * v) {
    return guarded([&] {
        require(ctx && positions && k && v && n >= 0, "null argument");
        const plz::Context & c = *ctx->c;
        require(il >= 0 && il < c.model->hp.n_layer, "layer out of range");
        const plz::Stage * st = nullptr;
        for (const auto & s : c.stages) if (il >= s.il0 && il < s.il1) st = &s;
        const int64_t row = (int64_t) c.model->hp.head_dim * c.model->hp.n_head_kv;
        for (int32_t i = 0; i < n; ++i) {
            require(positions[i] >= 0 && positions[i] < c.n_ctx && st->pos_cell[positions[i]] >= 0,
                    "a requested token was never computed at that layer");
            on_model(c.model, [&] {
                plz::read_stage_cell(c, il, false, st->pos_cell[positions[i]], k + (size_t) i * row);
                plz::read_stage_cell(c, il, true, st->pos_cell[positions[i]], v + (size_t) i * row);
            });
        }
    });
}

int plz_read_aux(const plz_context * ctx, int32_t s, int32_t n, const int32_t * positions, float * h) {
    return guarded([&] {
        require(ctx && positions && h && n >= 0, "null argument");
        const plz::Context & c = *ctx->c;
        require(s >= 1 && s < (int32_t) c.stages.size(), "aux cache exists for stages 1.. only");
        const plz::Stage & prev = c.stages[s - 1];
        for (int32_t i = 0; i < n; ++i) {
            require(positions[i] >= 0 && positions[i] < c.n_ctx && prev.pos_cell[positions[i]] >= 0,
                    "no hidden state saved for a requested token");
            on_model(c.model, [&] {
                ggml_backend_tensor_get(c.aux[s], h + (size_t) i * c.model->hp.n_embd, (size_t) positions[i] * c.aux[s]->nb[1],
                                        c.aux[s]->nb[1]);
            });
        }
    });
}

int plz_n_past(const plz_context * ctx) { return ctx ? ctx->c->n_past : -1; }

}  // extern "C"
