#!/usr/bin/env python3
"""pylazy vs llama.cpp on one GGUF file, same run, same device: parity, prefill, TTFT, decode.

Made for the H100 machine (scripts/README.md: device_build.sh builds both with CUDA and writes a
random Llama-3-8B-shaped Q4_K file), runs anywhere (CPU with --n-gpu-layers 0 and small --lengths).

    python3 scripts/gpu_bench.py --model /tmp/llama3-8b-random-q4_k.gguf --out bench.json

Rows: logit parity (max |diff|, top-1 agreement) on a short prompt; prefill tok/s at --prefill
lengths (pylazy full vs llama.cpp, flash attention on); TTFT of pylazy's lazy default at the longest;
decode tok/s at --depths (pylazy full, pylazy recycled K/S, llama.cpp). Prompts are random token ids
(speed does not depend on them).
"""
from __future__ import annotations

# Before numpy: on the GPU machine (torch venv numpy 2.5.2, libllama built with a static libstdc++),
# `import numpy` before `import llama_cpp` makes llama.cpp's model load segfault in its tokenizer
# init — with or without pylazy (seen 2026-11-22). Importing llama_cpp first avoids it.
import llama_cpp  # noqa: F401,I001

import argparse
import os
import gc
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llama_cpp  # noqa: E402

import pylazy  # noqa: E402
from pylazy.engine import Context, Model, RecycleMode  # noqa: E402
from pylazy.bench_request import request_rows, request_table  # noqa: E402
from pylazy.generate import ContextCache, Greedy, generate_step, prefill  # noqa: E402
from pylazy.llama_ref import reference_llama  # noqa: E402
from pylazy.policy import StepKind  # noqa: E402


def tokens(n: int, seed: int = 0) -> list:
    return np.random.default_rng(seed).integers(1000, 40000, size=n).tolist()


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def ref_model(path, n_ctx, args):
    return reference_llama(path, n_ctx=n_ctx, n_batch=args.n_batch, n_ubatch=args.n_ubatch, flash_attn=True,
                           n_gpu_layers=args.n_gpu_layers, logits_all=False, n_threads=args.threads)


def ref_prefill(llm, toks) -> float:
    llm.reset()
    llm._ctx.memory_clear(True) if hasattr(llm._ctx, "memory_clear") else None
    t = time.perf_counter()
    llm.eval(toks)
    return time.perf_counter() - t


def median_of(reps, fn):
    """Median of `reps` calls of fn() (each one measurement): single runs on the GPU vary by 5-10 %."""
    return float(np.median([fn() for _ in range(reps)]))


def ref_decode(llm, n_steps) -> float:
    tok = 1234
    for _ in range(8):   # warm-up: graph builds and CUDA-graph capture happen in the first steps
        llm.eval([tok])
    t = time.perf_counter()
    for _ in range(n_steps):
        llm.eval([tok])
    return n_steps / (time.perf_counter() - t)


def ours_decode(ctx, n_steps, recycle_stride=0, step_ms=None) -> float:
    """tok/s over n_steps; with step_ms (a dict) also the mean ms of full/refresh and recycled steps."""
    tok = 1234
    for i in range(2 * recycle_stride if recycle_stride else 8):   # warm-up: graph builds, CUDA-graph capture
        ctx.decode(tok, StepKind.RECYCLED if recycle_stride > 0 and i % recycle_stride != 0 else StepKind.FULL)
    ctx.decode(tok, StepKind.FULL)  # a refresh first when recycling (not timed)
    times = {"full": [], "recycled": []}
    t = time.perf_counter()
    for i in range(n_steps):
        t0 = time.perf_counter()
        _, ran, _ = ctx.decode(tok, StepKind.RECYCLED if recycle_stride > 0 and (i + 1) % recycle_stride != 0 else StepKind.FULL)
        times["recycled" if ran else "full"].append(time.perf_counter() - t0)
    rate = n_steps / (time.perf_counter() - t)
    if step_ms is not None:
        step_ms.update({k: 1000 * float(np.mean(v)) for k, v in times.items() if v})
    return rate


