#!/usr/bin/env python3
"""Where prefill and decode time goes, per ggml op, in pylazy and in llama.cpp, by one clock.

Both engines run the same token ids on the same file with the scheduler eval callback of
native/op_profile.cpp (pylazy: PYLAZY_PROFILE=ops; llama.cpp: llama_context_params.cb_eval). The
callback makes the scheduler run one node at a time with a synchronize after each, so every number
includes one launch + sync and no fusion/CUDA graphs: compare the two columns, not the totals with a
normal run. Also prints pylazy's host-side phases (PYLAZY_PROFILE=1) of a normal run.

    python3 scripts/op_profile.py --model M.gguf --n 4096 [--decode-steps 32]
"""
from __future__ import annotations

import llama_cpp  # noqa: F401,I001  (before numpy on the GPU machine: see gpu_bench.py)

import argparse
import ctypes
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llama_cpp.llama_cpp as L  # noqa: E402

from pylazy import _native as N  # noqa: E402


def report() -> dict:
    size = N.lib.plz_op_profile_report(None, 0)
    buf = ctypes.create_string_buffer(size)
    N.lib.plz_op_profile_report(buf, size)
    out = {}
    for line in buf.value.decode().splitlines():
        key, sec, cnt = line.split("\t")
        out[key] = (float(sec), int(cnt))
    return out


def llama_cpp_run(args, toks, callback) -> tuple:
    mp = L.llama_model_default_params()
    mp.n_gpu_layers = args.n_gpu_layers
    mp.use_extra_bufts = args.extra_bufts == "on"
    model = L.llama_model_load_from_file(args.model.encode(), mp)
    cp = L.llama_context_default_params()
    cp.n_ctx = len(toks) + args.decode_steps + 256
    cp.n_batch, cp.n_ubatch = args.n_ubatch, args.n_ubatch
    cp.n_threads = cp.n_threads_batch = args.threads
    cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED if args.flash_attn == "on" else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    if callback is not None:
        cp.cb_eval = callback
    ctx = L.llama_init_from_model(model, cp)

    def decode(chunk):
        arr = (ctypes.c_int32 * len(chunk))(*chunk)
        rc = L.llama_decode(ctx, L.llama_batch_get_one(arr, len(chunk)))
        assert rc == 0, rc

    times = {}
    for phase in ("warm", "prefill"):
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        N.lib.plz_op_profile_reset()
        t = time.perf_counter()
        for i in range(0, len(toks) if phase == "prefill" else 512, args.n_ubatch):
            decode(toks[i:i + args.n_ubatch])
        times[phase] = time.perf_counter() - t
    prefill_ops = report()
    N.lib.plz_op_profile_reset()
    t = time.perf_counter()
    for _ in range(args.decode_steps):
        decode([1234])
    times["decode"] = time.perf_counter() - t
    decode_ops = report()
    L.llama_free(ctx)
    L.llama_model_free(model)
    return times, prefill_ops, decode_ops


def pylazy_run(args, toks, mode: str) -> tuple:
    from pylazy.engine import Context, Model
    os.environ["PYLAZY_PROFILE"] = mode
    m = Model(args.model, n_gpu_layers=args.n_gpu_layers, n_threads=args.threads,
              use_extra_bufts=args.extra_bufts == "on")
    ctx = Context(m, n_ctx=len(toks) + args.decode_steps + 256, n_ubatch=args.n_ubatch,
                  flash_attn=args.flash_attn == "on")
    times = {}
    ctx.eval(toks[:512])
    ctx.reset()
    N.lib.plz_op_profile_reset()
    t = time.perf_counter()
    ctx.eval(toks)
    times["prefill"] = time.perf_counter() - t
    prefill_ops = report()
    N.lib.plz_op_profile_reset()
    t = time.perf_counter()
    for _ in range(args.decode_steps):
        ctx.decode(1234)
    times["decode"] = time.perf_counter() - t
    decode_ops = report()
    ctx.close()   # prints the host-phase profile (mode "1") to stderr
    m.close()
    os.environ.pop("PYLAZY_PROFILE")
    return times, prefill_ops, decode_ops


PHASES = ("host inputs", "graph build", "graph alloc", "upload", "compute", "outputs")


def take_phases(ctx) -> str:
    sec = (ctypes.c_double * 6)()
    n = ctypes.c_int64()
    N.lib.plz_context_take_profile(ctx.handle, sec, ctypes.byref(n))
    return f"{n.value} batches: " + ", ".join(f"{name} {s * 1e3:.2f} ms" for name, s in zip(PHASES, sec))


