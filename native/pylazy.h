// pylazy C API: the only surface Python sees (through ctypes).
// Every call returns 0 on success or a negative PLZ_ERR_* code; the message of the last
// failure on this thread is pylazy_last_error(). Handles are opaque and freed exactly once.
#pragma once
#include <stdint.h>
#include <stddef.h>
#include <stdbool.h>

#if defined(_WIN32)
#  define PLZ_API __declspec(dllexport)
#else
#  define PLZ_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define PLZ_OK              0
#define PLZ_ERR_LOAD       -1   // model file unreadable, malformed or unsupported
#define PLZ_ERR_ARG        -2   // caller passed a bad value
#define PLZ_ERR_CONTEXT    -3   // tokens do not fit in the context
#define PLZ_ERR_RUNTIME    -4   // backend failure (allocation, compute)

typedef struct plz_model   plz_model;
typedef struct plz_context plz_context;

typedef struct plz_model_params {
    // Layers on the offload devices (local GPUs, RPC servers' devices), as llama.cpp's n_gpu_layers:
    // the last n_gpu_layers of the n_layer + 1 "layers" (the output head counts as one), < 0: all,
    // 0: CPU only. The first layers stay on the CPU, the rest are split over the devices.
    int32_t n_gpu_layers;
    int32_t n_threads;      // CPU threads (<= 0: all cores)
    // 1: weights of matrix products go to the CPU's "extra" buffer types where ggml offers one for them
    // (repacked, interleaved layouts for Q4_0 / IQ4_NL / Q4_K ... on AVX2 or NEON), as llama.cpp's
    // use_extra_bufts does; 0: plain CPU buffers. Only when the model runs on the CPU.
    int32_t use_extra_bufts;
    // llama.cpp's split_mode (0 none: only device main_gpu, 1 layer, 2 row: split by layers too) and
    // main_gpu; tensor_split: n_tensor_split proportions of the layers per device (null or all zero:
    // by free memory). rpc_servers: "host:port,host:port" (null or ""), whose devices come first in
    // the device list; rpc_timeout_ms (<= 0: 5000) bounds connecting to each and its HELLO.
    int32_t split_mode;
    int32_t main_gpu;
    const float * tensor_split;
    int32_t n_tensor_split;
    const char * rpc_servers;
    int32_t rpc_timeout_ms;
} plz_model_params;

typedef struct plz_model_info {
    char     arch[32];
    int32_t  n_vocab, n_embd, n_layer, n_head, n_head_kv, head_dim, n_ff, n_ctx_train;
    float    rms_eps, rope_base, rope_freq_scale;
    int32_t  rope_dim;
    int32_t  tied_output;
    int32_t  on_gpu;          // weights live in a GPU buffer
    uint64_t weight_bytes;
    char     backend[64];     // name of the backend that computes the layers
    int32_t  n_swa;           // sliding window of the SWA layers (gemma3), 0: every layer global
    int32_t  n_swa_layers;    // how many layers use it
    int32_t  n_extra_tensors; // weights placed in an extra (repacked) buffer type
    char     extra_bufts[64]; // names of those buffer types, comma-separated ("" when none)
} plz_model_info;

typedef struct plz_context_params {
    int32_t n_ctx;          // KV capacity in tokens (<= 0: the model's training context)
    int32_t n_ubatch;       // prefill chunk size (<= 0: 512)
    int32_t n_threads;      // <= 0: the model's setting
    int32_t flash_attn;     // 1: ggml_flash_attn_ext; 0: mul_mat + soft_max_ext, llama.cpp's default path
    int32_t type_k;         // KV cache types as ggml_type values (F16 = 1, Q8_0 = 8, Q4_0 = 2 ...); < 0: F16.
    int32_t type_v;         // A quantized V needs flash_attn (as in llama.cpp).
} plz_context_params;

PLZ_API const char * pylazy_last_error(void);

// Names of the CPU backend's extra buffer types on this machine, comma-separated (e.g. "CPU_REPACK"):
// what use_extra_bufts may use. Returns the length written (truncated to size - 1).
PLZ_API int32_t plz_cpu_extra_bufts(char * buf, int32_t size);

