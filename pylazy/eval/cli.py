"""`pylazy eval`: the task suite under several attention policies (see pylazy/eval/runner.py).

    pylazy eval --lengths 2048 --tasks niah_single --quick --threads 1 \
        --policy full='{}' --policy lazy='{"lazy": LazyPrefill()}'
"""
from __future__ import annotations

import argparse

from ..cli_args import add_command
from .args import add_arguments


def register(subparsers) -> None:
    add_command(subparsers, "eval", "accuracy vs speed of attention policies on RULER-style tasks",
                "Run RULER-style tasks under several policies; writes OUT/results.json and PNG plots.",
                add_arguments, main)


def main(args: argparse.Namespace) -> int:
    from .runner import run_from_args
    run_from_args(args)
    return 0
