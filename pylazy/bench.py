"""`pylazy bench`: pylazy's engine against llama-cpp-python on the same GGUF file, in one run.

    pylazy bench                                  # prefill, decode and TTFT tables, default model
    pylazy bench --quick                          # lengths 256/512 only (smoke test, < 60 s)
    pylazy bench --rows ttft --lengths 4096 --lazy-layers 8,16 --lazy-keep 0.5,0.25 --json out.json

Both engines get the same thread count, n_ctx and ubatch (512), attention path (llama.cpp's
default without flash attention; --flash-attn for both), KV cache types (--type-k / --type-v) and
CPU weight buffers (llama.cpp's repacked ones; --no-extra-bufts turns them off on both), so a ratio
compares kernels and graphs, not settings. Each engine is warmed up once; a cell is the
median of ``--repeat`` runs, pylazy and llama.cpp alternating so that load from other processes
hits both alike. Prompts are text tokens (see ``bench_tokens``), not random ids.

Tables:
- prefill: tok/s of one prompt of each length, full attention, both engines;
- decode: tok/s of greedy single-token steps after a prefill to each depth (prefill not timed);
- ttft: seconds to the first logits, pylazy full vs pylazy lazy prefill, with the fraction of
  (token, layer) pairs lazy prefill computed and the KV bytes each allocated.

``decode_rows(policy, ...)`` is where decode policies plug in; only "full" runs now (see
``DECODE_POLICIES``).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parent.parent
PREFILL_LENGTHS = (512, 2048, 8000)
DECODE_DEPTHS = (0, 2048, 8000)
TTFT_LENGTHS = (2048, 4096, 8000)
QUICK_LENGTHS = (256, 512)
ROWS = ("prefill", "decode", "ttft", "request")
DEFAULT_ROWS = ("prefill", "decode", "ttft")
LONG_ROW = 4096          # rows at least this long run once unless --repeat says otherwise
SHORT_REPEAT = 3
N_UBATCH = 512
CTX_ALIGN = 256
TEXT_SEED = 1234
# Where the benchmark text comes from (relative to the repo root), in this order, then shuffled.
# Not docs/: the benchmark writes its results there and would change its own prompts.
TEXT_SOURCES = ("README.md", "pylazy/*.py", "pylazy/eval/*.py", "native/*.h", "native/*.cpp")


# ----- prompt tokens -----------------------------------------------------------------------
def _corpus_paragraphs(root: Path) -> List[str]:
    paragraphs: List[str] = []
    for pattern in TEXT_SOURCES:
        for path in sorted(root.glob(pattern)):
            text = path.read_text(encoding="utf-8", errors="replace")
            paragraphs += [p.strip() for p in text.split("\n\n") if p.strip()]
    if not paragraphs:
        raise RuntimeError(f"no benchmark text found under {root} ({', '.join(TEXT_SOURCES)})")
    return paragraphs


def bench_tokens(tokenize: Callable[[bytes], List[int]], n: int, *, seed: int = TEXT_SEED,
                 root: Path = REPO_ROOT) -> List[int]:
    """n token ids of deterministic natural-ish text: the repo's README, docs and source split into
    paragraphs, shuffled with `seed` (a new shuffle each round) and joined until n tokens.

    Real text rather than random ids, so lazy prefill's attention scores look like a real
    prompt's. The same repo state gives the same tokens (their sha256 goes into the JSON).
    """
    paragraphs = _corpus_paragraphs(root)
    rng = random.Random(seed)
    tokens: List[int] = []
    while len(tokens) < n:
        order = paragraphs[:]
        rng.shuffle(order)
        tokens += tokenize("\n\n".join(order).encode("utf-8") + b"\n\n")
    return tokens[:n]


def _tokens_digest(tokens: Sequence[int]) -> str:
    return hashlib.sha256(",".join(map(str, tokens)).encode()).hexdigest()[:16]


# ----- the two engines ---------------------------------------------------------------------
def _median_run(repeat: int, fns: Sequence[Callable[[], float]], seconds: Optional[List[list]] = None) -> List[float]:
    """Runs each fn `repeat` times, alternating fns (first fn first on even rounds, last on odd);
    the median seconds of each. Every run's seconds are appended to `seconds` (one list per fn),
    so the JSON shows how noisy a cell was."""
    times: List[List[float]] = [[] for _ in fns]
    for r in range(repeat):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            times[i].append(fns[i]())
    if seconds is not None:
        seconds.extend([round(t, 4) for t in ts] for ts in times)
    return [statistics.median(t) for t in times]


@dataclass
class Engines:
    """One pylazy Model + Context and one llama_cpp.Llama on the same file and settings."""
    model_path: str
    threads: int
    n_ctx: int
    n_ubatch: int = N_UBATCH
    flash_attn: bool = False
    type_k: Optional[str] = None
    type_v: Optional[str] = None
    use_extra_bufts: bool = True
    model: object = field(init=False)
    ctx: object = field(init=False)
    llm: object = field(init=False)

    def __post_init__(self) -> None:
        from llama_cpp._utils import suppress_stdout_stderr
        from .engine import Context, Model, kv_type
        from .llama_ref import reference_llama   # llama.cpp as a user gets it (except where AMX crashes)
        self.model = Model(self.model_path, n_threads=self.threads, use_extra_bufts=self.use_extra_bufts)
        self.ctx = Context(self.model, n_ctx=self.n_ctx, n_ubatch=self.n_ubatch, n_threads=self.threads,
                           flash_attn=self.flash_attn, type_k=self.type_k, type_v=self.type_v)
        with suppress_stdout_stderr(disable=False):
            self.llm = reference_llama(self.model_path, n_ctx=self.n_ctx, n_batch=self.n_ubatch,
                                       n_ubatch=self.n_ubatch, n_threads=self.threads,
                                       n_threads_batch=self.threads, flash_attn=self.flash_attn,
                                       type_k=kv_type(self.type_k), type_v=kv_type(self.type_v, "type_v"),
                                       use_extra_bufts=None if self.use_extra_bufts else False, verbose=False)
        self.n_vocab = self.model.info.n_vocab
        self.n_layer = self.model.info.n_layer

    def tokenize(self, text: bytes) -> List[int]:
        return self.llm.tokenize(text, add_bos=False, special=False)

    # pylazy
    def pylazy_prefill(self, tokens: Sequence[int], schedule: Sequence[Tuple[int, float]] = ()) -> float:
        """Seconds from an empty cache to the last token's logits. The whole prompt goes in one
        eval (the engine splits it into ubatches; a lazy schedule needs the whole prompt)."""
        self.ctx.reset()
        if list(schedule) != self.ctx.lazy_schedule:
            self.ctx.set_lazy(list(schedule))
        t0 = time.perf_counter()
        self.ctx.eval(tokens)
        return time.perf_counter() - t0

    def pylazy_prefill_stats(self) -> Dict[str, float]:
        """computed_fraction and KV bytes of the prefill just run (prompt tokens = n_past)."""
        st = self.ctx.layer_stats()
        n_prompt = max(1, self.ctx.n_past)
        return {"computed_fraction": sum(st["cells"]) / (n_prompt * len(st["cells"])),
                "kv_bytes": int(sum(st["kv_bytes"]))}

    # llama.cpp
    def llama_prefill(self, tokens: Sequence[int]) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(tokens)
        return time.perf_counter() - t0

    def llama_last_logits(self):
        import numpy as np
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.n_vocab,))

    def llama_decode(self, prefix: Sequence[int], first: int, n_steps: int) -> Tuple[float, List[int]]:
        """Prefill `prefix` (not timed), then n_steps greedy Llama.eval([tok]) steps from `first`:
        (seconds, tokens fed)."""
        import numpy as np
        self.llm.reset()
        if prefix:
            self.llm.eval(prefix)
        tok, fed = first, []
        t0 = time.perf_counter()
        for _ in range(n_steps):
            self.llm.eval([tok])
            fed.append(tok)
            tok = int(np.argmax(self.llama_last_logits()))
        return time.perf_counter() - t0, fed

    def warm_up(self, tokens: Sequence[int], schedules: Sequence[Sequence[Tuple[int, float]]]) -> None:
        """One short prefill per schedule and a few decode steps on each engine (allocations,
        thread pools, page faults out of the measurements)."""
        for schedule in [()] + [s for s in schedules if s]:
            self.pylazy_prefill(tokens, schedule)
        self.pylazy_prefill(tokens)
        for tok in tokens[:4]:
            self.ctx.eval([tok])
        self.llama_prefill(tokens)
        self.llama_decode([], tokens[0], 4)

    def close(self) -> None:
        self.llm.close()
        self.ctx.close()
        self.model.close()


# ----- decode policies (hook) --------------------------------------------------------------
def _full_setup(eng: Engines, options: dict) -> None:
    """Full attention: every step is a plain one-token step."""
    return None


def _recycled_setup(eng: Engines, options: dict):
    """Recycle() as users get it (pool, share), with K = depth / 8 (at least 64) and stride 16
    unless options say otherwise."""
    from .policy import Recycle
    k = int(options.get("k") or max(64, options.get("depth", 0) // 8))
    return Recycle(k=k, stride=int(options.get("stride", 16)))


# name -> setup(engines, options) -> the decode policy generate_step runs (None, Recycle, ...).
DECODE_POLICIES: Dict[str, Callable[[Engines, dict], object]] = {"full": _full_setup, "recycled": _recycled_setup}


def pylazy_decode(eng: Engines, recycle, prefix: Sequence[int], first: int, n_steps: int) -> Tuple[float, List[int]]:
    """Like Engines.llama_decode, on pylazy: prefill `prefix` (not timed), then n_steps greedy
    steps from `first` through pylazy.generate's token loop under the decode policy `recycle`."""
    from .generate import ContextCache, Forced, Greedy, configure_recycle, generate_step
    cache = ContextCache(eng.ctx)
    cache.reset()
    if eng.ctx.lazy_schedule:
        eng.ctx.set_lazy([])
    logits = eng.ctx.eval(prefix)[-1] if prefix else None
    cache.tokens = list(prefix)
    configure_recycle(eng.ctx, recycle)   # outside the timing (a new configuration allocates)
    fed: List[int] = []
    t0 = time.perf_counter()
    steps = generate_step(cache, logits, Forced([first], then=Greedy()), recycle=recycle)
    for tok, _ in steps:
        if len(fed) == n_steps:   # the n_steps fed tokens are evaluated; this one never is
            break
        fed.append(tok)
    steps.close()
    return time.perf_counter() - t0, fed


