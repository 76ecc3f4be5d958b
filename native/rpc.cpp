// ggml's RPC backend: server devices, the server, and surviving a lost connection (see rpc.h).
#include "rpc.h"
#include "model.h"
#include "pylazy.h"

#include "ggml-rpc.h"

extern "C" void ggml_print_backtrace(void);   // libggml-base exports it; no public header declares it

#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <set>

namespace plz {

namespace {

ggml_backend_reg_t rpc_reg() { return ggml_backend_reg_by_name("RPC"); }

template <typename Fn>
Fn rpc_fn(const char * name) {
    ggml_backend_reg_t reg = rpc_reg();
    return reg ? (Fn) ggml_backend_reg_get_proc_address(reg, name) : nullptr;
}

bool split_endpoint(const std::string & endpoint, std::string & host, int & port) {
    const size_t colon = endpoint.rfind(':');
    if (colon == std::string::npos || colon == 0 || colon + 1 == endpoint.size()) return false;
    host = endpoint.substr(0, colon);
    const std::string p = endpoint.substr(colon + 1);
    if (p.size() > 5 || p.find_first_not_of("0123456789") != std::string::npos) return false;
    port = std::stoi(p);
    return port > 0 && port < 65536;
}

// A socket with a deadline: every wait polls until `deadline`.
struct ProbeSocket {
    int fd = -1;
    std::chrono::steady_clock::time_point deadline;
    ~ProbeSocket() { if (fd >= 0) ::close(fd); }

    int ms_left() const {
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
        return (int) std::max<int64_t>(0, left.count());
    }
    bool wait(short events) const {
        pollfd p = {fd, events, 0};
        return ::poll(&p, 1, ms_left()) == 1 && (p.revents & events);
    }
    std::string connect_to(const std::string & host, int port) {
        addrinfo hints = {}, * res = nullptr;
        hints.ai_family = AF_INET;   // as ggml-rpc's own connect
        hints.ai_socktype = SOCK_STREAM;
        if (::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res) != 0 || !res) return "cannot resolve host '" + host + "'";
        std::unique_ptr<addrinfo, void (*)(addrinfo *)> guard(res, ::freeaddrinfo);
        fd = ::socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0) return std::string("socket(): ") + std::strerror(errno);
        ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
        if (::connect(fd, res->ai_addr, res->ai_addrlen) != 0 && errno != EINPROGRESS) return std::strerror(errno);
        if (!wait(POLLOUT)) return "no answer (timed out)";
        int err = 0;
        socklen_t len = sizeof(err);
        ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
        return err ? std::strerror(err) : "";
    }
    bool send_all(const void * data, size_t n) {
        const char * p = (const char *) data;
        while (n > 0) {
            if (!wait(POLLOUT)) return false;
            const ssize_t k = ::send(fd, p, n, MSG_NOSIGNAL);
            if (k <= 0) return false;
            p += k;
            n -= (size_t) k;
        }
        return true;
    }
    bool recv_all(void * data, size_t n) {
        char * p = (char *) data;
        while (n > 0) {
            if (!wait(POLLIN)) return false;
            const ssize_t k = ::recv(fd, p, n, 0);
            if (k <= 0) return false;
            p += k;
            n -= (size_t) k;
        }
        return true;
    }
};

// ggml-rpc's HELLO at this protocol version (ggml-rpc.cpp): command byte 14, an 8-byte size and the
// client's transport capabilities (24 bytes, all zero: plain TCP); the reply is an 8-byte size and
// {major, minor, patch, padding, 24 bytes of server capabilities}.
constexpr uint8_t HELLO_CMD = 14;
constexpr size_t CAPS_SIZE = 24;

// failure bookkeeping shared by the abort callback and every executor
std::mutex g_mu;
std::condition_variable g_cv;
uint64_t g_failures = 0;       // dispatcher threads that reported a lost connection
std::string g_failure_msg;
thread_local bool t_guarded = false;   // this thread runs an RpcExecutor's jobs
ggml_abort_callback_t g_prev_abort = nullptr;
std::atomic<bool> g_abort_installed{false};

