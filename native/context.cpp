// The context and its scheduling (see context.h): prefill_lazy() and step() are the two ways tokens
// are scheduled through the stages; run_segments() runs one graph of prepared segments.
#include "context.h"
#include "node_dump.h"
#include "graph.h"
#include "keep.h"
#include "op_report.h"
#include "pylazy.h"

#include "ggml-alloc.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>

namespace plz {

namespace {

// Environment switches: PYLAZY_<name>=value.
bool env_is(const char * name, const char * value) {
    const char * v = std::getenv(name);
    return v && std::strcmp(v, value) == 0;
}

// PYLAZY_PROFILE=1: wall time of each phase of run_segments, summed and printed when the context is
// freed, to see what the host adds around the backend's compute (graph building, allocation, the mask).
struct PhaseClock {
    Profile * prof;
    std::chrono::steady_clock::time_point t = std::chrono::steady_clock::now();
    void lap(int phase) {
        if (!prof) return;
        const auto now = std::chrono::steady_clock::now();
        prof->seconds[phase] += std::chrono::duration<double>(now - t).count();
        t = now;
    }
};

std::vector<int32_t> cells_to_sorted_positions(const Stage & st, const std::vector<int32_t> & cells) {
    std::vector<int32_t> pos;
    pos.reserve(cells.size());
    for (int32_t cell : cells) pos.push_back(st.cell_pos[cell]);
    std::sort(pos.begin(), pos.end());
    return pos;
}

// What a fresh row of stage s > 0 attends to, by position: the tokens selected into the stage and every
// token from `fresh_from` on (the rows of this step, and those decoded since the selection was made).
std::vector<char> attended_positions(const Stage & st, int n_total) {
    std::vector<char> in_attend(n_total, 0);
    for (int32_t p : st.selected) in_attend[p] = 1;
    return in_attend;
}

template <typename R>
void put_sims(const Stage & st, const R & r, float * sims) {
    if (!sims) return;
    for (int il = st.il0; il < st.il1; ++il) sims[il] = NAN;  // stage that attends fully: no check
    for (const auto & [il, v] : r.sims) sims[il] = v;
}

}  // namespace

void Profile::print() const {
    static const char * names[N_PHASES] = {"host inputs (cells, mask)", "graph build", "graph alloc", "upload", "compute", "outputs"};
    double total = 0;
    for (double s : seconds) total += s;
    std::fprintf(stderr, "pylazy profile: %lld batches, %.3f s\n", (long long) batches, total);
    for (int i = 0; i < N_PHASES; ++i) std::fprintf(stderr, "  %-28s %8.3f s  %5.1f %%\n", names[i], seconds[i], total > 0 ? 100 * seconds[i] / total : 0.0);
}

// -- setup -------------------------------------------------------------------------------------------

Context::Context(Model * model, int n_ctx, int n_ubatch, int n_threads)
    : model_(model), n_ctx(n_ctx), n_ubatch(n_ubatch), n_threads(n_threads) {}

Context::~Context() {
    if (profile.enabled) profile.print();
    for (auto & slot : slots) {
        slot.cached.reset();
        if (slot.sched) ggml_backend_sched_free(slot.sched);
    }
    if (logits_host) ggml_backend_buffer_free(logits_host);
    for (auto * be : own_backends) ggml_backend_free(be);
}

Context * Context::create(Model * model, int n_ctx, int n_ubatch, int n_threads, bool flash, int type_k, int type_v) {
    std::unique_ptr<Context> c(new Context(model, n_ctx, n_ubatch, n_threads));
    c->init(flash, type_k, type_v);
    return c.release();
}

void Context::init(bool flash, int type_k, int type_v) {
    Model * model = model_;
    const char * prof = std::getenv("PYLAZY_PROFILE");
    profile.enabled = prof && *prof && std::strcmp(prof, "0") != 0;
    configure_kv_format(kv.fmt, *model, flash, type_k, type_v);
#ifdef PLZ_CUDA_GATHER
    // The kernel copies F16 rows per KV head: the flash-attention layout with F16 caches only.
    // It reads raw device pointers of every layer: only when one CUDA device holds them all.
    rec.cuda_gather = model->backend_gpu && model->single_backend() == model->backend_gpu &&
                      std::strncmp(ggml_backend_name(model->backend_gpu), "CUDA", 4) == 0 &&
                      !env_is("PYLAZY_CUDA_GATHER", "0") && !kv.fmt.v_trans &&
                      kv.fmt.type_k == GGML_TYPE_F16 && kv.fmt.type_v == GGML_TYPE_F16;
#endif
    graph_reuse = !env_is("PYLAZY_GRAPH_REUSE", "0");
    kv.model = model;
    kv.n_ctx = n_ctx;
    kv.configure({}, {});
    rec.stage_all.assign(kv.stages.size(), 0);
    init_schedulers(env_is("PYLAZY_PROFILE", "ops"));
    // PYLAZY_MASK_TEMPLATE=1 uses the template on the CPU too (tests: it must not change any logit).
    if (model->backend_gpu || env_is("PYLAZY_MASK_TEMPLATE", "1")) kv.make_causal_template(n_ubatch);
}

void Context::init_schedulers(bool per_op) {
    const Model * model = model_;
    graph_size = std::max(4096, model->hp.n_layer * 256);  // a refresh step adds ~100 nodes per layer
    for (auto & slot : slots) slot.meta.resize(ggml_tensor_overhead() * graph_size + ggml_graph_overhead_custom(graph_size, false));
    std::vector<ggml_backend_t> backends;
    std::vector<ggml_backend_buffer_type_t> bufts;
    // One scheduler over every device holding layers (CPU last, as ggml wants): ops run where their
    // weights are, and the hidden state crosses devices through the scheduler's copies, as in llama.cpp.
    for (ggml_backend_t be : model->backends) {
        if (!be) continue;
        // A Vulkan backend keeps per-graph state (command buffers, descriptor sets, tensors it last
        // saw) that outlives a freed context: a second context on the model's backend crashed on
        // lavapipe ("double free or corruption", docs/vulkan.md). llama.cpp makes backends per
        // context; so do we for Vulkan (weights stay in the model's buffers, usable by any instance).
        if (std::strncmp(ggml_backend_name(be), "Vulkan", 6) == 0) {
            ggml_backend_t own = ggml_backend_dev_init(ggml_backend_get_device(be), nullptr);
            if (!own) throw Error(PLZ_ERR_RUNTIME, "cannot create a Vulkan backend for the context");
            own_backends.push_back(own);
            be = own;
        }
        backends.push_back(be);
        bufts.push_back(ggml_backend_get_default_buffer_type(be));
    }
    if (model->backend_gpu && !env_is("PYLAZY_PINNED", "0")) {
        host_buft = ggml_backend_dev_host_buffer_type(ggml_backend_get_device(model->backend_gpu));
    }
    backends.push_back(model->backend_cpu);
    bufts.push_back(host_buft ? host_buft : ggml_backend_get_default_buffer_type(model->backend_cpu));
    for (auto & slot : slots) {
        slot.sched = ggml_backend_sched_new(backends.data(), bufts.data(), (int) backends.size(), graph_size, false, true);
        if (!slot.sched) throw Error(PLZ_ERR_RUNTIME, "cannot create the graph scheduler");
        if (per_op) ggml_backend_sched_set_eval_callback(slot.sched, plz_op_profile_callback, nullptr);
        else node_dump_install(slot.sched);
    }
}

void Context::drop_graphs() {
    for (auto & slot : slots) slot.cached.reset();
}

void Context::set_lazy(const std::vector<int> & layers, const std::vector<float> & keep, int pool, int window) {
    const int L = model_->hp.n_layer;
    if (n_past_ != 0) throw Error(PLZ_ERR_ARG, "the lazy schedule can only change on an empty context (reset first)");
    if (layers.size() != keep.size()) throw Error(PLZ_ERR_ARG, "lazy layers and keep ratios differ in length");
    if (layers.size() > 32) throw Error(PLZ_ERR_ARG, "at most 32 pruning layers");
    if (pool < 0 || pool > 64) throw Error(PLZ_ERR_ARG, "lazy pool must be in [0, 64]");
    if (window < 1 || window > 256) throw Error(PLZ_ERR_ARG, "lazy window must be in [1, 256]");
    for (size_t i = 0; i < layers.size(); ++i) {
        if (layers[i] < 0 || layers[i] >= L - 1) throw Error(PLZ_ERR_ARG, "pruning layer " + std::to_string(layers[i]) + " outside [0, n_layer-1)");
        if (i > 0 && layers[i] <= layers[i - 1]) throw Error(PLZ_ERR_ARG, "pruning layers must increase");
        if (!(keep[i] > 0.0f && keep[i] <= 1.0f)) throw Error(PLZ_ERR_ARG, "keep ratios must be in (0, 1]");
        if (i > 0 && keep[i] > keep[i - 1]) throw Error(PLZ_ERR_ARG, "keep ratios must not increase");
    }
    drop_graphs();
    kv.configure(layers, keep);
    lazy_pool = pool;
    lazy_window = window;
    rec.stage_all.assign(kv.stages.size(), 0);
}

void Context::set_recycle(RecycleMode mode, int k, int tail_cap, int sinks, int pool, float share) {
    drop_graphs();
    rec.configure(kv, mode, k, tail_cap, sinks, pool, share);
}

void Context::set_threads(int n) {
    n_threads = n;
    bind_threads();
}

void Context::bind_threads() const { set_cpu_threads(model_->backend_cpu, n_threads); }

void Context::reset() {
    drop_graphs();
    n_past_ = 0;
    select_pos = 0;
    kv.clear();
    rec.reset((int) kv.stages.size());
}

void Context::truncate(int n) {
    if (kv.stages.size() != 1) throw Error(PLZ_ERR_ARG, "truncate needs full attention (no lazy schedule)");
    if (n < 0 || n > n_past_) throw Error(PLZ_ERR_ARG, "truncate: n must be in [0, n_past]");
    kv.truncate(n);
    n_past_ = n;
    rec.valid = false;
}

void Context::layer_stats(int32_t * cells, int64_t * revived, uint64_t * kv_bytes) const {
    for (const Stage & s : kv.stages) {
        for (int il = s.il0; il < s.il1; ++il) {
            if (cells) cells[il] = s.n_cells;
            if (revived) revived[il] = s.revived;
            if (kv_bytes) kv_bytes[il] = ggml_nbytes(kv.k[il]) + ggml_nbytes(kv.v[il]);
        }
    }
}

void Context::recycle_stats(int64_t * full_steps, int64_t * recycled_steps) const {
    if (full_steps) *full_steps = rec.full_steps;
    if (recycled_steps) *recycled_steps = rec.recycled_steps;
}

Profile Context::take_profile() {
    const Profile p = profile;
    profile = Profile{p.enabled};
    return p;
}

// -- the two entry points ----------------------------------------------------------------------------

StepKind Context::decode(int32_t token, StepKind kind, bool select, float * logits_out, float * sims) {
    kind = rec.choose(kind);
    if (kind != StepKind::Recycled) sims = nullptr;
    if (n_past_ + 1 > n_ctx) throw Error(PLZ_ERR_CONTEXT, "the context window of " + std::to_string(n_ctx) + " is full");
    if (token < 0 || token >= model_->hp.n_vocab) throw Error(PLZ_ERR_ARG, "token id outside the vocabulary");
    try {
        step(&token, 1, false, logits_out, kind, select, sims);
    } catch (...) {
        reset();
        throw;
    }
    rec.count(kind, n_past_);
    n_past_ += 1;
    return kind;
}

void Context::eval(const int32_t * tokens, int n, bool all_logits, float * logits_out) {
    const Hparams & hp = model_->hp;
    if (n <= 0) throw Error(PLZ_ERR_ARG, "no tokens to evaluate");
    if ((int64_t) n_past_ + n > n_ctx) {
        throw Error(PLZ_ERR_CONTEXT, "requested tokens (" + std::to_string(n_past_ + n) +
                                     ") exceed the context window of " + std::to_string(n_ctx));
    }
    for (int i = 0; i < n; ++i) {
        if (tokens[i] < 0 || tokens[i] >= hp.n_vocab) {
            throw Error(PLZ_ERR_ARG, "token id " + std::to_string(tokens[i]) + " at index " + std::to_string(i) +
                                     " is outside the vocabulary [0, " + std::to_string(hp.n_vocab) + ")");
        }
    }
    rec.valid = false;   // tokens evaluated here are not in the recycled cache's tail: refresh next
    const bool lazy = kv.stages.size() > 1;
    if (lazy && all_logits) throw Error(PLZ_ERR_ARG, "all_logits is not available with lazy prefill (pruned tokens have no logits)");
    try {
        if (lazy && n_past_ == 0) {
            prefill_lazy(tokens, n, logits_out);
            n_past_ = n;
            return;
        }
        for (int off = 0; off < n; off += n_ubatch) {
            const int nc = std::min(n_ubatch, n - off);
            // Without all_logits only the very last chunk needs logits; step() writes the last row.
            step(tokens + off, nc, all_logits, logits_out + (all_logits ? (size_t) off * hp.n_vocab : 0));
            n_past_ += nc;
        }
    } catch (...) {
        // A failed step leaves cells half-written: drop the conversation rather than keep a corrupt cache.
        reset();
        throw;
    }
}

// -- scheduling --------------------------------------------------------------------------------------

// Stage-major prefill of the whole prompt with pruning between stages.
void Context::prefill_lazy(const int32_t * tokens, int n, float * logits_out) {
    std::vector<int32_t> alive(n);
    for (int i = 0; i < n; ++i) alive[i] = i;
    const int S = (int) kv.stages.size();
    // A later stage holds what this prompt keeps there plus room for the answer (grown when decoding or
    // revival needs more), so the KV memory after a lazy prefill follows the pruning.
    for (int s = 1; s < S; ++s) {
        const int want = std::min(pad_to(keep_count(kv.stages[s].keep, n) + KV_PAD, KV_PAD), pad_to(n_ctx, KV_PAD));
        if (kv.stages[s].capacity != want) kv.alloc_stage(s, want);
    }
    for (int s = 0; s < S; ++s) {
        const int n_alive = (int) alive.size();
        std::vector<int32_t> next;
        // The selection reads the last chunk's last lazy_window rows: a chunk that would leave a shorter
        // last one ends early, so the last holds the whole window (with window 1, chunks are n_ubatch).
        const int window = std::min(lazy_window, n_ubatch);
        for (int off = 0, nc = 0; off < n_alive; off += nc) {
            nc = std::min(n_ubatch, n_alive - off);
            const int rest = n_alive - off - nc;
            if (rest > 0 && rest < window) nc -= window - rest;
            const bool last_chunk = off + nc == n_alive;
            Batch b;
            b.stage = s;
            b.attend_all = true;
            b.pos.assign(alive.begin() + off, alive.begin() + off + nc);
            b.rows = s == 0 ? std::vector<int32_t>(tokens + off, tokens + off + nc) : b.pos;
            if (last_chunk && s + 1 < S) b.n_select = std::min(keep_count(kv.stages[s + 1].keep, n), kv.stages[s].n_cells + nc);
            if (last_chunk && s + 1 == S) b.n_logits = 1;
            BatchResult r = run_batch(b, [](int, int) { return true; }, logits_out);
            if (b.n_select > 0) next = cells_to_sorted_positions(kv.stages[s], r.selected_cells);
        }
        if (s + 1 < S) {
            kv.stages[s + 1].selected = next;
            alive = next;
        }
    }
    select_pos = n;
}

// Tokens after the prompt. `select` (lazy stages only): the step re-selects at every boundary and
// revives what it selects (eval() of tokens after a lazy prefill always does; decode() when asked).
// Otherwise the stages keep the last selection and the step runs as one graph, except refreshes of
// recycled attention. A Recycled step never selects.
void Context::step(const int32_t * tokens, int n, bool all_logits, float * logits_out, StepKind kind, bool select, float * sims) {
    select = select && kind != StepKind::Recycled && kv.stages.size() > 1;
    if (select || kind == StepKind::Refresh) {
        step_with_selection(tokens, n, all_logits, logits_out, kind, select, sims);
    } else {
        step_through_stages(tokens, n, all_logits, logits_out, kind, sims);
    }
}

// A step that selects nothing (one-token decode between selections, or no lazy stages): the rows go
// through every stage in one graph, each stage attending as the last selection said. Decode after a lazy
// prefill thus costs one graph per token, reused from step to step, like full attention; the selection
// and its revivals happen only at the steps the caller marks (step_with_selection).
void Context::step_through_stages(const int32_t * tokens, int n, bool all_logits, float * logits_out, StepKind kind, float * sims) {
    const int S = (int) kv.stages.size();
    const int p0 = n_past_, n_total = p0 + n;
    std::vector<Segment> segs;
    std::vector<std::vector<char>> in_attend(S);
    for (int s = 0; s < S; ++s) {
        Batch b;
        b.stage = s;
        b.attend_all = s == 0;
        b.kind = kind;
        b.want_sims = sims != nullptr;
        for (int i = 0; i < n; ++i) b.pos.push_back(p0 + i);
        b.rows = s == 0 ? std::vector<int32_t>(tokens, tokens + n) : b.pos;
        if (s + 1 == S) b.n_logits = all_logits ? n : 1;
        if (s > 0) in_attend[s] = attended_positions(kv.stages[s], n_total);
        const std::vector<char> & seen = in_attend[s];
        const int fresh_from = select_pos;
        segs.push_back(prepare_segment(b, [&](int, int cell_pos) {
            return s == 0 || cell_pos >= fresh_from || seen[cell_pos] != 0;
        }));
    }
    const BatchResult r = run_segments(segs, logits_out);
    for (const Stage & st : kv.stages) put_sims(st, r, sims);
}

// A step stage by stage (the LazyLLM step): in stage s > 0 the tokens selected at the previous boundary
// that were never computed there are revived first (from aux[s], attending causally to the stage's
// cells); fresh rows then attend only to the selected set and to each other; the last fresh row selects
// the next stage's set. With select false (a refresh of recycled attention between selections) nothing
// is selected or revived and stages attend as the last selection said; refresh steps still run stage by
// stage, since each stage scores its own cells.
void Context::step_with_selection(const int32_t * tokens, int n, bool all_logits, float * logits_out, StepKind kind, bool select,
                                  float * sims) {
    const int S = (int) kv.stages.size();
    const int p0 = n_past_, n_total = p0 + n;
    const int fresh_from = select ? p0 : select_pos;
    rec.pending.clear();
    for (int s = 0; s < S; ++s) {
        Stage & st = kv.stages[s];
        Batch b;
        b.stage = s;
        b.attend_all = s == 0;
        b.kind = kind;
        b.want_sims = sims != nullptr;
        int n_revive = 0;
        for (int32_t p : s > 0 && select ? st.selected : std::vector<int32_t>{}) {
            if (p < p0 && st.pos_cell[p] < 0) {
                b.pos.push_back(p);
                ++n_revive;
            }
        }
        const std::vector<char> in_attend = s > 0 ? attended_positions(st, n_total) : std::vector<char>{};
        for (int i = 0; i < n; ++i) b.pos.push_back(p0 + i);
        b.rows = s == 0 ? std::vector<int32_t>(tokens, tokens + n) : b.pos;
        // What the last fresh row sees besides the fresh rows: earlier cells (stage 0), or the selected set
        // and the tokens since the selection.
        const int n_seen = s == 0 ? st.n_cells : (int) st.selected.size() + (p0 - fresh_from);
        if (kind == StepKind::Refresh) rec.stage_all[s] = n_seen <= rec.k;
        if (s + 1 < S) {
            if (select) b.n_select = std::min(keep_count(kv.stages[s + 1].keep, n_total), n_seen + n);
        } else {
            b.n_logits = all_logits ? n : 1;
        }
        auto visible = [&](int row, int cell_pos) {
            if (s == 0 || row < n_revive) return true;   // causal over the whole stage
            return cell_pos >= fresh_from || in_attend[cell_pos] != 0;
        };
        BatchResult r = run_batch(b, visible, logits_out);
        st.revived += n_revive;
        put_sims(st, r, sims);
        if (s + 1 < S && select) {
            std::vector<int32_t> sel = cells_to_sorted_positions(st, r.selected_cells);
            // Fresh tokens always go on; the selection decides among the older ones.
            sel.erase(std::remove_if(sel.begin(), sel.end(), [&](int32_t p) { return p >= p0; }), sel.end());
            kv.stages[s + 1].selected = sel;
        }
    }
    if (select) select_pos = p0;
    if (!rec.pending.empty()) {
        slots[1].cached.reset();
        rec.refresh_picks(kv, slots[1].sched, slots[1].meta, graph_size, n_past_);
    }
}

// -- running a graph ---------------------------------------------------------------------------------

// Assigns the batch's cells in its stage and builds its masks (0 where a row attends to a cell) from
// `visible(row, cell_pos)`, and the selection bias when it selects for the next stage.
template <typename Visible>
Segment Context::prepare_segment(const Batch & b, Visible visible) {
    Segment sg;
    sg.b = b;
    const Stage & st = kv.stages[b.stage];
    const int n = (int) b.rows.size();
    sg.cells = kv.assign_cells(b.stage, b.pos);
    sg.stage_all = rec.stage_all[b.stage] != 0;
    const int n_kv = sg.n_kv = kv.n_kv(b.stage);

    const ggml_fp16_t zero = ggml_fp32_to_fp16(0.0f);
    // A recycled step attends to the recycled cache only: the stage mask would go unused, except in
    // sliding-window layers, which attend over the stage cache at every step (see build_layer).
    const bool stage_mask = !(b.kind == StepKind::Recycled && !sg.stage_all);
    // Big causal batches over position-ordered cells (every stage of a prefill, lazy stages included) take
    // their mask from the GPU template: the rows are the stage's last cells, so row i sees cells up to its
    // own, cells[0] + i. Measured on the H200 before this held for lazy stages: a lazy 128K prefill built
    // and uploaded an [n_kv, 512] host mask per ubatch of every later stage, 23.2 s against 29.2 s full.
    if (kv.causal_tpl && n > HOST_EMBD_MAX && b.attend_all && st.sorted && model_->hp.n_swa == 0 &&
        b.kind == StepKind::Full && n <= n_ubatch) {
        sg.tpl_p0 = (int) sg.cells[0];
    }
    if (stage_mask && sg.tpl_p0 < 0) sg.mask = build_mask(st, b.pos, b.attend_all, visible, n_kv, 0);
    if (kv.stage_has_swa(b.stage)) sg.mask_swa = build_mask(st, b.pos, b.attend_all, visible, n_kv, model_->hp.n_swa);
    if (b.n_select > 0) {
        sg.bias.assign(n_kv, FORCE_OUT);
        for (int j = 0; j < n_kv; ++j) {
            // The last row's view: from the template rule (cells are positions) or the host mask.
            const bool seen = sg.tpl_p0 >= 0 ? j <= sg.cells[n - 1] : sg.mask[(size_t) (n - 1) * n_kv + j] == zero;
            if (seen) sg.bias[j] = 0.0f;
        }
        sg.bias[sg.cells[n - 1]] = FORCE_IN;
    }
    return sg;
}

template <typename Visible>
Context::BatchResult Context::run_batch(const Batch & b, Visible visible, float * logits_out) {
    return run_segments({prepare_segment(b, visible)}, logits_out);
}

// Runs prepared segments as one graph (reusing the slot's cached one-token graph when it fits) and
// reads its outputs.
Context::BatchResult Context::run_segments(const std::vector<Segment> & segs, float * logits_out) {
    PhaseClock clock{profile.enabled ? &profile : nullptr};
    if (clock.prof) ++profile.batches;
    bool reusable = graph_reuse && segs[0].b.rows.size() == 1;
    for (const Segment & sg : segs) reusable = reusable && sg.b.n_select == 0;
    GraphSlot & slot = slots[segs[0].b.kind == StepKind::Refresh ? 1 : 0];
    std::shared_ptr<GraphResult> gp;
    clock.lap(Profile::HOST_INPUTS);
    if (reusable && slot.cached && slot.cached->can_reuse(segs, kv.generation)) {
        gp = slot.cached;
    } else {
        slot.cached.reset();
        ggml_backend_sched_reset(slot.sched);
        const GraphEnv env{*model_, kv, rec, lazy_pool, lazy_window, graph_size};
        gp = std::make_shared<GraphResult>(env, segs, slot.meta);
        clock.lap(Profile::BUILD);
        if (!ggml_backend_sched_alloc_graph(slot.sched, gp->gf)) throw Error(PLZ_ERR_RUNTIME, "cannot allocate the compute graph");
        clock.lap(Profile::ALLOC);
        if (reusable) slot.cached = gp;
    }
    GraphResult & g = *gp;
    g.set_inputs(segs);
    clock.lap(Profile::UPLOAD);
    op_report_note(g.gf);
    check_status(ggml_backend_sched_graph_compute(slot.sched, g.gf), "graph compute");
    if (g.gather_idx) rec.run_cuda_gather(kv, g.refresh, g.gather_idx, segs[0].own_cell());
    clock.lap(Profile::COMPUTE);
    BatchResult r = read_outputs(segs, g, logits_out);
    clock.lap(Profile::OUTPUTS);
    return r;
}

// The n cells of the highest scores, ties to the lower cell (the numpy reference's stable argsort): one
// rule on every backend, so a lazy prefill keeps the same tokens wherever and whenever it runs.
static std::vector<int32_t> top_cells(ggml_tensor * scores, int n) {
    std::vector<float> s(ggml_nelements(scores));
    ggml_backend_tensor_get(scores, s.data(), 0, sizeof(float) * s.size());
    for (float & v : s) if (std::isnan(v)) v = -INFINITY;   // a strict order for nth_element
    std::vector<int32_t> cells(s.size());
    std::iota(cells.begin(), cells.end(), 0);
    n = std::min<int>(n, (int) cells.size());
    auto higher = [&s](int32_t a, int32_t b) { return s[a] > s[b] || (s[a] == s[b] && a < b); };
    std::nth_element(cells.begin(), cells.begin() + n, cells.end(), higher);
    cells.resize(n);
    return cells;
}

// A graph's outputs: logits, the cells selected for the next stage, query similarities, refresh scores.
Context::BatchResult Context::read_outputs(const std::vector<Segment> & segs, const GraphResult & g, float * logits_out) {
    const Segment & last = segs.back();
    BatchResult r;
    for (size_t i = 0; i < segs.size(); ++i) {
        const int il0 = kv.stages[segs[i].b.stage].il0;
        for (size_t j = 0; j < g.sims[i].size(); ++j) {
            float v = NAN;
            if (g.sims[i][j]) ggml_backend_tensor_get(g.sims[i][j], &v, 0, sizeof(float));
            r.sims.push_back({il0 + (int) j, v});
        }
    }
    if (g.best) rec.keep_pending_pick(segs[0], g.refresh, g.best);
    if (g.select_scores) r.selected_cells = top_cells(g.select_scores, last.b.n_select);
    if (g.logits) read_logits(g.logits, logits_out, sizeof(float) * (size_t) last.b.n_logits * model_->hp.n_vocab);
    return r;
}

// Logits to the caller: through the pinned staging buffer when there is one (a DMA copy, then a host
// memcpy, is faster than a device-to-pageable copy for the one-row logits of a decode step). Large
// reads (every row of a prompt) go straight to the caller: pinning that much memory is no gain.
void Context::read_logits(ggml_tensor * logits, float * out, size_t bytes) {
    const bool staged = host_buft && bytes <= (size_t(4) << 20);
    if (staged && (!logits_host || ggml_backend_buffer_get_size(logits_host) < bytes)) {
        if (logits_host) ggml_backend_buffer_free(logits_host);
        logits_host = ggml_backend_buft_alloc_buffer(host_buft, bytes);
    }
    if (!staged || !logits_host) {
        ggml_backend_tensor_get(logits, out, 0, bytes);
        return;
    }
    void * staging = ggml_backend_buffer_get_base(logits_host);
    ggml_backend_tensor_get(logits, staging, 0, bytes);
    std::memcpy(out, staging, bytes);
}

}  // namespace plz
