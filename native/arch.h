// The one table of the architectures pylazy runs and the tensors their graph reads.
//
// The loader (model.cpp) binds every row to its Model / LayerWeights field and checks its shape;
// Python reads the same rows through the C API (pylazy.h: plz_arch_*; pylazy/arch.py) for the file
// checks (gguf_check), the test-model writer (models/tiny.py) and the numpy reference (tests/).
// A new architecture or tensor is one row here (and the graph code that uses it).
#pragma once
#include <stdint.h>

#include <string>
#include <vector>

struct ggml_tensor;

namespace plz {

struct Model;
struct LayerWeights;

struct ArchInfo {
    const char * name;   // general.architecture
    bool rope_neox;      // RoPE rotates dims (i, i + n_rot/2) (NEOX) rather than (2i, 2i+1)
};

// A tensor dimension, in terms of the hyper-parameters (PLZ_DIM_* in pylazy.h).
enum Dim : int32_t { DIM_1 = 0, DIM_EMBD, DIM_VOCAB, DIM_FF, DIM_HEAD, DIM_Q, DIM_KV, DIM_ROPE_HALF };

struct TensorRow {
    const char * name;     // per-layer rows: the part after "blk.<il>."
    bool per_layer;
    Dim ne0, ne1;          // ggml shape [ne0, ne1] (ne1 DIM_1: a vector)
    uint32_t present;      // bit i: arch i has this tensor (required or optional)
    uint32_t required;     // bit i: arch i must have it; present but not required: optional
    bool on_cpu;           // kept in a host buffer (token_embd: get_rows of quantized rows runs there)
    ggml_tensor * Model::* model_field;          // global rows
    ggml_tensor * LayerWeights::* layer_field;   // per-layer rows
};

const std::vector<ArchInfo> & arch_list();
const std::vector<TensorRow> & tensor_rows();   // in the order the test models write them
int find_arch(const std::string & name);        // index into arch_list(), -1 if unsupported
std::string arch_names();                       // "llama, qwen2, ..." for messages

}  // namespace plz
