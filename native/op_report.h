// Which backend devices can run the engine's graph nodes (native/op_report.cpp).
#pragma once

struct ggml_cgraph;

namespace plz {
// Called right before each graph compute; a no-op unless plz_op_report() started a recording.
void op_report_note(const ggml_cgraph * gf);
}  // namespace plz
