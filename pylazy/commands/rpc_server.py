"""`pylazy rpc-server`: ggml's own RPC server (ggml-rpc) for this machine's devices, so another
machine's pylazy can put layers on them (``Llama(rpc_servers=["host:port"])``)."""
from __future__ import annotations

import argparse
import os
import sys
import threading

from ..cli_args import UsageError, add_command

INSECURE = ("WARNING: the RPC server is insecure by its authors' own word (llama.cpp's tools/rpc: "
            "\"fragile and insecure. Never run the RPC server on an open network or in a sensitive "
            "environment!\"): it has no authentication and a client can allocate, read and write the "
            "server's device memory and run graphs on it. It binds to 127.0.0.1 unless --host says "
            "otherwise; expose it only on a network you trust.")


def register(subparsers) -> None:
    add_command(subparsers, "rpc-server", "serve this machine's devices to other pylazy processes (ggml RPC)",
                "Start ggml's RPC server for this machine's devices (the GPUs, else the CPU), so "
                "Llama(rpc_servers=['host:port']) elsewhere can put layers on them. Prints "
                "'pylazy rpc-server: ready on HOST:PORT' once it accepts connections. " + INSECURE,
                add_arguments, main)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; see the warning above)")
    p.add_argument("-p", "--port", type=int, default=50052, help="TCP port (default 50052)")
    p.add_argument("-d", "--device", action="append", default=None, metavar="NAME",
                   help="a device to serve, e.g. CPU or CUDA0 (repeat or comma-separate; default: the GPUs, "
                        "else the CPU); `pylazy rpc-server --list-devices` shows them")
    p.add_argument("-t", "--threads", type=int, default=None,
                   help="threads of the CPU device (default: half the cores)")
    p.add_argument("--cache-dir", default=None,
                   help="let clients send large tensors by hash, cached in this folder (default: off)")
    p.add_argument("--list-devices", action="store_true", help="list this machine's devices and exit")


def main(args: argparse.Namespace) -> int:
    from .. import _native as N
    from ..devices import rpc_available, rpc_install_hint, rpc_probe
    if not rpc_available():
        raise UsageError("this llama-cpp-python has no RPC backend; reinstall it with: " + rpc_install_hint())
    if args.list_devices:
        import llama_cpp  # noqa: F401
        print(_list_devices())
        return 0
    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port} is outside 1..65535")
    threads = args.threads or max(1, (os.cpu_count() or 2) // 2)
    if threads < 1:
        raise UsageError("--threads must be >= 1")
    devices = ",".join(d.strip() for group in (args.device or []) for d in group.split(",") if d.strip())
    endpoint = f"{args.host}:{args.port}"
    if args.host != "127.0.0.1":
        print("pylazy rpc-server: " + INSECURE, file=sys.stderr)
    result = {}

    def serve() -> None:   # blocks in ggml while serving (ctypes releases the GIL)
        cache = args.cache_dir.encode() if args.cache_dir else None
        result["code"] = N.lib.plz_rpc_serve(endpoint.encode(), devices.encode(), threads, cache)
        result["error"] = N.last_error()

    server = threading.Thread(target=serve, name="ggml-rpc-server", daemon=True)
    server.start()
    # Ready once it answers ggml-rpc's HELLO (ggml prints nothing once it listens).
    while server.is_alive() and rpc_probe(endpoint, timeout=0.5) is not None:
        server.join(0.05)
    if not server.is_alive():
        print(f"pylazy rpc-server: error: {result.get('error') or 'the server stopped'}", file=sys.stderr)
        return 1
    print(f"pylazy rpc-server: ready on {endpoint} ({threads} threads)", flush=True)
    try:
        while server.is_alive():
            server.join(0.5)
    except KeyboardInterrupt:
        print("pylazy rpc-server: stopped", file=sys.stderr)
        sys.stdout.flush()
        os._exit(0)   # the native server thread cannot be joined
    print(f"pylazy rpc-server: error: {result.get('error')}", file=sys.stderr)
    return 1


def _list_devices() -> str:
    import ctypes
    from .. import _native as N
    buf = ctypes.create_string_buffer(8192)
    N.lib.plz_local_devices(buf, len(buf))
    return buf.value.decode().rstrip("\n")