# ----- rows --------------------------------------------------------------------------------
def _repeats(n_tokens: int, repeat: Optional[int]) -> int:
    return repeat if repeat is not None else (1 if n_tokens >= LONG_ROW else SHORT_REPEAT)


def _default_repeat(args: argparse.Namespace) -> Optional[int]:
    """--repeat, else 1 for --quick (a smoke test), else None (per row: see _repeats)."""
    return args.repeat if args.repeat is not None else (1 if args.quick else None)


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def prefill_rows(eng: Engines, tokens: Sequence[int], lengths: Sequence[int], repeat: Optional[int],
                 tick: Callable[[str], None]) -> List[dict]:
    rows = []
    for n in lengths:
        tick(f"prefill {n}")
        prompt = tokens[:n]
        runs = _repeats(n, repeat)
        seconds: List[list] = []
        t_plz, t_ref = _median_run(runs, [lambda: eng.pylazy_prefill(prompt), lambda: eng.llama_prefill(prompt)],
                                   seconds)
        rows.append({"n_tokens": n, "runs": runs, "pylazy_s": t_plz, "llama_cpp_s": t_ref, "run_seconds": seconds,
                     "pylazy_tok_s": n / t_plz, "llama_cpp_tok_s": n / t_ref, "ratio": t_ref / t_plz,
                     "load": _load()})
    return rows


