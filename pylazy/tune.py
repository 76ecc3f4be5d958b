"""`pylazy tune`: choose a model file's default lazy / recycle policies by a short calibration sweep.

    pylazy tune -m smollm2 --length 2048 --min-accuracy 0.98

Stage 1 runs the eval harness's tasks (pylazy/eval) at one length under full attention, lazy
keep schedules and recycle K / stride / dynamic-threshold settings; stage 2 tries the fastest
pairs of a passing lazy schedule with a passing recycle setting together. A setting *passes*
when its accuracy is at least ``min_accuracy`` x full attention's on the same prompts. Of the
passing ones (full attention always passes) the fastest by the estimated time of a request is
chosen: TTFT + ``gen_tokens`` / decode speed, both measured (the tokens actually generated vary
by policy, so their own decode time would favour a policy that stops early).

Writes the profile (pylazy/profiles.py: JSON keyed by the file's identity, read by
``Llama(model_path=...)`` and the CLI as the file's default policies, shown by ``pylazy info``),
a PNG of the sweep next to it, and the sweep's rows in the profile itself. ``--verify-samples``
re-measures full attention and the chosen setting on held-out prompts (another seed).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from datetime import datetime, timezone
from typing import Dict, List, Optional, Sequence

# Short answers (<= 36 tokens) that depend on a few positions of the context: what lazy pruning
# and recycled selection can lose. 4 tasks x 2 depths = 8 prompts a sample: on 2 idle cores at 2K
# the default grid takes ~10 CPU-minutes on SmolLM2 (docs/eval/README.md, "pylazy tune").
DEFAULT_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "qa")
DEFAULT_DEPTHS = (0.25, 0.75)
DEFAULT_LAZY_KEEPS = ("0.7,0.5,0.35", "0.6,0.4,0.25", "0.45,0.3,0.2")
LAZY_LAYERS = (0.25, 0.5, 0.75)   # where the schedules prune: the measured default's depths
DEFAULT_K_DIVISORS = (16, 8)      # recycle K = length / divisor
DEFAULT_STRIDES = (16, 32)
DEFAULT_THRESHOLDS = (0.9,)       # dynamic stride, tried at K = length / 8, stride 16
HELD_OUT_SEED_OFFSET = 1000


# ----- candidates -------------------------------------------------------------------------
def _keep_name(keep: Sequence[float]) -> str:
    return "/".join(f"{round(100 * k)}" for k in keep)


def lazy_candidates(keeps: Sequence[Sequence[float]]) -> Dict[str, dict]:
    from .policy import LazyPrefill
    return {f"lazy {_keep_name(k)}": {"lazy": LazyPrefill(layers=LAZY_LAYERS, keep=tuple(k))} for k in keeps}


def recycle_candidates(length: int, divisors: Sequence[int], strides: Sequence[int],
                       thresholds: Sequence[float]) -> Dict[str, dict]:
    from .policy import Recycle
    out = {}
    for d in divisors:
        for s in strides:
            out[f"rec L/{d} s{s}"] = {"recycle": Recycle(k=max(1, length // d), stride=s)}
    for t in thresholds:
        out[f"rec L/8 s16 dyn{t:g}"] = {"recycle": Recycle(k=max(1, length // 8), stride=16,
                                                             dynamic_threshold=t)}
    return out


# ----- measuring and choosing ---------------------------------------------------------------
def summarize(results: dict, gen_tokens: int) -> List[dict]:
    """One row per policy of a run_suite result: accuracy over its prompts, mean TTFT, mean
    decode speed and the estimated seconds of a request (TTFT + gen_tokens / decode speed)."""
    rows = []
    for pol in dict.fromkeys(r["policy"] for r in results["records"]):
        inst = [i for r in results["records"] if r["policy"] == pol for i in r["instances"]]
        ttft = sum(i["ttft_s"] for i in inst) / len(inst)
        speeds = [i["decode_tok_s"] for i in inst if i.get("decode_tok_s")]
        decode = len(speeds) / sum(1 / s for s in speeds) if speeds else None   # harmonic: time-weighted
        rows.append({"name": pol, "prompts": len(inst), "accuracy": sum(i["score"] for i in inst) / len(inst),
                     "ttft_s": ttft, "decode_tok_s": decode,
                     "est_seconds": ttft + (gen_tokens / decode if decode else math.inf)})
    return rows


def choose(rows: List[dict], min_accuracy: float, full: str = "full") -> dict:
    """Mark each row against full attention's accuracy and speed; returns the chosen row: the
    fastest whose accuracy >= min_accuracy x full's (full itself always qualifies)."""
    base = next((r for r in rows if r["name"] == full), None)
    if base is None:
        raise ValueError(f"no {full!r} row to measure the others against")
    if base["accuracy"] <= 0:
        raise ValueError("full attention scored 0 on the calibration prompts: a budget relative to it "
                         "says nothing (use other --tasks or a shorter --length)")
    for r in rows:
        r["relative_accuracy"] = r["accuracy"] / base["accuracy"]
        r["speedup"] = base["est_seconds"] / r["est_seconds"]
        r["passes"] = r["name"] == full or r["relative_accuracy"] >= min_accuracy - 1e-9
    return min((r for r in rows if r["passes"]), key=lambda r: (r["est_seconds"], r["name"] != full))