def recycle_gather_parity(m, args, depth=6000, steps=40, lazy=False) -> dict:
    """Recycled greedy decode (K=recycle-k/2, S=stride) with the CUDA gather kernel and with the plain-op
    gather (PYLAZY_CUDA_GATHER=0, read when a context is made): the logits must be bit-identical.
    lazy: after LazyPrefill() (one graph per stage; with share the picks run after all stages)."""
    rec = pylazy.Recycle(k=args.recycle_k // 2, stride=args.stride, pool=args.pool, share=args.share)

    def run():
        with Context(m, n_ctx=depth + steps + 256, n_ubatch=args.n_ubatch) as ctx:
            cache = ContextCache(ctx)
            logits = prefill(cache, tokens(depth, seed=3), pylazy.LazyPrefill() if lazy else None,
                             swa=m.swa_layers(), n_batch=depth)
            out = []
            for i, (_, logits) in enumerate(generate_step(cache, logits[-1], Greedy(), recycle=rec)):
                if i > 0:    # the logits of the i-th decode step
                    out.append(logits.copy())
                if i == steps:
                    break
            return np.array(out)
    kernel = run()
    os.environ["PYLAZY_CUDA_GATHER"] = "0"
    try:
        plain = run()
    finally:
        os.environ.pop("PYLAZY_CUDA_GATHER")
    return {"steps": steps, "depth": depth, "max_abs_diff": float(np.abs(kernel - plain).max()),
            "identical": bool(np.array_equal(kernel, plain))}


def request_bench(args) -> list:
    """The whole-request rows (pylazy/bench_request.py) on the GPU: flash attention on for llama.cpp."""
    out = []
    for spec in [x for x in args.request.split(",") if x]:
        n, g = (int(v) for v in spec.split(":"))
        rows = request_rows(args.model, tokens(n, seed=11), g, args.threads, n + g + 256, tick=lambda label: log(label),
                            llama_kwargs={"n_gpu_layers": args.n_gpu_layers, "flash_attn": True},
                            pylazy_kwargs={"n_gpu_layers": args.n_gpu_layers})
        for r in rows:
            r.pop("text", None)
            log(f"request {n}+{g} {r['policy']}: TTFT {r['ttft_s']:.2f} s, decode {r['decode_tok_s'] or 0:.1f} tok/s, "
                f"total {r['total_s']:.2f} s, {r['speedup_total']:.2f}x")
        out.append(((n, g), rows))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prefill", default="4096,32768")
    ap.add_argument("--depths", default="0,8192,32768,65536")
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--recycle-k", type=int, default=4096)
    ap.add_argument("--stride", type=int, default=16)
    ap.add_argument("--pool", type=int, default=pylazy.Recycle(k=1).pool, help="Recycle(pool=) of the recycled rows")
    ap.add_argument("--share", type=float, default=pylazy.Recycle(k=1).share, help="Recycle(share=) of the recycled rows")
    ap.add_argument("--n-gpu-layers", type=int, default=-1)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--n-batch", type=int, default=2048)
    ap.add_argument("--n-ubatch", type=int, default=512)
    ap.add_argument("--parity-tokens", type=int, default=256)
    ap.add_argument("--skip", default="", help="comma list of rows to skip: parity,prefill,ttft,decode")
    ap.add_argument("--ttft-keeps", default="",
                    help="extra lazy schedules to time at 32K beside the default: keep ratios at layers 0.25/0.5/0.75, "
                         "comma-separated triples, e.g. 0.3/0.2/0.1,0.25/0.15/0.1 (rows 'ttft_extra')")
    ap.add_argument("--reps", type=int, default=3, help="repeats per prefill/decode row (median reported)")
    ap.add_argument("--long-reps", type=int, default=1, help="repeats of prefill rows from 65536 tokens on")
    ap.add_argument("--request", default="",
                    help="whole-request rows N:G,...: an N-token prompt + G tokens through both libraries' Llama "
                         "(llama-cpp-python, pylazy full / LazyPrefill() / Recycle(k=N/8) / both); TTFT, decode, total")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    prefill_lens = [int(x) for x in args.prefill.split(",") if x]
    depths = [int(x) for x in args.depths.split(",") if x]
    skip = set(args.skip.split(","))
    n_ctx = max(prefill_lens + [d + 3 * args.reps * (args.decode_steps + 2 * args.stride + 16) + 64 for d in depths])
    n_ctx = (n_ctx + 255) // 256 * 256
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "model": args.model, "n_ctx": n_ctx,
           "pylazy_version": pylazy.__version__, "llama_cpp_python": llama_cpp.__version__,
           "host": platform.node(), "args": vars(args)}
    try:
        res["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True).stdout.strip()
    except OSError:
        res["gpu"] = None

    # ---- llama.cpp -------------------------------------------------------------------------------
    ref = {"prefill": {}, "decode": {}}
    if "parity" not in skip:
        llm = reference_llama(args.model, n_ctx=1024, n_batch=512, n_ubatch=512, flash_attn=True,
                              n_gpu_layers=args.n_gpu_layers, logits_all=True, n_threads=args.threads)
        ptoks = tokens(args.parity_tokens, seed=7)
        llm.eval(ptoks)
        ref_logits = np.array(llm.scores[: len(ptoks)], dtype=np.float32)
        del llm
        gc.collect()
    llm = ref_model(args.model, n_ctx, args)
    ref_prefill(llm, tokens(512))  # warm-up
    if "prefill" not in skip or "ttft" not in skip:
        for n in prefill_lens:
            dt = median_of(args.reps if n < 65536 else args.long_reps, lambda: ref_prefill(llm, tokens(n)))
            ref["prefill"][n] = n / dt
            log(f"llama.cpp prefill {n}: {n / dt:.0f} tok/s ({dt:.2f} s)")
    if "decode" not in skip:
        for d in depths:
            if d:
                ref_prefill(llm, tokens(d))
            else:
                llm.reset()
                llm.eval([1])
            ref["decode"][d] = median_of(args.reps, lambda: ref_decode(llm, args.decode_steps))
            log(f"llama.cpp decode at {d}: {ref['decode'][d]:.1f} tok/s")
    del llm
    gc.collect()

    # ---- pylazy ------------------------------------------------------------------------------------
    ours = {"prefill": {}, "ttft_lazy": {}, "decode_full": {}, "decode_recycled": {}, "step_ms": {}}
    m = Model(args.model, n_gpu_layers=args.n_gpu_layers, n_threads=args.threads)
    res["backend"] = m.info.backend
    if "parity" not in skip:
        with Context(m, n_ctx=1024, n_ubatch=512) as ctx:
            got = ctx.eval(ptoks, all_logits=True)
        res["parity"] = {"tokens": len(ptoks), "max_abs_diff": float(np.abs(got - ref_logits).max()),
                         "top1_agreement": float((got.argmax(1) == ref_logits.argmax(1)).mean()),
                         "logit_std": float(ref_logits.std())}
        log("parity", res["parity"])
        res["recycle_gather_parity"] = recycle_gather_parity(m, args)
        log("recycle gather parity", res["recycle_gather_parity"])
        res["recycle_gather_parity_lazy"] = recycle_gather_parity(m, args, lazy=True)
        log("recycle gather parity after a lazy prefill", res["recycle_gather_parity_lazy"])
    ctx = Context(m, n_ctx=n_ctx, n_ubatch=args.n_ubatch)

    def prefill(n, schedule, pool=0):
        ctx.reset()
        if (schedule, pool) != (ctx.lazy_schedule, ctx.lazy_pool):
            ctx.set_lazy(schedule, pool)
        toks = tokens(n)
        t = time.perf_counter()
        for i in range(0, n, args.n_batch if not schedule else n):
            ctx.eval(toks[i:i + (args.n_batch if not schedule else n)])
        return time.perf_counter() - t

    prefill(512, [])  # warm-up
    if "prefill" not in skip:
        for n in prefill_lens:
            dt = median_of(args.reps if n < 65536 else args.long_reps, lambda: prefill(n, []))
            ours["prefill"][n] = n / dt
            log(f"pylazy prefill {n}: {n / dt:.0f} tok/s ({dt:.2f} s)")
    if "ttft" not in skip:
        lazy = pylazy.LazyPrefill()
        sched = lazy.resolve(m.info.n_layer)
        prefill(512, sched, lazy.pool)
        for n in [x for x in prefill_lens if x >= 16384] or [max(prefill_lens)]:
            dt = median_of(args.reps if n < 65536 else args.long_reps, lambda: prefill(n, sched, lazy.pool))
            ours["ttft_lazy"][n] = dt
            log(f"pylazy lazy TTFT {n}: {dt:.2f} s; layer cells {ctx.layer_stats()['cells'][-1]}")
        for keeps in [k for k in args.ttft_keeps.split(",") if k]:
            other = pylazy.LazyPrefill(layers=(0.25, 0.5, 0.75), keep=tuple(float(x) for x in keeps.split("/")))
            sched = other.resolve(m.info.n_layer)
            dt = median_of(args.reps, lambda: prefill(n, sched, other.pool))
            ours.setdefault("ttft_extra", {})[keeps] = dt
            ratio = n / ref["prefill"][n] / dt if n in ref["prefill"] else float("nan")
            log(f"pylazy lazy TTFT {n} keep {keeps}: {dt:.2f} s ({ratio:.2f}x faster than llama.cpp's prefill)")
        ctx.reset()
        ctx.set_lazy([], 0)
    if "decode" not in skip:
        ours["decode_recycled_default"] = {}
        for d in depths:
            prefill(max(d, 1), [])
            ctx.set_recycle(RecycleMode.OFF)
            ours["decode_full"][d] = median_of(args.reps, lambda: ours_decode(ctx, args.decode_steps))
            ctx.set_recycle(RecycleMode.TOPK, args.recycle_k, args.stride, 0, pool=args.pool, share=args.share)
            ours["step_ms"][d] = {}
            ours["decode_recycled"][d] = median_of(
                args.reps, lambda: ours_decode(ctx, args.decode_steps, args.stride, ours["step_ms"][d]))
            if d >= 1024:   # Recycle(k=depth/8), the default the evals measure
                ctx.set_recycle(RecycleMode.TOPK, d // 8, args.stride, 0, pool=args.pool, share=args.share)
                ours["decode_recycled_default"][d] = median_of(
                    args.reps, lambda: ours_decode(ctx, args.decode_steps, args.stride))
            ctx.set_recycle(RecycleMode.OFF)
            log(f"pylazy decode at {d}: full {ours['decode_full'][d]:.1f}, recycled {ours['decode_recycled'][d]:.1f} tok/s"
                f", K=d/8 {ours['decode_recycled_default'].get(d, float('nan')):.1f}"
                f" (ms per refresh / recycled step: {ours['step_ms'][d]})")
    ctx.close()
    m.close()
    res["request"] = request_bench(args)

    res["llama_cpp"], res["pylazy"] = ref, ours
    lines = [f"# pylazy vs llama.cpp — {res['date']}, {res.get('gpu') or platform.processor()}, backend {res['backend']}",
             f"model {Path(args.model).name}, pylazy {res['pylazy_version']}, llama-cpp-python {res['llama_cpp_python']}, "
             f"flash attention on, n_ubatch {args.n_ubatch}", ""]
    if "parity" in res:
        p = res["parity"]
        lines += [f"parity ({p['tokens']} tokens): max |logit diff| {p['max_abs_diff']:.4g} (logit std {p['logit_std']:.3g}), "
                  f"top-1 agreement {p['top1_agreement']:.4f}"]
        for key, what in (("recycle_gather_parity", ""), ("recycle_gather_parity_lazy", " after LazyPrefill()")):
            if key in res:
                q = res[key]
                lines.append(f"recycled decode{what}, CUDA gather kernel vs plain-op gather ({q['steps']} steps at depth "
                             f"{q['depth']}): max |logit diff| {q['max_abs_diff']:.4g}")
        lines.append("")
    if ours["prefill"]:
        lines += ["| prefill | llama.cpp tok/s | pylazy full tok/s | ratio |", "|---|---|---|---|"]
        lines += [f"| {n} | {ref['prefill'][n]:.0f} | {ours['prefill'][n]:.0f} | {ours['prefill'][n] / ref['prefill'][n]:.2f}× |"
                  for n in prefill_lens]
        lines.append("")
    if ours["ttft_lazy"]:
        for n, dt in ours["ttft_lazy"].items():
            base = n / ref["prefill"][n]
            lines.append(f"TTFT at {n}: llama.cpp {base:.2f} s, pylazy lazy default {dt:.2f} s → {base / dt:.2f}× faster")
            for keeps, dt2 in ours.get("ttft_extra", {}).items():
                lines.append(f"TTFT at {n}, LazyPrefill(keep={keeps}): {dt2:.2f} s → {base / dt2:.2f}× faster")
        lines.append("")
    if ours["decode_full"]:
        lines += [f"| decode depth | llama.cpp tok/s | pylazy full | ratio | pylazy recycled K={args.recycle_k} S={args.stride} | ratio "
                  "| recycled K=depth/8 | ratio |", "|---|---|---|---|---|---|---|---|"]
        for d in depths:
            r, f, c = ref["decode"][d], ours["decode_full"][d], ours["decode_recycled"][d]
            k8 = ours["decode_recycled_default"].get(d)
            tail = f"| {k8:.1f} | {k8 / r:.2f}× |" if k8 else "| | |"
            lines.append(f"| {d} | {r:.1f} | {f:.1f} | {f / r:.2f}× | {c:.1f} | {c / r:.2f}× {tail}")
    for (n, g), rows in res["request"]:
        lines.append(request_table(rows, n, g))
    res["request"] = [{"n_prompt": n, "n_gen": g, "rows": rows} for (n, g), rows in res["request"]]
    table = "\n".join(lines)
    print(table)
    res["table"] = table
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