def decode_rows(policy: str, eng: Engines, tokens: Sequence[int], depths: Sequence[int], n_steps: int,
                repeat: Optional[int], tick: Callable[[str], None], options: Optional[dict] = None,
                ref_cache: Optional[dict] = None) -> List[dict]:
    """Decode tok/s after a prefill to each depth: pylazy with decode `policy` (a DECODE_POLICIES
    name) vs llama.cpp full attention. greedy_agree: how many fed tokens agree from the start
    (the first is the same text token for both; later ones are each engine's greedy pick).
    ref_cache (depth -> llama.cpp result) lets several policies share one llama.cpp measurement."""
    if policy not in DECODE_POLICIES:
        raise ValueError(f"decode policy {policy!r} not available (have: {', '.join(DECODE_POLICIES)})")
    rows = []
    for depth in depths:
        recycle = DECODE_POLICIES[policy](eng, dict(options or {}, depth=depth))
        tick(f"decode {policy} @{depth}")
        prefix, first = tokens[:depth], tokens[depth]
        runs = _repeats(depth, repeat)
        fed: Dict[str, List[int]] = {}

        def plz() -> float:
            t, fed["pylazy"] = pylazy_decode(eng, recycle, prefix, first, n_steps)
            return t

        def ref() -> float:
            t, fed["llama_cpp"] = eng.llama_decode(prefix, first, n_steps)
            return t

        seconds: List[list] = []
        if ref_cache is not None and depth in ref_cache:
            t_ref, fed["llama_cpp"], ref_seconds = ref_cache[depth]
            t_plz, = _median_run(runs, [plz], seconds)
            seconds.append(ref_seconds)
        else:
            t_plz, t_ref = _median_run(runs, [plz, ref], seconds)
            if ref_cache is not None:
                ref_cache[depth] = (t_ref, fed["llama_cpp"], seconds[1])
        agree = 0
        for a, b in zip(fed["pylazy"], fed["llama_cpp"]):
            if a != b:
                break
            agree += 1
        label = policy + (f" K={recycle.k} S={recycle.stride}" if recycle is not None else "")
        rows.append({"policy": label, "depth": depth, "steps": n_steps, "runs": runs,
                     "pylazy_tok_s": n_steps / t_plz, "llama_cpp_tok_s": n_steps / t_ref,
                     "ratio": t_ref / t_plz, "greedy_agree": agree, "run_seconds": seconds, "load": _load()})
    return rows


