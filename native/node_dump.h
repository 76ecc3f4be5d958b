// PYLAZY_NODE_DUMP: every computed node's values to a text file (node_dump.cpp).
#pragma once

#include "ggml-backend.h"

namespace plz {

// Installs the dump as the scheduler's eval callback when PYLAZY_NODE_DUMP names a file; returns
// whether it did.
bool node_dump_install(ggml_backend_sched_t sched);

}  // namespace plz