void on_ggml_abort(const char * msg) {
    const bool from_rpc = std::strstr(msg, "ggml-rpc") != nullptr;
    std::string text = msg;
    while (!text.empty() && std::isspace((unsigned char) text.back())) text.pop_back();
    if (from_rpc && t_guarded) throw Error(PLZ_ERR_RUNTIME, "RPC backend: " + text);
    if (from_rpc) {
        // A dispatcher thread: returning would abort the process. Report, then never return.
        {
            std::lock_guard<std::mutex> lock(g_mu);
            ++g_failures;
            g_failure_msg = text;
        }
        g_cv.notify_all();
        for (;;) std::this_thread::sleep_for(std::chrono::hours(24));
    }
    if (g_prev_abort) {
        g_prev_abort(msg);
    } else {
        std::fprintf(stderr, "%s\n", msg);
        ggml_print_backtrace();
    }
}

}  // namespace

bool rpc_available() { return rpc_reg() != nullptr; }
int rpc_proto_version() { return RPC_PROTO_MAJOR_VERSION; }

std::vector<std::string> split_list(const std::string & list) {
    std::vector<std::string> out;
    size_t start = 0;
    while (start <= list.size()) {
        size_t end = list.find(',', start);
        if (end == std::string::npos) end = list.size();
        std::string item = list.substr(start, end - start);
        item.erase(0, item.find_first_not_of(" \t"));
        item.erase(item.find_last_not_of(" \t") + 1);
        if (!item.empty()) out.push_back(item);
        start = end + 1;
    }
    return out;
}

std::vector<std::string> parse_rpc_servers(const std::string & list) {
    std::vector<std::string> out = split_list(list);
    for (const std::string & item : out) {
        std::string host;
        int port = 0;
        if (!split_endpoint(item, host, port)) throw Error(PLZ_ERR_ARG, "RPC server '" + item + "' is not host:port");
    }
    return out;
}

std::string rpc_probe(const std::string & endpoint, int timeout_ms) {
    std::string host;
    int port = 0;
    if (!split_endpoint(endpoint, host, port)) return "not host:port";
    ProbeSocket s;
    s.deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    const std::string err = s.connect_to(host, port);
    if (!err.empty()) return "cannot connect: " + err;
    uint8_t req[1 + 8 + CAPS_SIZE] = {HELLO_CMD};
    const uint64_t req_size = CAPS_SIZE;
    std::memcpy(req + 1, &req_size, 8);
    uint64_t rsp_size = 0;
    uint8_t rsp[4 + CAPS_SIZE];
    if (!s.send_all(req, sizeof(req)) || !s.recv_all(&rsp_size, 8)) {
        return s.ms_left() == 0 ? "connected, but no answer to HELLO within " + std::to_string(timeout_ms) +
                                  " ms (busy with another client?)"
                                : "connected, but it closed the connection (not a ggml RPC server of this version?)";
    }
    if (rsp_size != sizeof(rsp) || !s.recv_all(rsp, sizeof(rsp))) return "answered HELLO with an unexpected reply (another ggml version?)";
    if (rsp[0] != RPC_PROTO_MAJOR_VERSION) {
        return "speaks RPC protocol " + std::to_string(rsp[0]) + "." + std::to_string(rsp[1]) + ", this build " +
               std::to_string(RPC_PROTO_MAJOR_VERSION) + "." + std::to_string(RPC_PROTO_MINOR_VERSION);
    }
    return "";
}

std::vector<ggml_backend_dev_t> rpc_server_devices(const std::string & endpoint, int timeout_ms) {
    using add_server_t = ggml_backend_reg_t (*)(const char *);
    auto add_server = rpc_fn<add_server_t>("ggml_backend_rpc_add_server");
    if (!add_server) {
        throw Error(PLZ_ERR_LOAD, "this llama-cpp-python has no RPC backend: reinstall it with CMAKE_ARGS=\"-DGGML_RPC=on\" "
                                  "pip install --no-cache-dir --force-reinstall llama-cpp-python==0.3.36");
    }
    // With a live connection (a model of this process uses the server) ggml-rpc reuses it; a probe
    // would wait behind it (a server serves one client at a time).
    // PYLAZY_RPC_PROBE=0 leaves the connect to ggml-rpc alone (no timeout then; tests use it to check
    // that ggml-rpc's abort on a failed connect becomes an exception).
    const char * probe = std::getenv("PYLAZY_RPC_PROBE");
    const bool skip = rpc_users(endpoint) > 0 || (probe && std::strcmp(probe, "0") == 0);
    const std::string why = skip ? "" : rpc_probe(endpoint, timeout_ms);
    if (!why.empty()) throw Error(PLZ_ERR_LOAD, "RPC server " + endpoint + ": " + why);
    rpc_install_abort_handler();
    ggml_backend_reg_t reg = add_server(endpoint.c_str());
    if (!reg || ggml_backend_reg_dev_count(reg) == 0) throw Error(PLZ_ERR_LOAD, "RPC server " + endpoint + " offers no device");
    std::vector<ggml_backend_dev_t> devs;
    for (size_t i = 0; i < ggml_backend_reg_dev_count(reg); ++i) devs.push_back(ggml_backend_reg_dev_get(reg, i));
    return devs;
}