def ttft_rows(eng: Engines, tokens: Sequence[int], lengths: Sequence[int], lazies: Sequence[Tuple[str, object]],
              repeat: Optional[int], tick: Callable[[str], None]) -> List[dict]:
    """Per length and lazy schedule: full vs lazy prefill seconds, computed fraction, KV bytes."""
    rows = []
    for n in lengths:
        prompt = tokens[:n]
        runs = _repeats(n, repeat)
        tick(f"ttft full {n}")
        full_seconds: List[list] = []
        t_full = _median_run(runs, [lambda: eng.pylazy_prefill(prompt)], full_seconds)[0]
        full_stats = eng.pylazy_prefill_stats()
        for name, lazy in lazies:
            tick(f"ttft {name} {n}")
            schedule = lazy.resolve(eng.n_layer)
            lazy_seconds: List[list] = []
            t_lazy = _median_run(runs, [lambda: eng.pylazy_prefill(prompt, schedule)], lazy_seconds)[0]
            st = eng.pylazy_prefill_stats()
            rows.append({"n_tokens": n, "lazy": name, "schedule": schedule, "runs": runs,
                         "full_s": t_full, "lazy_s": t_lazy, "speedup": t_full / t_lazy,
                         "computed_fraction": st["computed_fraction"],
                         "kv_bytes_full": full_stats["kv_bytes"], "kv_bytes_lazy": st["kv_bytes"],
                         "run_seconds": full_seconds + lazy_seconds,
                         "load": _load()})
    return rows