def _suite(model_path, policies, args, seed, samples, out_dir, runner_factory=None):
    from .eval.runner import run_suite
    return run_suite(model_path, policies, [args.length], args.tasks, args.depths, seed,
                     progress=not args.no_progress, out_dir=out_dir, n_samples=samples, ppl_tokens=0,
                     make_plots=False, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers,
                     runner_factory=runner_factory, max_new_tokens=args.max_new_tokens)


def _combos(rows: List[dict], policies: Dict[str, dict], n: int) -> Dict[str, dict]:
    """The n pairs (passing lazy, passing recycle) with the smallest predicted request time."""
    lazies = [r for r in rows if r["passes"] and r["name"].startswith("lazy")]
    recs = [r for r in rows if r["passes"] and r["name"].startswith("rec")]
    pairs = sorted(((a["ttft_s"] - b["ttft_s"] + b["est_seconds"], a["name"], b["name"])
                    for a in lazies for b in recs))
    return {f"{a} + {b}": {**policies[a], **policies[b]} for _, a, b in pairs[:n]}


def run_sweep(model_path: str, args: argparse.Namespace, work_dir: str, runner_factory=None) -> dict:
    """Stages 1 and 2; returns {"rows", "chosen", "policies", "seconds", "results"}."""
    t0 = time.perf_counter()
    policies: Dict[str, dict] = {"full": {}}
    policies.update(lazy_candidates(args.lazy_keeps))
    policies.update(recycle_candidates(args.length, args.k_divisors, args.strides, args.thresholds))
    stage1 = _suite(model_path, policies, args, args.seed, args.samples, os.path.join(work_dir, "stage1"),
                    runner_factory)
    rows = summarize(stage1, args.gen_tokens)
    choose(rows, args.min_accuracy)
    combos = _combos(rows, policies, args.combos)
    results = [stage1]
    if combos:
        policies.update(combos)
        # same prompts as stage 1, so its full-attention row is the baseline of these too
        stage2 = _suite(model_path, combos, args, args.seed, args.samples,
                        os.path.join(work_dir, "stage2"), runner_factory)
        results.append(stage2)
        rows += summarize(stage2, args.gen_tokens)
    chosen = choose(rows, args.min_accuracy)
    return {"rows": rows, "chosen": chosen, "policies": policies, "results": results,
            "seconds": time.perf_counter() - t0}


def verify(model_path: str, args: argparse.Namespace, chosen: str, policy: dict, work_dir: str,
           runner_factory=None) -> dict:
    """Full attention and the chosen setting on held-out prompts (seed + 1000)."""
    seed = args.seed + HELD_OUT_SEED_OFFSET
    res = _suite(model_path, {"full": {}, chosen: policy}, args, seed, args.verify_samples,
                 os.path.join(work_dir, "verify"), runner_factory)
    rows = summarize(res, args.gen_tokens)
    choose(rows, args.min_accuracy)
    row = rows[-1]
    return {"seed": seed, "prompts": row["prompts"], "full_accuracy": rows[0]["accuracy"],
            "accuracy": row["accuracy"], "relative_accuracy": row["relative_accuracy"],
            "speedup": row["speedup"], "meets_budget": row["relative_accuracy"] >= args.min_accuracy - 1e-9}


