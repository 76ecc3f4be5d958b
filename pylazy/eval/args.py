"""The flags of `pylazy eval` and `python -m pylazy.eval.runner` (stdlib only: the parser is
built on every `pylazy` start)."""
from __future__ import annotations

import argparse

from .tasks import FAMILIES   # stdlib only: the parser is built on every `pylazy` start

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default=None, help="GGUF path (default: the default model)")
    ap.add_argument("--backend", default="pylazy", choices=["pylazy", "llama_cpp"])
    ap.add_argument("--policy", action="append", default=[], metavar="NAME=DICT",
                    help="e.g. lazy='{\"lazy\": LazyPrefill()}' or rk='lambda L: {\"recycle\": Recycle(k=L // 8)}'")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024])
    ap.add_argument("--tasks", nargs="*", default=list(FAMILIES),
                    help="task specs; none (bare --tasks) = perplexity only")
    ap.add_argument("--depths", type=float, nargs="+", default=list(DEFAULT_DEPTHS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--ppl-tokens", type=int, default=2048,
                    help="perplexity context: min(length, this) tokens of natural text; 0 = no perplexity")
    ap.add_argument("--ppl-decode", type=int, default=256,
                    help="tokens teacher-forced through decode steps after the context, each scored")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads of the engine")
    ap.add_argument("--n-gpu-layers", type=int, default=None,
                    help="layers on the GPU for both backends (-1: all; default: the backend's default)")
    ap.add_argument("--no-share", action="store_true",
                    help="one runner per policy, fresh prefill every call (no shared full prefill)")
    ap.add_argument("--chat", action="store_true", help="use the model's chat template")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--no-plots", action="store_true",
                    help="results.json and the table only (plot later with pylazy.eval.plots.plot_all)")
    ap.add_argument("--out", default="out/eval")