# ----- report ------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" ---: " for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(result: dict) -> str:
    m = result["meta"]
    out = [f"{m['date']} · {m['cpu']} · {m['threads']} threads · {os.path.basename(m['model'])} · "
           f"pylazy {m['pylazy_version']} · llama-cpp-python {m['llama_cpp_version']} · n_ctx {m['n_ctx']} · "
           f"ubatch {m['n_ubatch']} · load {m['load_start']} → {m['load_end']}"]
    if "flash_attn" in m:
        out[0] += (f" · flash_attn {'on' if m['flash_attn'] else 'off'} · KV {m['type_k']}/{m['type_v']} "
                   f"({m['kv_bytes_pylazy'] / 2 ** 20:.1f} MiB) · repacked weights "
                   f"{m['pylazy_repacked_tensors'] if m['extra_bufts'] else 'off'}")
    if result.get("prefill"):
        out += ["", "**Prefill** (tok/s, full attention; ratio = pylazy / llama.cpp speed)", "",
                _table(["prompt", "pylazy", "llama.cpp", "ratio", "runs"],
                       [[str(r["n_tokens"]), f"{r['pylazy_tok_s']:.0f}", f"{r['llama_cpp_tok_s']:.0f}",
                         f"{r['ratio']:.2f}", str(r["runs"])] for r in result["prefill"]])]
    if result.get("decode"):
        out += ["", f"**Decode** (tok/s over {result['decode'][0]['steps']} greedy steps after a prefill "
                "to the depth; agree = leading greedy tokens equal in both engines)", "",
                _table(["depth", "pylazy policy", "pylazy", "llama.cpp", "ratio", "agree", "runs"],
                       [[str(r["depth"]), r["policy"], f"{r['pylazy_tok_s']:.1f}", f"{r['llama_cpp_tok_s']:.1f}",
                         f"{r['ratio']:.2f}", f"{r['greedy_agree']}/{r['steps']}", str(r["runs"])]
                        for r in result["decode"]])]
    if result.get("ttft"):
        out += ["", "**TTFT** (s to first logits, pylazy; computed = fraction of (token, layer) pairs "
                "computed; KV = allocated KV cache)", "",
                _table(["prompt", "lazy", "full s", "lazy s", "speedup", "computed", "KV full MiB",
                        "KV lazy MiB", "runs"],
                       [[str(r["n_tokens"]), r["lazy"], f"{r['full_s']:.3f}", f"{r['lazy_s']:.3f}",
                         f"{r['speedup']:.2f}", f"{r['computed_fraction']:.3f}",
                         f"{r['kv_bytes_full'] / 2 ** 20:.1f}", f"{r['kv_bytes_lazy'] / 2 ** 20:.1f}",
                         str(r["runs"])] for r in result["ttft"]])]
    if result.get("request"):
        from .bench_request import request_table
        out.append(request_table(result["request"], *result["meta"]["request"]))
    out.append("")
    return "\n".join(out)


# ----- command -----------------------------------------------------------------------------
def _ints(text: str, flag: str) -> List[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{flag}: comma-separated integers expected, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"{flag}: non-negative integers expected, got {text!r}")
    return values


def _request_size(text: str) -> Tuple[int, int]:
    try:
        n, g = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--request wants N:G (prompt and generated tokens), got {text!r}") from None
    if n < 64 or g < 2:
        raise argparse.ArgumentTypeError(f"--request: N >= 64 and G >= 2, got {text!r}")
    return n, g


def _floats(text: str) -> List[float]:
    return [float(x) for x in text.split(",") if x.strip()]


@dataclass
class Plan:
    rows: List[str]
    prefill: List[int]
    depths: List[int]
    ttft: List[int]
    lazies: List[Tuple[str, object]]
    n_ctx: int


