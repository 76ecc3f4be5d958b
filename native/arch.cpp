// The architecture table (see arch.h) and its C API.
#include "arch.h"

#include "model.h"
#include "pylazy.h"

namespace plz {

namespace {

// Bit masks over arch_list()'s order.
constexpr uint32_t LLAMA = 1u << 0, QWEN2 = 1u << 1, QWEN3 = 1u << 2, GEMMA3 = 1u << 3;
constexpr uint32_t ALL = LLAMA | QWEN2 | QWEN3 | GEMMA3;
constexpr uint32_t NONE = 0;
// llama.cpp's llama/qwen graphs load biases when a file has them (qwen2 files have q/k/v ones);
// its gemma3 graph has none, so there they are not part of the model.
constexpr uint32_t LLAMA_LIKE = LLAMA | QWEN2 | QWEN3;

using M = Model;
using L = LayerWeights;

TensorRow global(const char * name, Dim ne0, Dim ne1, uint32_t present, uint32_t required,
                 ggml_tensor * Model::* field, bool on_cpu = false) {
    return {name, false, ne0, ne1, present, required, on_cpu, field, nullptr};
}

TensorRow layer(const char * name, Dim ne0, Dim ne1, uint32_t present, uint32_t required,
                ggml_tensor * LayerWeights::* field) {
    return {name, true, ne0, ne1, present, required, false, nullptr, field};
}

}  // namespace

const std::vector<ArchInfo> & arch_list() {
    // llama rotates adjacent pairs; qwen2/qwen3/gemma3 rotate dimension i with i + rope_dim/2 (NEOX),
    // as llama.cpp's llama_model_rope_type() says.
    static const std::vector<ArchInfo> archs = {
        {"llama", false}, {"qwen2", true}, {"qwen3", true}, {"gemma3", true},
    };
    return archs;
}

const std::vector<TensorRow> & tensor_rows() {
    static const std::vector<TensorRow> rows = {
        global("token_embd.weight", DIM_EMBD, DIM_VOCAB, ALL, ALL, &M::tok_embd, /*on_cpu*/ true),
        // llama3-style per-frequency RoPE divisors
        global("rope_freqs.weight", DIM_ROPE_HALF, DIM_1, LLAMA_LIKE, NONE, &M::rope_freqs),
        layer("attn_norm.weight", DIM_EMBD, DIM_1, ALL, ALL, &L::attn_norm),
        layer("attn_q.weight", DIM_EMBD, DIM_Q, ALL, ALL, &L::wq),
        layer("attn_k.weight", DIM_EMBD, DIM_KV, ALL, ALL, &L::wk),
        layer("attn_v.weight", DIM_EMBD, DIM_KV, ALL, ALL, &L::wv),
        layer("attn_output.weight", DIM_Q, DIM_EMBD, ALL, ALL, &L::wo),
        layer("ffn_gate.weight", DIM_EMBD, DIM_FF, ALL, ALL, &L::ffn_gate),
        layer("ffn_up.weight", DIM_EMBD, DIM_FF, ALL, ALL, &L::ffn_up),
        layer("ffn_down.weight", DIM_FF, DIM_EMBD, ALL, ALL, &L::ffn_down),
        layer("attn_q.bias", DIM_Q, DIM_1, LLAMA_LIKE, NONE, &L::bq),
        layer("attn_k.bias", DIM_KV, DIM_1, LLAMA_LIKE, NONE, &L::bk),
        layer("attn_v.bias", DIM_KV, DIM_1, LLAMA_LIKE, NONE, &L::bv),
        layer("attn_output.bias", DIM_EMBD, DIM_1, LLAMA_LIKE, NONE, &L::bo),
        layer("ffn_gate.bias", DIM_FF, DIM_1, LLAMA_LIKE, NONE, &L::b_gate),
        layer("ffn_up.bias", DIM_FF, DIM_1, LLAMA_LIKE, NONE, &L::b_up),
        layer("ffn_down.bias", DIM_EMBD, DIM_1, LLAMA_LIKE, NONE, &L::b_down),
        // per-head RMSNorm of q and k before RoPE
        layer("attn_q_norm.weight", DIM_HEAD, DIM_1, QWEN3 | GEMMA3, QWEN3 | GEMMA3, &L::q_norm),
        layer("attn_k_norm.weight", DIM_HEAD, DIM_1, QWEN3 | GEMMA3, QWEN3 | GEMMA3, &L::k_norm),
        layer("ffn_norm.weight", DIM_EMBD, DIM_1, ALL, ALL, &L::ffn_norm),
        // gemma3: RMSNorm of the attention and FFN outputs before each residual add
        layer("post_attention_norm.weight", DIM_EMBD, DIM_1, GEMMA3, GEMMA3, &L::attn_post_norm),
        layer("post_ffw_norm.weight", DIM_EMBD, DIM_1, GEMMA3, GEMMA3, &L::ffn_post_norm),
        global("output_norm.weight", DIM_EMBD, DIM_1, ALL, ALL, &M::output_norm),
        // absent: the output head is tied to token_embd
        global("output.weight", DIM_EMBD, DIM_VOCAB, ALL, NONE, &M::output),
    };
    return rows;
}

int find_arch(const std::string & name) {
    const auto & archs = arch_list();
    for (size_t i = 0; i < archs.size(); ++i) {
        if (name == archs[i].name) return (int) i;
    }
    return -1;
}

std::string arch_names() {
    std::string out;
    for (const auto & a : arch_list()) out += (out.empty() ? "" : ", ") + std::string(a.name);
    return out;
}

}  // namespace plz

extern "C" {

int32_t plz_arch_count(void) { return (int32_t) plz::arch_list().size(); }

const char * plz_arch_name(int32_t i) {
    const auto & archs = plz::arch_list();
    return i >= 0 && i < (int32_t) archs.size() ? archs[i].name : nullptr;
}

int32_t plz_arch_rope_neox(int32_t i) {
    const auto & archs = plz::arch_list();
    return i >= 0 && i < (int32_t) archs.size() ? (int32_t) archs[i].rope_neox : -1;
}

int32_t plz_arch_tensor_count(void) { return (int32_t) plz::tensor_rows().size(); }

int plz_arch_tensor(int32_t i, plz_arch_tensor_info * out) {
    const auto & rows = plz::tensor_rows();
    if (i < 0 || i >= (int32_t) rows.size() || !out) return PLZ_ERR_ARG;
    const plz::TensorRow & r = rows[i];
    *out = {r.name, (int32_t) r.per_layer, {(int32_t) r.ne0, (int32_t) r.ne1}, r.present, r.required};
    return PLZ_OK;
}

}  // extern "C"