def refresh_profile(args) -> None:
    """pylazy only: at depth --refresh-depth, the host phases and the ops of refresh and recycled steps."""
    from pylazy.engine import Context, Model, RecycleMode
    from pylazy.policy import StepKind
    toks = np.random.default_rng(1).integers(1000, 40000, size=args.refresh_depth).tolist()
    for mode in ("1", "ops"):
        os.environ["PYLAZY_PROFILE"] = mode
        m = Model(args.model, n_gpu_layers=args.n_gpu_layers, n_threads=args.threads,
                  use_extra_bufts=args.extra_bufts == "on")
        ctx = Context(m, n_ctx=args.refresh_depth + 512, n_ubatch=args.n_ubatch, flash_attn=args.flash_attn == "on")
        t = time.perf_counter()
        ctx.eval(toks)
        print(f"\n[{mode}] prefill {args.refresh_depth}: {time.perf_counter() - t:.2f} s; {take_phases(ctx)}")
        ctx.set_recycle(RecycleMode.TOPK, args.recycle_k, args.stride, 0, pool=args.pool, share=args.share)
        for label, recycled in (("full (recycling off)", None), ("refresh", False), ("recycled", True)):
            if recycled is None:
                ctx.set_recycle(RecycleMode.OFF)
            elif label == "refresh":
                ctx.set_recycle(RecycleMode.TOPK, args.recycle_k, args.stride, 0, pool=args.pool, share=args.share)
            ctx.decode(1234, StepKind.FULL)    # warm-up / first refresh, untimed
            ctx.decode(1234, StepKind.RECYCLED if recycled else StepKind.FULL)
            take_phases(ctx)
            N.lib.plz_op_profile_reset()
            n = 8
            t = time.perf_counter()
            for _ in range(n):
                ctx.decode(1234, StepKind.RECYCLED if recycled else StepKind.FULL)
            dt = (time.perf_counter() - t) / n
            print(f"[{mode}] {label} step at {args.refresh_depth}: {dt * 1e3:.2f} ms; {take_phases(ctx)}")
            if mode == "ops":
                ops = report()
                total = sum(v[0] for v in ops.values())
                print(f"  ops per step ({total / n * 1e3:.2f} ms callback-timed):")
                for k, (s, c) in list(ops.items())[:args.top]:
                    print(f"    {k:34s} {s / n * 1e3:8.3f} ms  x{c // n}")
        ctx.close()
        m.close()
    os.environ.pop("PYLAZY_PROFILE")


def table(title, a, b, top):
    keys = sorted(set(a) | set(b), key=lambda k: -max(a.get(k, (0, 0))[0], b.get(k, (0, 0))[0]))
    ta, tb = sum(v[0] for v in a.values()), sum(v[0] for v in b.values())
    print(f"\n{title}: llama.cpp {ta * 1e3:.1f} ms, pylazy {tb * 1e3:.1f} ms (callback-timed)")
    print(f"{'op':34s} {'llama.cpp ms':>12s} {'n':>6s} {'pylazy ms':>10s} {'n':>6s}")
    for k in keys[:top]:
        (sa, na), (sb, nb) = a.get(k, (0, 0)), b.get(k, (0, 0))
        print(f"{k:34s} {sa * 1e3:12.2f} {na:6d} {sb * 1e3:10.2f} {nb:6d}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--n-ubatch", type=int, default=512)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--n-gpu-layers", type=int, default=-1)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--refresh-depth", type=int, default=0, help="also profile refresh/recycled steps at this depth")
    ap.add_argument("--recycle-k", type=int, default=4096)
    ap.add_argument("--stride", type=int, default=16)
    ap.add_argument("--pool", type=int, default=0, help="Recycle(pool=) (0 here: the refresh profile of session 2)")
    ap.add_argument("--share", type=float, default=0.5, help="Recycle(share=), the default 0.5")
    ap.add_argument("--skip-compare", action="store_true")
    ap.add_argument("--flash-attn", choices=("on", "off"), default="on", help="both engines (default on, as before)")
    ap.add_argument("--extra-bufts", choices=("on", "off"), default="off",
                    help="llama.cpp's repacked CPU weights on both engines (default off, as before)")
    args = ap.parse_args(argv)
    toks = np.random.default_rng(0).integers(1000, 40000, size=args.n).tolist()
    L.llama_backend_init()
    if args.refresh_depth:
        refresh_profile(args)
    if args.skip_compare:
        return
    cb = L.ggml_backend_sched_eval_callback(ctypes.cast(N.lib.plz_op_profile_callback, ctypes.c_void_p).value)
    plain = llama_cpp_run(args, toks, None)[0]
    print(f"normal runs: llama.cpp prefill {args.n / plain['prefill']:.0f} tok/s, decode {args.decode_steps / plain['decode']:.1f} tok/s")
    ours = pylazy_run(args, toks, "1")[0]
    print(f"normal runs: pylazy prefill {args.n / ours['prefill']:.0f} tok/s, decode {args.decode_steps / ours['decode']:.1f} tok/s")
    _, lp, ld = llama_cpp_run(args, toks, cb)
    _, pp, pd = pylazy_run(args, toks, "ops")
    table(f"prefill {args.n}", lp, pp, args.top)
    table(f"decode {args.decode_steps} steps at depth {args.n}", ld, pd, args.top)


if __name__ == "__main__":
    main()
