#!/usr/bin/env python
"""Soak test: does resident memory stay flat over many generations and model load/free cycles?

Two phases, each sampling the process's resident set size (VmRSS from /proc/self/status):

  generate  one pylazy.Llama on the default model; --gens generations of --tokens tokens each
            (100 x 100 = 10 000 tokens by default), rotating full attention,
            lazy=LazyPrefill() and recycle=Recycle(k=64, stride=8), and alternating an
            explicit reset() with a new prompt (which re-evaluates the prompt) between them.
            End-of-generation tokens are biased to -inf so every generation runs its full length.
  load      pylazy.engine.Model + Context loaded, a few tokens evaluated, both closed,
            --cycles times (100 by default).

Verdict per phase: RSS growth from the end of the warm-up (the first sample after
--warmup-frac of the run) to the last sample must be <= max(--tol-mb MB, --tol-pct % of the
warm-up RSS). Allocator caches, lazily touched pages of the mmapped model and Python's own
caches settle during warm-up; a leak keeps growing after it.

    PYTHONPATH=. python scripts/soak.py [--quick] [--json out.json]
Exit status 1 if a phase fails its tolerance.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Words the prompts are built from; each generation gets a different prompt of ~100-200 tokens
# so lazy prefill has something to prune and recycle's k=64 is below the context length.
_TOPICS = ["the history of the printing press", "how bees build their hives", "the water cycle",
           "a trip to the mountains", "the rules of chess", "why the sky is blue",
           "the life of a lighthouse keeper", "how bread is baked", "the planets of the solar system",
           "a day at a busy harbour", "the invention of the telephone"]
_FILLER = ("It was a long day and many people came and went, talking about small things and large "
           "things, about the weather, the market, the harvest and the news from the city. ")


def rss_mb() -> float:
    """Resident set size of this process in MB (VmRSS, kB in /proc/self/status)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("VmRSS not found in /proc/self/status")


def _prompt(i: int) -> str:
    topic = _TOPICS[i % len(_TOPICS)]
    return f"Story {i}. " + _FILLER * (2 + i % 4) + f"Now here is a detailed account of {topic}:"


def _verdict(samples: list, warmup_index: int, tol_mb: float, tol_pct: float) -> dict:
    """samples: list of (step, rss_mb); compares the last sample with samples[warmup_index]."""
    base = samples[warmup_index][1]
    last = samples[-1][1]
    peak = max(r for _, r in samples[warmup_index:])
    allowed = max(tol_mb, base * tol_pct / 100.0)
    return {"warmup_rss_mb": round(base, 1), "final_rss_mb": round(last, 1),
            "peak_after_warmup_mb": round(peak, 1), "growth_mb": round(last - base, 1),
            "growth_pct": round(100.0 * (last - base) / base, 2), "allowed_mb": round(allowed, 1),
            "ok": last - base <= allowed}


def soak_generate(gens: int, tokens: int, every: int, n_threads: int) -> dict:
    import numpy as np
    from pylazy import LazyPrefill, Llama, Recycle

    llm = Llama(n_ctx=512, n_threads=n_threads, verbose=False)
    # Every end-of-generation token (EOS, <|im_end|>, ...) banned so each run is `tokens` long.
    eog = {t: float("-inf") for t in range(llm.n_vocab()) if llm._is_eog(t)}
    policies = [("full", {}), ("lazy", {"lazy": LazyPrefill()}),
                ("recycle", {"recycle": Recycle(k=64, stride=8)})]
    samples = [(0, rss_mb())]
    rows, total, t0 = [], 0, time.perf_counter()
    for i in range(gens):
        name, kw = policies[i % len(policies)]
        if i % 2 == 0:
            llm.reset()   # odd generations rely on the new prompt differing instead
        out = llm.create_completion(_prompt(i), max_tokens=tokens, temperature=0.8, top_k=40,
                                    seed=i + 1, logit_bias=eog, **kw)
        n = out["usage"]["completion_tokens"]
        total += n
        if n != tokens:
            raise RuntimeError(f"generation {i} ({name}) produced {n} tokens, wanted {tokens}")
        if (i + 1) % every == 0 or i + 1 == gens:
            gc.collect()
            samples.append((i + 1, rss_mb()))
            rows.append({"gen": i + 1, "tokens": total, "rss_mb": round(samples[-1][1], 1),
                         "elapsed_s": round(time.perf_counter() - t0, 1)})
            print(f"  gen {i + 1:4d}  tokens {total:6d}  RSS {samples[-1][1]:7.1f} MB  "
                  f"{time.perf_counter() - t0:6.1f} s", flush=True)
    llm.close()
    del llm
    gc.collect()
    return {"rows": rows, "samples": samples, "total_tokens": total,
            "rss_after_close_mb": round(rss_mb(), 1), "seconds": round(time.perf_counter() - t0, 1)}


