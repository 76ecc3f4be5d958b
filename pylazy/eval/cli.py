"""`pylazy eval`: the task suite under several attention policies (see pylazy/eval/runner.py).

    pylazy eval --lengths 2048 --tasks niah_single --quick --threads 1 \
        --policy full='{}' --policy lazy='{"lazy": LazyPrefill()}'
"""
from __future__ import annotations


def register(subparsers) -> None:
    from .runner import add_arguments   # argparse only: the heavy imports wait for the run
    p = subparsers.add_parser("eval", help="accuracy vs speed of attention policies on RULER-style tasks",
                              description="Run RULER-style tasks under several policies; writes "
                                          "OUT/results.json and PNG plots.")
    add_arguments(p)
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args) -> int:
    from .runner import run_from_args
    run_from_args(args)
    return 0
