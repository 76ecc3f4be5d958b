// PYLAZY_NODE_DUMP=<file>: every node every graph computes, appended to <file> as one text line
// (graph number, node number, op, name, type, shape, sum, sum of |x| and the first values). The same
// run on two backends, diffed, shows the first node whose value differs: how a backend mismatch is
// traced to one op of the engine's own graph (docs/vulkan.md). Through the scheduler's eval callback,
// so nodes run one at a time (slow; a debugging aid, never on by default).
#include "node_dump.h"

#include "ggml-backend.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <vector>

namespace plz {
namespace {

std::mutex g_mu;
long g_node = 0;

// The tensor's values as doubles (F32, F16, I32; empty for other types or views with gaps).
std::vector<double> read_values(const ggml_tensor * t) {
    std::vector<double> out;
    if (!ggml_is_contiguous(t)) return out;
    const int64_t n = ggml_nelements(t);
    std::vector<uint8_t> raw(ggml_nbytes(t));
    ggml_backend_tensor_get(t, raw.data(), 0, raw.size());
    out.resize(n);
    for (int64_t i = 0; i < n; ++i) {
        switch (t->type) {
            case GGML_TYPE_F32: out[i] = ((const float *) raw.data())[i]; break;
            case GGML_TYPE_F16: out[i] = ggml_fp16_to_fp32(((const ggml_fp16_t *) raw.data())[i]); break;
            case GGML_TYPE_I32: out[i] = ((const int32_t *) raw.data())[i]; break;
            default: return {};
        }
    }
    return out;
}

bool dump_callback(ggml_tensor * t, bool ask, void * user_data) {
    if (ask) return true;
    std::lock_guard<std::mutex> lock(g_mu);
    FILE * f = std::fopen((const char *) user_data, "a");
    if (!f) return true;
    const std::vector<double> v = read_values(t);
    double sum = 0, asum = 0;
    for (double x : v) { sum += x; asum += std::fabs(x); }
    std::fprintf(f, "%ld %s '%s' %s [%lld %lld %lld %lld] sum %.6g |sum| %.6g :", g_node++, ggml_op_desc(t), t->name,
                 ggml_type_name(t->type), (long long) t->ne[0], (long long) t->ne[1], (long long) t->ne[2],
                 (long long) t->ne[3], sum, asum);
    for (size_t i = 0; i < v.size() && i < 12; ++i) std::fprintf(f, " %.5g", v[i]);
    std::fprintf(f, "\n");
    std::fclose(f);
    return true;
}

}  // namespace

bool node_dump_install(ggml_backend_sched_t sched) {
    const char * path = std::getenv("PYLAZY_NODE_DUMP");
    if (!path || !*path) return false;
    ggml_backend_sched_set_eval_callback(sched, dump_callback, (void *) path);
    return true;
}

}  // namespace plz
