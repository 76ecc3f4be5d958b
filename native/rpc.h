// Remote devices through ggml's own RPC backend (ggml-rpc, built into llama-cpp-python with
// CMAKE_ARGS="-DGGML_RPC=on"): finding a server's devices, serving this machine's devices, and
// turning a lost connection into an error instead of a dead process.
//
// ggml-rpc reports a failed socket operation with GGML_ABORT: on the calling thread while it
// connects, on the endpoint's dispatcher thread (ggml-rpc's own) once connected. pylazy installs an
// abort callback (ggml_set_abort_callback) that, for ggml-rpc's messages,
//  - on a thread running a guarded call (RpcExecutor) throws plz::Error, which unwinds through
//    ggml-rpc's frames to the C API boundary (api.cpp);
//  - on a dispatcher thread records the failure, wakes the waiting caller and parks that thread for
//    good (it must not return: ggml_abort would abort the process).
// A model with RPC devices runs its calls on its own executor thread, so the caller can return when
// a dispatcher fails while the executor stays blocked inside ggml-rpc; the model is then "lost":
// every later call fails at once, and freeing it leaks it (freeing remote buffers would block).
#pragma once
#include "ggml-backend.h"

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace plz {

// Whether this libggml has the RPC backend (llama-cpp-python built with -DGGML_RPC=on).
bool rpc_available();
int rpc_proto_version();   // the protocol major version this ggml speaks (ggml-rpc.h)

// A comma-separated list -> its non-empty items, blanks around each trimmed.
std::vector<std::string> split_list(const std::string & list);

// "host:port" list separated by commas -> endpoints; throws Error(PLZ_ERR_ARG) on a malformed entry.
std::vector<std::string> parse_rpc_servers(const std::string & list);

// Connects to endpoint within timeout_ms and exchanges ggml-rpc's HELLO (without ggml: its connect
// has no timeout and waits forever on a server busy with another client). Returns "" when it
// answers with this build's protocol version, else what went wrong.
std::string rpc_probe(const std::string & endpoint, int timeout_ms);

// The devices a server offers (probed first, then ggml_backend_rpc_add_server; not added to ggml's
// global registry, so libllama and other models in the process do not see them). Throws
// Error(PLZ_ERR_LOAD) naming the endpoint when it cannot be used.
std::vector<ggml_backend_dev_t> rpc_server_devices(const std::string & endpoint, int timeout_ms);

bool is_rpc_device(ggml_backend_dev_t dev);

// TCP keepalive and a user timeout on this process's connections to endpoints (ggml-rpc sets
// neither): a server host that disappears without closing the connection then fails the call in
// about 30 s instead of blocking it forever. A server that is alive but stalled is not detected.
void rpc_keepalive(const std::vector<std::string> & endpoints);

// ggml's RPC server for the named local devices ("" : the GPUs, else the CPU, as ggml's
// rpc-server); blocks while it serves. Returns a message when it could not start.
std::string rpc_serve(const std::string & endpoint, const std::vector<std::string> & devices, int n_threads,
                      const std::string & cache_dir);

// An endpoint whose connection was lost in this process: ggml-rpc keeps one connection per endpoint
// per process, and that one is dead for good.
bool rpc_endpoint_lost(const std::string & endpoint);

// Models of this process using each endpoint (+1 when one loads, -1 when one is freed; a lost model
// keeps its count: its connections stay open). While > 0, loading another skips the HELLO probe.
void rpc_acquire(const std::vector<std::string> & endpoints, int delta);
int rpc_users(const std::string & endpoint);

// Installs the abort callback described above (idempotent; chains to a callback set before).
void rpc_install_abort_handler();

// One thread on which every call of a model with RPC devices runs (a persistent one: ggml-cpu's
// thread pool stays with its caller). run() returns when the job is done, or throws Error when an
// RPC connection failed meanwhile (the job then stays blocked inside ggml-rpc, and lost() is true).
class RpcExecutor {
public:
    explicit RpcExecutor(std::vector<std::string> endpoints);   // the model's servers
    ~RpcExecutor();   // joins the thread unless lost (then it is detached and leaked)
    void run(const std::function<void()> & job);
    bool lost() const { return lost_; }
    const std::string & lost_reason() const { return reason_; }

private:
    struct Shared;
    std::shared_ptr<Shared> sh_;
    std::vector<std::string> endpoints_;
    std::thread thread_;
    bool lost_ = false;
    std::string reason_;
};

}  // namespace plz