PLZ_API int  plz_model_load(const char * path, const plz_model_params * params, plz_model ** out);
// Name of the device holding layer il's weights (il == n_layer: the output head; -1: the input
// embeddings, always "CPU"); returns the length written (truncated to size - 1), or < 0.
PLZ_API int  plz_model_layer_device(const plz_model * model, int32_t il, char * buf, int32_t size);
// The offload devices the model could use (llama.cpp's order), names comma-separated.
PLZ_API int  plz_model_devices(const plz_model * model, char * buf, int32_t size);
// 1 when an RPC connection of the model was lost: every call then fails, freeing leaks it.
PLZ_API int  plz_model_lost(const plz_model * model);

// ggml's RPC backend (native/rpc.h). 1 when this libggml has it (llama-cpp-python built with
// CMAKE_ARGS="-DGGML_RPC=on"), and its protocol major version.
PLZ_API int  plz_rpc_available(void);
// This machine's devices, one line each: "name: description (total MiB, free MiB free)".
PLZ_API int  plz_local_devices(char * buf, int32_t size);
PLZ_API int  plz_rpc_proto_version(void);
// Checks within timeout_ms that endpoint ("host:port") answers ggml-rpc's HELLO at this version.
// 0 when it does, else PLZ_ERR_LOAD with the reason in pylazy_last_error().
PLZ_API int  plz_rpc_probe(const char * endpoint, int32_t timeout_ms);
// Serves the named local devices (comma-separated, "" : the GPUs, else the CPU) with ggml's RPC
// server at endpoint; blocks while serving, returns an error when it could not start or stopped.
// INSECURE by its authors' word: no authentication, and clients may read and write its memory.
PLZ_API int  plz_rpc_serve(const char * endpoint, const char * devices, int32_t n_threads, const char * cache_dir);
PLZ_API void plz_model_free(plz_model * model);
PLZ_API int  plz_model_get_info(const plz_model * model, plz_model_info * info);
// flags[il] = 1 where layer il is a sliding-window layer (n_layer entries).
PLZ_API int  plz_model_swa_layers(const plz_model * model, int32_t * flags);

// The architecture table (native/arch.h): the supported architectures and, for each tensor their
// graph may read, its name, shape and which architectures have or need it. Static data, no model.
#define PLZ_DIM_1          0   // a tensor dimension in hyper-parameters: 1 (ne1 of a vector)
#define PLZ_DIM_EMBD       1   // n_embd
#define PLZ_DIM_VOCAB      2   // n_vocab
#define PLZ_DIM_FF         3   // n_ff
#define PLZ_DIM_HEAD       4   // head_dim
#define PLZ_DIM_Q          5   // head_dim * n_head
#define PLZ_DIM_KV         6   // head_dim * n_head_kv
#define PLZ_DIM_ROPE_HALF  7   // rope dimension count / 2
typedef struct plz_arch_tensor_info {
    const char * name;      // per-layer tensors: the name after "blk.<il>."
    int32_t  per_layer;
    int32_t  ne[2];         // PLZ_DIM_* of the ggml shape [ne0, ne1]
    uint32_t present;       // bit i: architecture i has it (required or optional)
    uint32_t required;      // bit i: architecture i must have it
} plz_arch_tensor_info;
PLZ_API int32_t      plz_arch_count(void);
PLZ_API const char * plz_arch_name(int32_t i);        // general.architecture of architecture i
PLZ_API int32_t      plz_arch_rope_neox(int32_t i);   // 1: NEOX RoPE (dims i, i + n_rot/2), 0: adjacent pairs
PLZ_API int32_t      plz_arch_tensor_count(void);
PLZ_API int          plz_arch_tensor(int32_t i, plz_arch_tensor_info * out);

PLZ_API int  plz_context_new(plz_model * model, const plz_context_params * params, plz_context ** out);
PLZ_API void plz_context_free(plz_context * ctx);
PLZ_API int  plz_context_set_threads(plz_context * ctx, int32_t n_threads);

// Appends n tokens at positions n_past..n_past+n-1 and computes them.
// logits_out: [n_out, n_vocab] floats where n_out = n if all_logits else 1 (the last token).
PLZ_API int  plz_eval(plz_context * ctx, const int32_t * tokens, int32_t n, int32_t all_logits, float * logits_out);
PLZ_API int  plz_reset(plz_context * ctx);
// Forgets the tokens at positions >= n (full attention only); the next eval continues at n.
PLZ_API int  plz_truncate(plz_context * ctx, int32_t n);

