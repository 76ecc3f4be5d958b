"""The ``pylazy`` command: run a prompt, chat, inspect a model file, benchmark, evaluate.

    pylazy run "The capital of France is" -n 32
    pylazy run --prompt-file long.txt --lazy --recycle-k 256 --stride 16 --json
    pylazy chat -m model.gguf
    pylazy info --json

Each subcommand is a module in ``COMMAND_MODULES`` with ``register(subparsers)`` and
``main(args) -> exit code`` (pylazy/commands/); optional ones are skipped when their module
is not there. Commands import what they share from pylazy.cli_args, never from here.
Exit codes: 0 ok, 1 runtime failure, 2 usage error or model file missing/unloadable
(message on stderr).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from typing import Optional, Sequence

from .cli_args import UsageError
from .errors import ModelLoadError

COMMAND_MODULES = ("pylazy.commands.run", "pylazy.commands.chat", "pylazy.commands.info",
                   "pylazy.commands.rpc_server",
                   "pylazy.bench", "pylazy.eval.cli", "pylazy.server.cli", "pylazy.tune")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(prog="pylazy", description="Long-context GGUF inference with lazy "
                                     "prefill and recycled attention.")
    parser.add_argument("--version", action="version", version=f"pylazy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ImportError:
            found = False
        if found:
            importlib.import_module(name).register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        parser.exit(2, f"{parser.prog} {args.command}: error: {exc}\n")
    except ModelLoadError as exc:
        print(f"pylazy: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:   # `pylazy run ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, RuntimeError) as exc:
        print(f"pylazy: error: {exc}", file=sys.stderr)
        return 1
    return 0
