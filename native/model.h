// Model: read-only hyper-parameters and weights in backend buffers, shared by every context.
#pragma once
#include "ggml.h"
#include "ggml-backend.h"
#include "gguf.h"

#include <stdexcept>
#include <string>
#include <vector>

namespace plz {

class RpcExecutor;

// Errors carry the C API code they map to.
struct Error : std::runtime_error {
    int code;
    Error(int c, const std::string & msg) : std::runtime_error(msg), code(c) {}
};

struct Hparams {
    std::string arch;
    int n_vocab = 0, n_embd = 0, n_layer = 0, n_head = 0, n_head_kv = 0, head_dim = 0, n_ff = 0;
    int n_ctx_train = 0, rope_dim = 0;
    float rms_eps = 1e-5f, rope_base = 10000.0f, rope_freq_scale = 1.0f;
    int rope_mode = 0;  // GGML_ROPE_TYPE_NORMAL for llama (adjacent pairs), NEOX for qwen2/qwen3/gemma3 (halves)
    float kq_scale = 0.0f;      // attention logit scale (1/sqrt(head_dim) except gemma3 27B)
    bool scale_q = false;       // gemma3: q is multiplied by kq_scale before attention (llama.cpp's order)
    // gemma3 (the defaults leave llama/qwen as they are):
    float embd_scale = 1.0f;    // token embeddings times sqrt(n_embd)
    bool gelu = false;          // FFN gate activation: GELU (tanh approximation) instead of SiLU
    float final_softcap = 0.0f; // > 0: logits = c * tanh(logits / c)
    // Sliding-window attention: layer il attends only to positions p with pos - p < n_swa when
    // swa_layer[il]; those layers rotate with their own RoPE base/scale. n_swa 0: no SWA layers.
    int n_swa = 0;
    std::vector<char> swa_layer;  // per layer
    float rope_base_swa = 10000.0f, rope_freq_scale_swa = 1.0f;
    bool is_swa(int il) const { return n_swa > 0 && swa_layer[il]; }
};

struct LayerWeights {
    ggml_tensor * attn_norm = nullptr;
    ggml_tensor * wq = nullptr, * wk = nullptr, * wv = nullptr, * wo = nullptr;
    ggml_tensor * ffn_norm = nullptr;
    ggml_tensor * ffn_gate = nullptr, * ffn_up = nullptr, * ffn_down = nullptr;
    // Optional, null when the file has none: biases (qwen2 has q/k/v ones) and qwen3's per-head
    // RMSNorm weights of q and k [head_dim], applied before RoPE.
    ggml_tensor * bq = nullptr, * bk = nullptr, * bv = nullptr, * bo = nullptr;
    ggml_tensor * b_gate = nullptr, * b_up = nullptr, * b_down = nullptr;
    ggml_tensor * q_norm = nullptr, * k_norm = nullptr;
    // gemma3: RMSNorm of the attention output and of the FFN output before each residual add.
    ggml_tensor * attn_post_norm = nullptr, * ffn_post_norm = nullptr;
};

struct Model {
    Hparams hp;
    std::vector<LayerWeights> layers;
    ggml_tensor * tok_embd = nullptr;     // always in a CPU buffer: get_rows of quantized rows runs there
    ggml_tensor * output_norm = nullptr;
    ggml_tensor * output = nullptr;       // a copy of tok_embd on the compute device when tied
    ggml_tensor * rope_freqs = nullptr;   // llama3-style per-frequency RoPE divisors [rope_dim/2], optional
    bool tied_output = false;

    ggml_backend_t backend_cpu = nullptr;
    // Offload devices in llama.cpp's order (every RPC server's devices, then local GPUs: devices.cpp)
    // and the backends of those that hold a layer (null for the others).
    std::vector<ggml_backend_dev_t> devices;
    std::vector<ggml_backend_t> backends;
    // Per layer, then the output head (n_layer + 1 entries): the index in `devices` of the device
    // holding its weights, -1 for the CPU. The input embeddings always stay on the CPU.
    std::vector<int> layer_dev;
    // A local GPU holding layers (the first): its pinned host memory, the GPU mask template and the
    // CUDA gather apply. Null when every layer is on the CPU or an RPC device.
    ggml_backend_t backend_gpu = nullptr;
    std::vector<std::string> rpc_endpoints;
    RpcExecutor * executor = nullptr;     // runs every call when rpc_endpoints is set (owned by the C API handle)
    int n_threads = 1;