// Lazy prefill schedule: after layer layers[i] keep the fraction keep[i] of all tokens (n == 0: full
// attention). Only on an empty context; reallocates the per-stage KV cache and the aux cache. pool: scores
// max-pooled over +-pool cells; window (>= 1): scores from the attention of the batch's last `window` rows.
PLZ_API int  plz_set_lazy(plz_context * ctx, int32_t n, const int32_t * layers, const float * keep, int32_t pool,
                          int32_t window);
// How many of n_total tokens a stage with keep ratio `keep` holds (the rule set_lazy's stages use).
PLZ_API int32_t plz_keep_count(float keep, int32_t n_total);

// Per layer (arrays of n_layer): tokens holding a KV cell (computed there), tokens revived there since
// the last reset, and KV bytes allocated. Any pointer may be null.
PLZ_API int  plz_layer_stats(const plz_context * ctx, int32_t * cells, int64_t * revived, uint64_t * kv_bytes);
PLZ_API int  plz_n_past(const plz_context * ctx);

#define PLZ_RECYCLE_OFF     0
#define PLZ_RECYCLE_TOPK    1
#define PLZ_RECYCLE_WINDOW  2
// Recycled attention. mode: PLZ_RECYCLE_OFF, _TOPK (top-k by attention: Recycle) or _WINDOW (sinks +
// recent window: StreamingWindow, k = sinks + window). tail_cap: tokens decoded between refreshes (the stride).
// pool (mode 1): before the top-k, each cell's score becomes the max over the cells within `pool` of it,
// so the neighbours of an attended token come along (0: plain top-k as in the paper).
// share (mode 1, [0, 1]): each (layer, KV head) score adds share x the cell's best score over all
// layers and KV heads, so a token some layer attends strongly is kept in every layer (0: per layer).
PLZ_API int  plz_set_recycle(plz_context * ctx, int32_t mode, int32_t k, int32_t tail_cap, int32_t sinks, int32_t pool,
                             float share);

#define PLZ_STEP_FULL      0
#define PLZ_STEP_RECYCLED  1
#define PLZ_STEP_SELECT    2
// Decodes one token as the stride policy says (FULL refreshes the recycled cache when recycling is on;
// RECYCLED falls back to FULL when there is no valid cache or its tail is full). After a lazy prefill,
// FULL and RECYCLED steps keep each stage's selection (plus the tokens since); SELECT is a FULL step
// that also re-selects at every stage boundary and revives the selected tokens (LazyLLM's decode step).
// Without lazy stages SELECT is FULL. kind_run: FULL or RECYCLED. logits: n_vocab floats.
// sims (n_layer floats, may be null): per layer cosine(query, query of the last refresh) on recycled
// steps, NaN where not computed. kind_run: what ran (may be null).
PLZ_API int  plz_decode(plz_context * ctx, int32_t token, int32_t kind, float * logits, float * sims, int32_t * kind_run);
PLZ_API int  plz_recycle_stats(const plz_context * ctx, int64_t * full_steps, int64_t * recycled_steps);
// Per-op profiling (native/op_profile.cpp): a ggml scheduler eval callback that times every node. A
// context uses it when PYLAZY_PROFILE=ops; libllama takes it as llama_context_params.cb_eval.
struct ggml_tensor;
PLZ_API bool    plz_op_profile_callback(struct ggml_tensor * t, bool ask, void * user_data);
PLZ_API void    plz_op_profile_reset(void);
PLZ_API int32_t plz_op_profile_report(char * buf, int32_t size);
// Op report (native/op_report.cpp): label != NULL starts recording the graphs computed from now on
// under that label ("" also clears what was recorded); label == NULL stops and writes the JSON report
// (devices, then per label/op/types the supports_op answer of each device) into buf; returns its size + 1.
PLZ_API int32_t plz_op_report(const char * label, char * buf, int32_t size);
// Host-side phase times of a context (PYLAZY_PROFILE set when it was made): seconds[6] = host inputs,
// graph build, graph alloc, upload, compute, outputs; then zeroes them.
PLZ_API int  plz_context_take_profile(plz_context * ctx, double * seconds, int64_t * batches);

// Test-only introspection (stages, cells, the recycled cache): pylazy_debug.h.

#ifdef __cplusplus
}
#endif