void rpc_keepalive(const std::vector<std::string> & endpoints) {
    // ggml-rpc's sockets are this process's: find them by their peer address.
    std::vector<sockaddr_in> peers;
    for (const std::string & e : endpoints) {
        std::string host;
        int port = 0;
        addrinfo hints = {}, * res = nullptr;
        hints.ai_family = AF_INET;
        hints.ai_socktype = SOCK_STREAM;
        if (!split_endpoint(e, host, port) || ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res) != 0) continue;
        peers.push_back(*(const sockaddr_in *) res->ai_addr);
        ::freeaddrinfo(res);
    }
    DIR * dir = ::opendir("/proc/self/fd");
    if (!dir) return;
    while (dirent * ent = ::readdir(dir)) {
        const int fd = std::atoi(ent->d_name);
        sockaddr_in peer = {};
        socklen_t len = sizeof(peer);
        if (fd <= 2 || ::getpeername(fd, (sockaddr *) &peer, &len) != 0 || peer.sin_family != AF_INET) continue;
        bool ours = false;
        for (const auto & p : peers) ours |= p.sin_addr.s_addr == peer.sin_addr.s_addr && p.sin_port == peer.sin_port;
        if (!ours) continue;
        // A host that vanishes sends no reset: keepalive probes (after 10 s idle, every 5 s, 3 lost)
        // and a 30 s limit on unacknowledged data turn that into a failed recv/send, then an error.
        const int on = 1, idle = 10, intvl = 5, cnt = 3;
        const unsigned user_timeout_ms = 30000;
        ::setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof(on));
        ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
        ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof(intvl));
        ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof(cnt));
        ::setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &user_timeout_ms, sizeof(user_timeout_ms));
    }
    ::closedir(dir);
}

bool is_rpc_device(ggml_backend_dev_t dev) {
    return dev && rpc_reg() && ggml_backend_dev_backend_reg(dev) == rpc_reg();
}

std::string rpc_serve(const std::string & endpoint, const std::vector<std::string> & names, int n_threads,
                      const std::string & cache_dir) {
    using start_t = void (*)(const char *, const char *, size_t, size_t, ggml_backend_dev_t *);
    auto start = rpc_fn<start_t>("ggml_backend_rpc_start_server");
    if (!start) return "this llama-cpp-python has no RPC backend (build it with CMAKE_ARGS=\"-DGGML_RPC=on\")";
    std::string host;
    int port = 0;
    if (!split_endpoint(endpoint, host, port)) return "endpoint '" + endpoint + "' is not host:port";
    std::vector<ggml_backend_dev_t> devs;
    for (const std::string & n : names) {
        ggml_backend_dev_t d = ggml_backend_dev_by_name(n.c_str());
        if (!d) {
            std::string known;
            for (size_t i = 0; i < ggml_backend_dev_count(); ++i) known += std::string(known.empty() ? "" : ", ") + ggml_backend_dev_name(ggml_backend_dev_get(i));
            return "unknown device '" + n + "' (this machine has: " + known + ")";
        }
        devs.push_back(d);
    }
    if (devs.empty()) {   // as ggml's rpc-server: the accelerators, else the CPU
        for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
            ggml_backend_dev_t d = ggml_backend_dev_get(i);
            const auto t = ggml_backend_dev_type(d);
            if (t != GGML_BACKEND_DEVICE_TYPE_CPU && t != GGML_BACKEND_DEVICE_TYPE_ACCEL) devs.push_back(d);
        }
        if (devs.empty()) devs.push_back(ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU));
    }
    start(endpoint.c_str(), cache_dir.empty() ? nullptr : cache_dir.c_str(), (size_t) std::max(1, n_threads), devs.size(), devs.data());
    return "the RPC server stopped (could not listen on " + endpoint + "? the port may be in use)";
}