def soak_load(cycles: int, every: int, n_threads: int) -> dict:
    from pylazy.engine import Context, Model
    from pylazy.models import default_model_path

    path = default_model_path()
    samples = [(0, rss_mb())]
    rows, t0 = [], time.perf_counter()
    for i in range(cycles):
        model = Model(path, n_gpu_layers=0, n_threads=n_threads)
        ctx = Context(model, n_ctx=128, n_ubatch=32, n_threads=n_threads)
        logits = ctx.eval([1, 504, 3458, 28, 253, 1345, 30])
        if not (logits.shape == (1, model.info.n_vocab) and bool((logits == logits).all())):
            raise RuntimeError(f"cycle {i}: bad logits {logits.shape}")
        ctx.close()
        model.close()
        del ctx, model, logits
        if (i + 1) % every == 0 or i + 1 == cycles:
            gc.collect()
            samples.append((i + 1, rss_mb()))
            rows.append({"cycle": i + 1, "rss_mb": round(samples[-1][1], 1),
                         "elapsed_s": round(time.perf_counter() - t0, 1)})
            print(f"  cycle {i + 1:4d}  RSS {samples[-1][1]:7.1f} MB  "
                  f"{time.perf_counter() - t0:6.1f} s", flush=True)
    return {"rows": rows, "samples": samples, "seconds": round(time.perf_counter() - t0, 1)}


def _warmup_index(samples: list, frac: float) -> int:
    """Index of the first sample taken at or after `frac` of the run (samples[0] is the start)."""
    end = samples[-1][0]
    for j, (step, _) in enumerate(samples):
        if j > 0 and step >= frac * end:
            return j
    return len(samples) - 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short run: 12 x 20 tokens, 10 load cycles")
    ap.add_argument("--gens", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=100, help="tokens per generation")
    ap.add_argument("--gen-every", type=int, default=10, help="RSS sample every N generations")
    ap.add_argument("--cycles", type=int, default=100, help="model load/free cycles")
    ap.add_argument("--load-every", type=int, default=10, help="RSS sample every N cycles")
    ap.add_argument("--warmup-frac", type=float, default=0.2,
                    help="part of each phase treated as warm-up (default 0.2)")
    ap.add_argument("--tol-mb", type=float, default=20.0)
    ap.add_argument("--tol-pct", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument("--skip", choices=["generate", "load"], action="append", default=[])
    ap.add_argument("--json", metavar="OUT", help="write the samples and verdicts here")
    args = ap.parse_args(argv)
    if args.quick:
        args.gens, args.tokens, args.gen_every, args.cycles, args.load_every = 12, 20, 3, 10, 2

    report = {"args": vars(args), "start_rss_mb": round(rss_mb(), 1)}
    ok = True
    if "generate" not in args.skip:
        print(f"generate: {args.gens} generations x {args.tokens} tokens "
              f"(full / lazy / recycle k=64 stride=8)", flush=True)
        g = soak_generate(args.gens, args.tokens, args.gen_every, args.threads)
        g["verdict"] = _verdict(g["samples"], _warmup_index(g["samples"], args.warmup_frac),
                                args.tol_mb, args.tol_pct)
        report["generate"] = g
        ok &= g["verdict"]["ok"]
    if "load" not in args.skip:
        print(f"load: {args.cycles} x (Model + Context, eval 7 tokens, close)", flush=True)
        ld = soak_load(args.cycles, args.load_every, args.threads)
        ld["verdict"] = _verdict(ld["samples"], _warmup_index(ld["samples"], args.warmup_frac),
                                 args.tol_mb, args.tol_pct)
        report["load"] = ld
        ok &= ld["verdict"]["ok"]

    print(f"\ntolerance: growth after warm-up ({args.warmup_frac:.0%} of each phase) "
          f"<= max({args.tol_mb:g} MB, {args.tol_pct:g} %)")
    print(f"{'phase':9} {'warm-up MB':>10} {'final MB':>9} {'peak MB':>8} {'growth MB':>9} "
          f"{'growth %':>8} {'allowed':>8}  verdict")
    for phase in ("generate", "load"):
        if phase in report:
            v = report[phase]["verdict"]
            print(f"{phase:9} {v['warmup_rss_mb']:10.1f} {v['final_rss_mb']:9.1f} "
                  f"{v['peak_after_warmup_mb']:8.1f} {v['growth_mb']:9.1f} {v['growth_pct']:8.2f} "
                  f"{v['allowed_mb']:8.1f}  {'PASS' if v['ok'] else 'FAIL'}")
    report["ok"] = bool(ok)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