    ggml_backend_t layer_backend(int il) const { return layer_dev[il] < 0 ? backend_cpu : backends[layer_dev[il]]; }
    ggml_backend_t output_backend() const { return layer_backend(hp.n_layer); }
    // The one backend every layer and the head run on, or null when they are split over several.
    ggml_backend_t single_backend() const;

    ggml_context * ctx_cpu = nullptr;     // tensors placed in host memory
    std::vector<ggml_context *> ctx_dev;  // per device: its tensors (null when it holds none)
    // Weights in the CPU's extra (repacked) buffer types, one context per type (weights.cpp).
    std::vector<std::pair<ggml_backend_buffer_type_t, ggml_context *>> ctx_extra;
    int n_extra_tensors = 0;
    std::vector<ggml_backend_buffer_t> buffers;
    size_t weight_bytes = 0;

    ~Model();
};

// Where the layers go, with llama.cpp's meanings (llama_model_params): n_gpu_layers (< 0: all, the
// output head counting as one more layer), split_mode, main_gpu, tensor_split proportions per device,
// and RPC servers ("host:port") whose devices come first in the device list.
enum SplitMode { SPLIT_NONE = 0, SPLIT_LAYER = 1, SPLIT_ROW = 2 };
struct SplitParams {
    int n_gpu_layers = 0;
    int split_mode = SPLIT_LAYER;
    int main_gpu = 0;
    std::vector<float> tensor_split;
    std::vector<std::string> rpc_servers;
    int rpc_timeout_ms = 5000;   // to connect to a server and get its HELLO
};

// devices.cpp: the offload devices, and per layer + output head the device index (-1: CPU).
std::vector<ggml_backend_dev_t> offload_devices(const SplitParams & p);
std::vector<int> assign_layers(int n_layer, const std::vector<ggml_backend_dev_t> & devs, const SplitParams & p);

// Places tensors created in a no_alloc context: each in one buffer (zeroed) of its backend's default
// buffer type, one buffer per type. Throws Error naming `what` when memory runs out.
std::vector<ggml_backend_buffer_t> alloc_on_backends(const std::vector<std::pair<ggml_tensor *, ggml_backend_t>> & tensors,
                                                     const char * what);

// Loads and validates a GGUF file; throws Error(PLZ_ERR_LOAD, "...") naming what is wrong.
// use_extra_bufts: CPU weights in the extra buffer types llama.cpp would put them in (weights.cpp).
Model * load_model(const std::string & path, const SplitParams & split, int n_threads, bool use_extra_bufts = true);

// weights.cpp: the CPU backend's extra buffer types; those weights may go to (none with a GPU device
// present, AMX only with PYLAZY_AMX=1); the first of `extras` that runs op (MUL_MAT / GET_ROWS) on a
// weight shaped like meta, or null.
std::vector<ggml_backend_buffer_type_t> cpu_extra_bufts();
std::vector<ggml_backend_buffer_type_t> weight_extra_bufts();
ggml_backend_buffer_type_t pick_extra_buft(const std::vector<ggml_backend_buffer_type_t> & extras, const ggml_tensor * meta, ggml_op op);
// The context (of m.ctx_extra, made on first use with room for ctx_size bytes of tensor headers) a
// matmul weight shaped like meta goes to, or null for a plain buffer.
ggml_context * extra_weight_context(Model & m, const std::vector<ggml_backend_buffer_type_t> & extras, const ggml_tensor * meta,
                                    size_t ctx_size);

void set_cpu_threads(ggml_backend_t cpu, int n_threads);

}  // namespace plz