# ----- the profile, its plot, the command ------------------------------------------------------
def build_profile(model_path: str, args: argparse.Namespace, sweep: dict) -> dict:
    """The JSON a person reads and Llama applies: the chosen policies, how they were chosen, every row."""
    from .profiles import file_identity, policy_to_dict
    chosen = sweep["chosen"]
    policy = sweep["policies"][chosen["name"]]
    keep = ("name", "prompts", "accuracy", "relative_accuracy", "ttft_s", "decode_tok_s",
            "est_seconds", "speedup", "passes")
    return {
        "model": {"path": os.path.abspath(model_path), "bytes": os.path.getsize(model_path),
                  "identity": file_identity(model_path)},
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "chosen": chosen["name"],
        "lazy": policy_to_dict(policy.get("lazy")),
        "recycle": policy_to_dict(policy.get("recycle")),
        "tuned": {"length": args.length, "tasks": list(args.tasks), "depths": list(args.depths),
                  "seed": args.seed, "samples": args.samples, "prompts": chosen["prompts"],
                  "min_accuracy": args.min_accuracy, "gen_tokens": args.gen_tokens,
                  "max_new_tokens": args.max_new_tokens,
                  "threads": args.threads, "sweep_seconds": round(sweep["seconds"], 1),
                  "rule": "fastest (TTFT + gen_tokens / decode tok/s) with accuracy >= min_accuracy x full's"},
        "sweep": [{k: (round(r[k], 4) if isinstance(r[k], float) and math.isfinite(r[k]) else r[k])
                   for k in keep} for r in sweep["rows"]],
    }


