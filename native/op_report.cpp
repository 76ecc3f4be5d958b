// Op report: for every node of the graphs the engine computes, ask every registered backend device
// ggml_backend_dev_supports_op. Why from the real graphs and not a list of ops: whether a backend takes
// a node depends on its types and shapes (head dims, row lengths of argsort/top-k, get_rows types),
// which only the engine's own graphs have. The scheduler would send an unsupported node to the CPU,
// so a "no" here is a CPU fallback (plus copies) on that device.
// Recording is under a label Python sets ("prefill 512", "decode", "refresh", ...), so one process can
// drive the engine through each kind of step and read one JSON report.
#include "op_report.h"

#include "pylazy.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

namespace {

struct Row {
    std::string label, op, types;
    int64_t count = 0;
    int64_t max_ne0 = 0;               // longest row seen (argsort / top-k / soft_max lengths)
    std::vector<int> supported;        // per device: 1 yes, 0 no
};

std::mutex g_mu;
std::string g_label;                   // empty: not recording
// g_label non-empty, readable without the lock: every graph compute asks, and almost never records.
std::atomic<bool> g_recording{false};
std::map<std::tuple<std::string, std::string, std::string>, Row> g_rows;

// Nodes that only reinterpret memory: no backend runs a kernel for them.
bool is_view_op(ggml_op op) {
    return op == GGML_OP_NONE || op == GGML_OP_VIEW || op == GGML_OP_RESHAPE || op == GGML_OP_PERMUTE ||
           op == GGML_OP_TRANSPOSE;
}

// "f32 <- q4_K,f32": the node's type and its sources', since support is decided by types.
std::string type_sig(const ggml_tensor * t) {
    std::string s = ggml_type_name(t->type);
    s += " <-";
    for (int i = 0; i < GGML_MAX_SRC && t->src[i]; ++i) s += std::string(i ? "," : " ") + ggml_type_name(t->src[i]->type);
    return s;
}

void json_str(std::string & out, const std::string & s) {
    out += '"';
    for (char ch : s) {
        if (ch == '"' || ch == '\\') out += '\\';
        out += ch;
    }
    out += '"';
}

std::string report_json() {
    std::string out = "{\"devices\":[";
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        if (i) out += ',';
        json_str(out, ggml_backend_dev_name(ggml_backend_dev_get(i)));
    }
    out += "],\"rows\":[";
    bool first = true;
    for (const auto & kv : g_rows) {
        const Row & r = kv.second;
        out += first ? "{" : ",{";
        first = false;
        out += "\"label\":"; json_str(out, r.label);
        out += ",\"op\":"; json_str(out, r.op);
        out += ",\"types\":"; json_str(out, r.types);
        out += ",\"count\":" + std::to_string(r.count) + ",\"max_ne0\":" + std::to_string(r.max_ne0);
        out += ",\"supported\":[";
        for (size_t i = 0; i < r.supported.size(); ++i) out += (i ? "," : "") + std::to_string(r.supported[i]);
        out += "]}";
    }
    return out + "]}";
}

}  // namespace

namespace plz {

void op_report_note(const ggml_cgraph * gf) {
    if (!g_recording.load(std::memory_order_relaxed)) return;
    std::lock_guard<std::mutex> lock(g_mu);
    if (g_label.empty()) return;
    const size_t n_dev = ggml_backend_dev_count();
    ggml_cgraph * g = const_cast<ggml_cgraph *>(gf);   // ggml's accessors take a non-const graph
    for (int i = 0; i < ggml_graph_n_nodes(g); ++i) {
        ggml_tensor * t = ggml_graph_node(g, i);
        if (is_view_op(t->op)) continue;
        const std::string op = ggml_op_desc(t), types = type_sig(t);
        Row & r = g_rows[std::make_tuple(g_label, op, types)];
        if (r.count == 0) {
            r.label = g_label, r.op = op, r.types = types;
            r.supported.assign(n_dev, 1);
        }
        ++r.count;
        const int64_t ne0 = t->src[0] ? t->src[0]->ne[0] : t->ne[0];
        r.max_ne0 = std::max(r.max_ne0, ne0);
        // A shape that one backend rejects can come after many it took: keep the "no".
        for (size_t d = 0; d < n_dev; ++d)
            if (!ggml_backend_dev_supports_op(ggml_backend_dev_get(d), t)) r.supported[d] = 0;
    }
}

}  // namespace plz

extern "C" {

int32_t plz_op_report(const char * label, char * buf, int32_t size) {
    std::lock_guard<std::mutex> lock(g_mu);
    if (label) {
        if (!*label) g_rows.clear();
        g_label = label;
        g_recording = !g_label.empty();
        return 0;
    }
    g_label.clear();
    g_recording = false;
    const std::string json = report_json();
    if (buf && size > 0) {
        const size_t n = std::min(json.size(), static_cast<size_t>(size - 1));
        memcpy(buf, json.data(), n);
        buf[n] = '\0';
    }
    return static_cast<int32_t>(json.size() + 1);
}

}  // extern "C"
