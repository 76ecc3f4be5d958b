// What the C API's two files (api.cpp, api_debug.cpp) share: the handles behind the opaque types and
// the guard that turns C++ exceptions into return codes + a thread-local message, so nothing thrown
// inside the engine ever crosses into Python.
#pragma once
#include "pylazy.h"
#include "context.h"
#include "model.h"
#include "rpc.h"

#include <memory>
#include <new>
#include <string>

struct plz_model {
    plz::Model * m;
    std::unique_ptr<plz::RpcExecutor> executor;   // with RPC servers: every call runs on it (rpc.h)
};
struct plz_context { plz::Context * c; };

namespace plz_api {

std::string & last_error();   // this thread's (pylazy_last_error)

template <typename F>
int guarded(F && f) {
    try {
        f();
        return PLZ_OK;
    } catch (const plz::Error & e) {
        last_error() = e.what();
        return e.code;
    } catch (const std::bad_alloc &) {
        last_error() = "out of host memory";
        return PLZ_ERR_RUNTIME;
    } catch (const std::exception & e) {
        last_error() = e.what();
        return PLZ_ERR_RUNTIME;
    }
}

inline void require(bool ok, const char * msg) {
    if (!ok) throw plz::Error(PLZ_ERR_ARG, msg);
}

// Runs f where calls of model m run: inline, or on its RPC executor (which throws when a server's
// connection is lost meanwhile, or was lost before).
template <typename F>
void on_model(const plz::Model * m, F && f) {
    if (m->executor) m->executor->run(f);
    else f();
}

}  // namespace plz_api
