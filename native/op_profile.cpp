// Per-op GPU/CPU time through ggml's scheduler eval callback: asked for every node, the scheduler runs
// the graph one node at a time and synchronizes after each, so the wall time between two callbacks is
// that node's time (plus one launch + sync). It disables op fusion and CUDA graphs, so totals are
// larger than a normal run; what it is for is comparing where two engines spend time on the same
// graph shapes: the same callback is given to libllama (llama_context_params.cb_eval) by
// scripts/op_profile.py, so pylazy and llama.cpp are measured by one clock.
#include "pylazy.h"

#include "ggml.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace {

struct OpTotals {
    double seconds = 0;
    int64_t count = 0;
};

std::mutex g_mu;
std::map<std::string, OpTotals> g_ops;
std::chrono::steady_clock::time_point g_last;
bool g_started = false;

// "MUL_MAT q4_K" / "FLASH_ATTN_EXT f16": op plus the type of its first source, which is what
// separates weight matmuls from attention matmuls.
std::string op_key(const ggml_tensor * t) {
    std::string key = ggml_op_desc(t);
    if (t->src[0]) key += std::string(" ") + ggml_type_name(t->src[0]->type);
    return key;
}

}  // namespace

extern "C" {

bool plz_op_profile_callback(struct ggml_tensor * t, bool ask, void * /*user_data*/) {
    std::lock_guard<std::mutex> lock(g_mu);
    const auto now = std::chrono::steady_clock::now();
    if (ask) {
        // The first ask of a split starts the clock (time spent before it is not a node's).
        if (!g_started) {
            g_last = now;
            g_started = true;
        }
        return true;
    }
    OpTotals & o = g_ops[op_key(t)];
    o.seconds += std::chrono::duration<double>(now - g_last).count();
    o.count += 1;
    g_last = now;
    return true;
}

void plz_op_profile_reset(void) {
    std::lock_guard<std::mutex> lock(g_mu);
    g_ops.clear();
    g_started = false;
}

// Writes "key\tseconds\tcount\n" lines, largest first, into buf (truncated to size); returns the length
// needed.
int32_t plz_op_profile_report(char * buf, int32_t size) {
    std::lock_guard<std::mutex> lock(g_mu);
    std::vector<std::pair<std::string, OpTotals>> rows(g_ops.begin(), g_ops.end());
    std::sort(rows.begin(), rows.end(), [](const auto & a, const auto & b) { return a.second.seconds > b.second.seconds; });
    std::string out;
    char line[256];
    for (const auto & r : rows) {
        std::snprintf(line, sizeof(line), "%s\t%.6f\t%lld\n", r.first.c_str(), r.second.seconds, (long long) r.second.count);
        out += line;
    }
    if (buf && size > 0) {
        const size_t n = std::min(out.size(), (size_t) size - 1);
        std::memcpy(buf, out.data(), n);
        buf[n] = 0;
    }
    return (int32_t) out.size() + 1;
}

}  // extern "C"