void rpc_install_abort_handler() {
    bool expected = false;
    if (g_abort_installed.compare_exchange_strong(expected, true)) g_prev_abort = ggml_set_abort_callback(on_ggml_abort);
}

// -- executor --------------------------------------------------------------------------------------

struct RpcExecutor::Shared {
    std::function<void()> job;
    bool has_job = false, stop = false;
    uint64_t posted = 0, finished = 0;
    std::exception_ptr error;
};

RpcExecutor::RpcExecutor(std::vector<std::string> endpoints) : sh_(std::make_shared<Shared>()), endpoints_(std::move(endpoints)) {
    rpc_install_abort_handler();
    std::shared_ptr<Shared> sh = sh_;
    thread_ = std::thread([sh] {
        t_guarded = true;
        std::unique_lock<std::mutex> lock(g_mu);
        for (;;) {
            g_cv.wait(lock, [&] { return sh->has_job || sh->stop; });
            if (sh->stop) return;
            std::function<void()> job = std::move(sh->job);
            sh->has_job = false;
            lock.unlock();
            std::exception_ptr err;
            try {
                job();
            } catch (...) {
                err = std::current_exception();
            }
            lock.lock();
            sh->error = err;
            sh->finished = sh->posted;
            g_cv.notify_all();
        }
    });
}

RpcExecutor::~RpcExecutor() {
    {
        std::lock_guard<std::mutex> lock(g_mu);
        sh_->stop = true;
    }
    g_cv.notify_all();
    if (lost_) thread_.detach();   // blocked inside ggml-rpc for good
    else thread_.join();
}

// Whether a TCP connection to endpoint opens within timeout_ms (a killed server refuses at once).
static bool tcp_reachable(const std::string & endpoint, int timeout_ms) {
    std::string host;
    int port = 0;
    if (!split_endpoint(endpoint, host, port)) return false;
    ProbeSocket s;
    s.deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    return s.connect_to(host, port).empty();
}

static std::set<std::string> g_lost_endpoints;   // under g_mu
static std::map<std::string, int> g_users;        // under g_mu: models holding a connection to the endpoint

void rpc_acquire(const std::vector<std::string> & endpoints, int delta) {
    std::lock_guard<std::mutex> lock(g_mu);
    for (const std::string & e : endpoints) g_users[e] += delta;
}

int rpc_users(const std::string & endpoint) {
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = g_users.find(endpoint);
    return it == g_users.end() ? 0 : it->second;
}

void RpcExecutor::run(const std::function<void()> & job) {
    if (lost_) throw Error(PLZ_ERR_RUNTIME, reason_);
    std::unique_lock<std::mutex> lock(g_mu);
    uint64_t seen = g_failures;
    sh_->job = job;
    sh_->has_job = true;
    const uint64_t ticket = ++sh_->posted;
    g_cv.notify_all();
    for (;;) {
        g_cv.wait(lock, [&] { return sh_->finished == ticket || g_failures != seen; });
        if (sh_->finished == ticket) {
            std::exception_ptr err = sh_->error;
            sh_->error = nullptr;
            lock.unlock();
            if (err) std::rethrow_exception(err);
            return;
        }
        // Some dispatcher lost its connection: ours if one of our servers no longer accepts connections.
        seen = g_failures;
        const std::string msg = g_failure_msg;
        lock.unlock();
        std::string dead;
        for (const std::string & e : endpoints_) if (dead.empty() && !tcp_reachable(e, 1000)) dead = e;
        lock.lock();
        if (dead.empty() && !endpoints_.empty()) continue;
        // The dead server's dispatcher is gone for good; the others' stay usable by other models.
        if (dead.empty()) g_lost_endpoints.insert(endpoints_.begin(), endpoints_.end());
        else g_lost_endpoints.insert(dead);
        lost_ = true;
        reason_ = "lost the connection to RPC server " + (dead.empty() ? std::string("?") : dead) + " (" + msg +
                  "); this model cannot be used any more: load it again once the server is back";
        throw Error(PLZ_ERR_RUNTIME, reason_);
    }
}

bool rpc_endpoint_lost(const std::string & endpoint) {
    std::lock_guard<std::mutex> lock(g_mu);
    return g_lost_endpoints.count(endpoint) > 0;
}

}  // namespace plz
