// Which device holds each layer: llama.cpp's rules (llama.cpp: llama_prepare_model_devices and
// llama_model::load_tensors at llama-cpp-python 0.3.36's vendored version), so n_gpu_layers,
// tensor_split, main_gpu and split_mode mean what they mean there.
#include "model.h"
#include "pylazy.h"
#include "rpc.h"

#include "ggml-alloc.h"

#include <algorithm>

namespace plz {

std::vector<ggml_backend_dev_t> offload_devices(const SplitParams & p) {
    std::vector<ggml_backend_dev_t> rpc, gpus, igpus;
    // RPC servers first, in the order given ("to minimize network transfers", as llama.cpp puts it:
    // the CPU layers come first and hand over to the first server).
    for (const std::string & endpoint : p.rpc_servers) {
        for (ggml_backend_dev_t d : rpc_server_devices(endpoint, p.rpc_timeout_ms)) rpc.push_back(d);
    }
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t d = ggml_backend_dev_get(i);
        if (is_rpc_device(d)) continue;
        switch (ggml_backend_dev_type(d)) {
            case GGML_BACKEND_DEVICE_TYPE_GPU: gpus.push_back(d); break;
            case GGML_BACKEND_DEVICE_TYPE_IGPU: igpus.push_back(d); break;
            default: break;   // CPU and accelerators: the CPU side
        }
    }
    std::vector<ggml_backend_dev_t> devs = rpc;
    devs.insert(devs.end(), gpus.begin(), gpus.end());
    if (gpus.empty()) devs.insert(devs.end(), igpus.begin(), igpus.end());
    if (p.split_mode == SPLIT_NONE && !devs.empty()) {
        if (p.main_gpu < 0) return {};
        if (p.main_gpu >= (int) devs.size()) {
            throw Error(PLZ_ERR_ARG, "main_gpu = " + std::to_string(p.main_gpu) + " but there are only " +
                                     std::to_string(devs.size()) + " devices");
        }
        return {devs[p.main_gpu]};
    }
    return devs;
}

std::vector<int> assign_layers(int n_layer, const std::vector<ggml_backend_dev_t> & devs, const SplitParams & p) {
    const int n_dev = (int) devs.size();
    // Split points: tensor_split's first n_dev proportions (the rest ignored, as llama.cpp), or each
    // device's free memory when none are given.
    std::vector<float> splits(n_dev, 0.0f);
    bool all_zero = true;
    for (int i = 0; i < n_dev && i < (int) p.tensor_split.size(); ++i) {
        if (p.tensor_split[i] < 0.0f) throw Error(PLZ_ERR_ARG, "tensor_split proportions must be >= 0");
        splits[i] = p.tensor_split[i];
        all_zero = all_zero && splits[i] == 0.0f;
    }
    if (all_zero) {
        ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
        for (int i = 0; i < n_dev; ++i) {
            size_t free = 0, total = 0;
            ggml_backend_dev_memory(devs[i], &free, &total);
            if (free == 0 && total == 0) ggml_backend_dev_memory(cpu, &free, &total);
            splits[i] = (float) free;
        }
    }
    float sum = 0.0f;
    for (float & s : splits) s = sum += s;
    for (float & s : splits) s /= sum;
    // n_layer + 1 "layers": the output head counts as the last; the first ones stay on the CPU.
    const int n_gpu = p.n_gpu_layers < 0 ? n_layer + 1 : p.n_gpu_layers;
    const int first_gpu = std::max(n_layer + 1 - n_gpu, 0);
    const int act = n_dev == 0 ? 0 : std::min(n_gpu, n_layer + 1);
    std::vector<int> out(n_layer + 1, -1);
    for (int il = 0; il <= n_layer; ++il) {
        if (il < first_gpu || il - first_gpu >= act) continue;
        const float at = float(il - first_gpu) / act;
        out[il] = (int) (std::upper_bound(splits.begin(), splits.end(), at) - splits.begin());
        out[il] = std::min(out[il], n_dev - 1);
    }
    return out;
}

std::vector<ggml_backend_buffer_t> alloc_on_backends(const std::vector<std::pair<ggml_tensor *, ggml_backend_t>> & tensors,
                                                     const char * what) {
    // One buffer per buffer type, sized for its tensors; then each tensor placed in it in order.
    std::vector<std::pair<ggml_backend_buffer_type_t, size_t>> sizes;
    auto slot = [&](ggml_backend_buffer_type_t buft) {
        for (size_t i = 0; i < sizes.size(); ++i) if (sizes[i].first == buft) return i;
        sizes.push_back({buft, 0});
        return sizes.size() - 1;
    };
    for (const auto & [t, be] : tensors) {
        ggml_backend_buffer_type_t buft = ggml_backend_get_default_buffer_type(be);
        const size_t align = ggml_backend_buft_get_alignment(buft);
        sizes[slot(buft)].second += GGML_PAD(ggml_backend_buft_get_alloc_size(buft, t), align);
    }
    std::vector<ggml_backend_buffer_t> bufs;
    std::vector<ggml_tallocr> allocs;
    for (const auto & [buft, size] : sizes) {
        ggml_backend_buffer_t b = ggml_backend_buft_alloc_buffer(buft, std::max<size_t>(size, 1));
        if (!b) {
            for (auto * x : bufs) ggml_backend_buffer_free(x);
            throw Error(PLZ_ERR_RUNTIME, std::string("out of memory allocating ") + what + " (" + std::to_string(size >> 20) +
                                         " MiB on " + ggml_backend_buft_name(buft) + ")");
        }
        ggml_backend_buffer_clear(b, 0);   // unused cells are masked, but 0 * NaN is NaN in some kernels
        bufs.push_back(b);
        allocs.push_back(ggml_tallocr_new(b));
    }
    for (const auto & [t, be] : tensors) {
        if (ggml_tallocr_alloc(&allocs[slot(ggml_backend_get_default_buffer_type(be))], t) != GGML_STATUS_SUCCESS) {
            for (auto * x : bufs) ggml_backend_buffer_free(x);
            throw Error(PLZ_ERR_RUNTIME, std::string("cannot place ") + what);
        }
    }
    return bufs;
}

}  // namespace plz
