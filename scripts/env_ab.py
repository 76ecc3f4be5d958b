#!/usr/bin/env python3
"""A/B of one pylazy environment switch (read when a context is created), interleaved in one process.

Single GPU benchmark runs move 3-6 % from run to run, more than the effects of host-side changes, so
this alternates contexts with and without the switch (A, B, A, B, ...) on one loaded model and
prints the median of each: prefill tok/s, full decode tok/s at --depths, recycled decode tok/s.

    python3 scripts/env_ab.py --model /tmp/llama3-8b-random-q4_k.gguf --env PYLAZY_PINNED=0
"""
from __future__ import annotations

import llama_cpp  # noqa: F401,I001  (before numpy on the GPU machine: see gpu_bench.py)

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_bench import ours_decode, tokens  # noqa: E402

import pylazy  # noqa: E402
from pylazy.engine import Context, Model, RecycleMode  # noqa: E402


def measure(m, args) -> dict:
    out = {}
    n_ctx = (max(args.depths) + 4 * args.stride + 2 * args.decode_steps + 511) // 256 * 256
    n_ctx = max(n_ctx, args.prefill + 256)
    with Context(m, n_ctx=n_ctx, n_ubatch=512) as ctx:
        ctx.eval(tokens(512))   # warm-up
        ctx.reset()
        t = time.perf_counter()
        for i in range(0, args.prefill, 2048):
            ctx.eval(tokens(args.prefill)[i:i + 2048])
        out[f"prefill {args.prefill}"] = args.prefill / (time.perf_counter() - t)
        rec = pylazy.Recycle(k=args.recycle_k, stride=args.stride)   # default pool and share
        for d in args.depths:
            ctx.reset()
            for i in range(0, d, 2048):
                ctx.eval(tokens(d)[i:i + 2048])
            out[f"decode {d}"] = ours_decode(ctx, args.decode_steps)
            if d > args.recycle_k:
                ctx.set_recycle(RecycleMode.TOPK, rec.k, args.stride, 0, pool=rec.pool, share=rec.share)
                out[f"recycled {d}"] = ours_decode(ctx, args.decode_steps, args.stride)
                ctx.set_recycle(RecycleMode.OFF)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--env", required=True, help="NAME=VALUE set for the B contexts")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prefill", type=int, default=4096)
    ap.add_argument("--depths", default="0,32768")
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--recycle-k", type=int, default=4096)
    ap.add_argument("--stride", type=int, default=16)
    ap.add_argument("--n-gpu-layers", type=int, default=-1)
    args = ap.parse_args(argv)
    args.depths = [int(x) for x in args.depths.split(",") if x]
    name, _, value = args.env.partition("=")
    m = Model(args.model, n_gpu_layers=args.n_gpu_layers, n_threads=8)
    runs = {"A": [], "B": []}
    for r in range(args.rounds):
        for side in ("A", "B"):
            if side == "B":
                os.environ[name] = value
            else:
                os.environ.pop(name, None)
            runs[side].append(measure(m, args))
            print(f"round {r} {side}: " + ", ".join(f"{k} {v:.1f}" for k, v in runs[side][-1].items()), flush=True)
    os.environ.pop(name, None)
    print(f"\nmedians over {args.rounds} interleaved rounds; A = default, B = {args.env}")
    print("| row | A | B | B/A |\n|---|---|---|---|")
    for k in runs["A"][0]:
        a = float(np.median([x[k] for x in runs["A"]]))
        b = float(np.median([x[k] for x in runs["B"]]))
        print(f"| {k} | {a:.1f} | {b:.1f} | {b / a:.3f} |")


if __name__ == "__main__":
    main()