def plot_sweep(profile: dict, path: str) -> str:
    """Accuracy relative to full attention against the estimated speedup, one point a setting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    style = {"full": ("*", "black"), "lazy": ("o", "tab:blue"), "rec": ("s", "tab:orange"),
             "combo": ("^", "tab:green")}
    for r in profile["sweep"]:
        kind = "combo" if " + " in r["name"] else r["name"].split(" ")[0]
        marker, color = style.get(kind, ("o", "gray"))
        ax.scatter([r["speedup"]], [r["relative_accuracy"]], marker=marker, color=color,
                   s=150 if kind == "full" else 45, zorder=3, alpha=1.0 if r["passes"] else 0.45)
        ax.annotate(r["name"], (r["speedup"], r["relative_accuracy"]), textcoords="offset points",
                    xytext=(5, 3), fontsize=7)
    best = next(r for r in profile["sweep"] if r["name"] == profile["chosen"])
    ax.scatter([best["speedup"]], [best["relative_accuracy"]], s=320, facecolors="none",
               edgecolors="red", linewidths=1.5, zorder=4, label=f"chosen: {best['name']}")
    t = profile["tuned"]
    ax.axhline(t["min_accuracy"], color="red", lw=0.8, ls="--", label=f"budget {t['min_accuracy']:g} x full")
    ax.axvline(1.0, color="gray", lw=0.8, ls=":")
    ax.set_xlabel(f"estimated request speedup over full (TTFT + {t['gen_tokens']} tokens)")
    ax.set_ylabel("accuracy / full attention's")
    ax.set_title(f"pylazy tune: {os.path.basename(profile['model']['path'])}, {t['length']} tokens, "
                 f"{t['prompts']} prompts", fontsize=9)
    ax.margins(x=0.2, y=0.15)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def tune(model_path: str, args: argparse.Namespace, runner_factory=None) -> dict:
    """The whole command: sweep, choose, optionally verify, write profile + plot; returns the profile."""
    from .profiles import save_profile
    import tempfile
    with tempfile.TemporaryDirectory(prefix="pylazy-tune-") as work:
        sweep = run_sweep(model_path, args, work, runner_factory)
        profile = build_profile(model_path, args, sweep)
        if args.verify_samples and profile["chosen"] != "full":   # full attention needs no check
            name = profile["chosen"]
            profile["verified"] = verify(model_path, args, name, sweep["policies"][name], work, runner_factory)
    path = save_profile(model_path, profile, args.profile_dir)
    profile["path"] = str(path)
    plot = None if args.no_plot else plot_sweep(profile, str(path.with_suffix(".png")))
    if args.out:
        import json
        import shutil
        os.makedirs(args.out, exist_ok=True)
        shutil.copy(path, os.path.join(args.out, "profile.json"))
        if plot:
            shutil.copy(plot, os.path.join(args.out, "sweep.png"))
        with open(os.path.join(args.out, "sweep-results.json"), "w") as f:
            json.dump(sweep["results"], f, indent=1, default=repr)
    return profile


def _floats(text: str) -> tuple:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("-m", "--model", default=None, help="GGUF file or registry name (default: the default model)")
    ap.add_argument("--min-accuracy", type=float, default=0.98,
                    help="accuracy budget as a fraction of full attention's (default 0.98)")
    ap.add_argument("--length", type=int, default=8192, help="calibration prompt length in tokens (default 8192)")
    ap.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), help="eval task specs (pylazy eval's)")
    ap.add_argument("--depths", type=float, nargs="+", default=list(DEFAULT_DEPTHS))
    ap.add_argument("--samples", type=int, default=1, help="prompts per task and depth")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=40,
                    help="cap on each answer's tokens (default 40: four 7-digit numbers fit; what follows "
                         "the answer only costs time)")
    ap.add_argument("--gen-tokens", type=int, default=64,
                    help="tokens of a typical answer, for the request-time estimate (default 64)")
    ap.add_argument("--lazy-keeps", type=_floats, nargs="*", default=[_floats(k) for k in DEFAULT_LAZY_KEEPS],
                    metavar="K,K,K", help="keep schedules tried at 25/50/75 %% depth")
    ap.add_argument("--k-divisors", type=int, nargs="*", default=list(DEFAULT_K_DIVISORS),
                    metavar="D", help="recycle K = length / D")
    ap.add_argument("--strides", type=int, nargs="*", default=list(DEFAULT_STRIDES))
    ap.add_argument("--thresholds", type=float, nargs="*", default=list(DEFAULT_THRESHOLDS),
                    help="dynamic thresholds tried at K = length / 8, stride 16")
    ap.add_argument("--combos", type=int, default=1, help="lazy + recycle pairs tried in stage 2 (default 1)")
    ap.add_argument("--verify-samples", type=int, default=0,
                    help="re-measure full and the chosen setting on this many held-out samples per task/depth")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads of the engine")
    ap.add_argument("--n-gpu-layers", type=int, default=None, help="layers on the GPU (-1: all)")
    ap.add_argument("--no-plot", action="store_true", help="no PNG (matplotlib not needed)")
    ap.add_argument("--profile-dir", default=None, help="where profiles live (default: $PYLAZY_PROFILES or the cache)")
    ap.add_argument("--out", default=None, help="also copy profile.json, sweep.png and the raw results here")
    ap.add_argument("--no-progress", action="store_true")


def check_args(args: argparse.Namespace) -> None:
    """ValueError for values that parse but make no sweep."""
    if not 0.0 < args.min_accuracy <= 1.5:
        raise ValueError(f"--min-accuracy is a fraction of full attention's accuracy, got {args.min_accuracy}")
    if args.length < 256:
        raise ValueError(f"--length must be >= 256 tokens, got {args.length}")
    for name in ("samples", "gen_tokens", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.combos < 0 or args.verify_samples < 0:
        raise ValueError("--combos and --verify-samples must be >= 0")
    if any(d < 1 for d in args.k_divisors) or any(s < 1 for s in args.strides):
        raise ValueError("--k-divisors and --strides must be >= 1")
    from .eval.tasks import parse_spec
    for spec in args.tasks:
        parse_spec(spec)
    lazy_candidates(args.lazy_keeps)   # LazyPrefill validates the schedules
    recycle_candidates(args.length, args.k_divisors, args.strides, args.thresholds)


def register(subparsers) -> None:
    from .cli_args import add_command
    add_command(subparsers, "tune", "choose a model's default lazy/recycle policies by a calibration sweep",
                __doc__.split("\n\n")[2].replace("\n", " "), add_arguments, _cmd_tune)


def _cmd_tune(args) -> int:
    from .cli_args import UsageError
    from .models import resolve_model_path
    try:
        check_args(args)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    path = resolve_model_path(args.model)
    profile = tune(path, args)
    rows = profile["sweep"]
    print(f"\n{'setting':<32} {'acc':>5} {'vs full':>8} {'TTFT s':>8} {'tok/s':>7} {'speedup':>8}  passes")
    for r in rows:
        print(f"{r['name']:<32} {r['accuracy']:5.2f} {r['relative_accuracy']:8.3f} {r['ttft_s']:8.2f} "
              f"{r['decode_tok_s'] or 0:7.1f} {r['speedup']:8.2f}  {'yes' if r['passes'] else 'no'}")
    print(f"chosen: {profile['chosen']} (sweep {profile['tuned']['sweep_seconds']:.0f} s)")
    if "verified" in profile:
        v = profile["verified"]
        print(f"held out ({v['prompts']} prompts, seed {v['seed']}): {v['accuracy']:.2f} vs full "
              f"{v['full_accuracy']:.2f} = {v['relative_accuracy']:.3f} of full; "
              f"{'meets' if v['meets_budget'] else 'MISSES'} the budget")
    print(f"profile: {profile['path']}" + ("" if args.no_plot else
          f" (plot {os.path.splitext(profile['path'])[0]}.png)"), file=sys.stderr)
    return 0