def make_plan(args: argparse.Namespace) -> Plan:
    """What to run, from the flags; ValueError (shown as a usage error) when it cannot fit."""
    from .policy import LazyPrefill
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad or not rows:
        raise ValueError(f"--rows: choose from {','.join(ROWS)}, got {args.rows!r}")
    quick = list(QUICK_LENGTHS) if args.quick else None
    lengths = args.lengths
    prefill = lengths or quick or list(PREFILL_LENGTHS)
    ttft = lengths or quick or list(TTFT_LENGTHS)
    depths = args.depths or quick or list(DECODE_DEPTHS)
    if min(prefill + ttft) < 1:
        raise ValueError("--lengths must be >= 1")
    lazies: List[Tuple[str, object]] = [("default", LazyPrefill())]
    if (args.lazy_layers is None) != (args.lazy_keep is None):
        raise ValueError("--lazy-layers and --lazy-keep go together")
    if args.lazy_layers is not None:
        layers = [float(x) if "." in x else int(x) for x in args.lazy_layers.split(",") if x.strip()]
        lazies.append((f"{args.lazy_layers}/{args.lazy_keep}",
                       LazyPrefill(layers=tuple(layers), keep=tuple(_floats(args.lazy_keep)))))
    need = 0
    if "prefill" in rows:
        need = max(need, *prefill)
    if "ttft" in rows:
        need = max(need, *ttft)
    if "decode" in rows:
        need = max(need, max(depths) + args.decode_steps + 1)
    if "request" in rows:
        need = max(need, sum(args.request))
    n_ctx = args.n_ctx or -(-need // CTX_ALIGN) * CTX_ALIGN
    if need > n_ctx:
        raise ValueError(f"--n-ctx {n_ctx} is too small: the rows need {need} tokens")
    return Plan(rows, prefill, depths, ttft, lazies, n_ctx)


def run_bench(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    from . import __version__
    from .models import resolve_model_path
    import llama_cpp

    plan = make_plan(args)
    repeat = _default_repeat(args)
    path = resolve_model_path(args.model)
    load_start, t_start = _load(), datetime.datetime.now()
    eng = Engines(path, args.threads, plan.n_ctx, flash_attn=args.flash_attn, type_k=args.type_k,
                  type_v=args.type_v, use_extra_bufts=not args.no_extra_bufts)
    kv_bytes = int(sum(eng.ctx.layer_stats()["kv_bytes"]))
    info = eng.model.info
    try:
        for _, lazy in plan.lazies:
            lazy.resolve(eng.n_layer)   # a bad layer fails before any timing
        n_tokens = max(plan.prefill + plan.ttft + [d + args.decode_steps + 1 for d in plan.depths] + [args.request[0]])
        tokens = bench_tokens(eng.tokenize, n_tokens)
        eng.warm_up(tokens[:min(256, plan.n_ctx - 8)], [lz.resolve(eng.n_layer) for _, lz in plan.lazies])
        n_ticks = (("prefill" in plan.rows) * len(plan.prefill) + ("decode" in plan.rows) * len(plan.depths)
                   + ("ttft" in plan.rows) * len(plan.ttft) * (1 + len(plan.lazies)) + ("request" in plan.rows) * 5)
        bar = tqdm(total=n_ticks, desc="bench", unit="row", file=sys.stderr, disable=args.no_progress)

        started = [0]

        def tick(label: str) -> None:   # called as each row starts: the previous one is done
            if started[0]:
                bar.update(1)
            started[0] += 1
            bar.set_description(label)

        result: dict = {}
        if "prefill" in plan.rows:
            result["prefill"] = prefill_rows(eng, tokens, plan.prefill, repeat, tick)
        if "decode" in plan.rows:
            from .generate import configure_recycle
            ref_cache: dict = {}  # llama.cpp runs full attention for both policies: measure it once per depth
            result["decode"] = [row for policy in ("full", "recycled")
                                for row in decode_rows(policy, eng, tokens, plan.depths, args.decode_steps, repeat, tick,
                                                       ref_cache=ref_cache)]
            configure_recycle(eng.ctx, None)
        if "ttft" in plan.rows:
            result["ttft"] = ttft_rows(eng, tokens, plan.ttft, plan.lazies, repeat, tick)
        if "request" in plan.rows:
            from .bench_request import request_rows
            from .engine import kv_type
            same = {"flash_attn": args.flash_attn, "type_k": kv_type(args.type_k), "type_v": kv_type(args.type_v, "type_v")}
            result["request"] = request_rows(path, tokens[:args.request[0]], args.request[1], args.threads,
                                             plan.n_ctx, tick,
                                             llama_kwargs=dict(same, use_extra_bufts=None if eng.use_extra_bufts else False),
                                             pylazy_kwargs=dict(same, use_extra_bufts=eng.use_extra_bufts))
        bar.update(bar.total - bar.n)
        bar.close()
    finally:
        eng.close()
    result["meta"] = {
        "date": t_start.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_model(),
        "threads": args.threads, "model": path, "model_bytes": os.path.getsize(path),
        "pylazy_version": __version__, "llama_cpp_version": llama_cpp.__version__,
        "n_ctx": plan.n_ctx, "n_ubatch": N_UBATCH, "flash_attn": args.flash_attn,
        "type_k": args.type_k or "f16", "type_v": args.type_v or "f16", "kv_bytes_pylazy": kv_bytes,
        "extra_bufts": not args.no_extra_bufts, "pylazy_repacked_tensors": info.n_extra_tensors,
        "pylazy_extra_bufts": info.extra_bufts,
        "repeat": repeat, "decode_steps": args.decode_steps, "request": list(args.request),
        "tokens": {"source": "repo text " + " ".join(TEXT_SOURCES) + f", paragraphs shuffled (seed {TEXT_SEED})",
                   "n": n_tokens, "sha256_16": _tokens_digest(tokens)},
        "load_start": load_start, "load_end": _load(),
        "command": "python -m pylazy " + " ".join(sys.argv[1:]),
    }
    return {"meta": result.pop("meta"), **result}


def main(args: argparse.Namespace) -> int:
    from .cli_args import UsageError, require_at_least
    for flag, value in (("--threads", args.threads), ("--decode-steps", args.decode_steps),
                        ("--repeat", args.repeat)):
        require_at_least(flag, value, 1)
    try:
        make_plan(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    result = run_bench(args)
    sys.stdout.write(markdown(result))
    sys.stdout.flush()
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None, help="GGUF file or registry name (default: the default model)")
    p.add_argument("--threads", type=int, default=2, help="threads for both engines (default 2)")
    p.add_argument("--n-ctx", type=int, default=0,
                   help=f"context for both engines (default: what the rows need, rounded up to {CTX_ALIGN})")
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                   help=f"tables to run, from {','.join(ROWS)} (default {','.join(DEFAULT_ROWS)})")
    p.add_argument("--request", type=_request_size, default=(8000, 128), metavar="N:G",
                   help="the request row: an N-token prompt + G generated tokens, llama-cpp-python and pylazy "
                        "full/lazy/recycled/both, TTFT, decode rate, total (default 8000:128)")
    p.add_argument("--lengths", type=lambda s: _ints(s, "--lengths"), default=None,
                   help=f"prompt lengths for prefill and ttft (default {PREFILL_LENGTHS} and {TTFT_LENGTHS})")
    p.add_argument("--depths", type=lambda s: _ints(s, "--depths"), default=None,
                   help=f"decode depths (default {DECODE_DEPTHS})")
    p.add_argument("--decode-steps", type=int, default=32, help="timed decode steps per depth (default 32)")
    p.add_argument("--repeat", type=int, default=None,
                   help=f"runs per cell, median reported (default {SHORT_REPEAT}, 1 from {LONG_ROW} tokens "
                        "and with --quick)")
    p.add_argument("--quick", action="store_true", help=f"lengths and depths {QUICK_LENGTHS} only, one run each (smoke test)")
    p.add_argument("--lazy-layers", metavar="L,L,...", help="an extra lazy schedule for ttft: pruning layers")
    p.add_argument("--lazy-keep", metavar="F,F,...", help="its keep fractions (with --lazy-layers)")
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    p.add_argument("--flash-attn", action="store_true", help="flash attention on both engines (default: off, as llama.cpp)")
    p.add_argument("--type-k", default=None, help="KV cache K type on both engines (f16, q8_0, q4_0, ...; default f16)")
    p.add_argument("--type-v", default=None, help="KV cache V type on both (a quantized V needs --flash-attn)")
    p.add_argument("--no-extra-bufts", action="store_true",
                   help="plain CPU weight buffers on both engines (default: llama.cpp's repacked ones)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def register(subparsers) -> None:
    from .cli_args import add_command
    add_command(subparsers, "bench", "speed vs llama-cpp-python on the same model file",
                "Prefill, decode and TTFT speed of pylazy against llama-cpp-python "
                "(same file, threads, n_ctx, ubatch), as markdown tables.", add_arguments, main)
