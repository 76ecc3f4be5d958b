"""`pylazy tune`: choose a model file's default lazy / recycle policies by a short calibration sweep.

    pylazy tune -m smollm2 --length 2048 --min-accuracy 0.98

Stage 1 runs the eval harness's tasks (pylazy/eval) at one length under full attention, lazy
keep schedules and recycle K / stride / dynamic-threshold settings; stage 2 tries the fastest
pairs of a passing lazy schedule with a passing recycle setting together. A setting *passes*
when its accuracy is at least ``min_accuracy`` x full attention's on the same prompts. Of the
passing ones the fastest ``--shortlist`` by the estimated time of a request (TTFT + ``gen_tokens``
/ decode speed, both measured: the tokens actually generated vary by policy, so their own
decode time would favour a policy that stops early) run again with full attention on held-out
prompts (seed + 1000, ``--verify-samples``); the fastest of them that meets the budget there and
whose paired lower bound over all its prompts holds is chosen, else full attention
(pylazy/tune_rule.py says why: the winner's curse). A final check on a third seed (seed + 2000,
``--check-samples``) that took no part in the choice reports whether the profile meets its
budget on prompts it never saw.

Writes the profile (pylazy/profiles.py: JSON keyed by the file's identity, read by
``Llama(model_path=...)`` and the CLI as the file's default policies, shown by ``pylazy info``)
with every sweep row, every verification and the check, and a PNG of the sweep next to it.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from datetime import datetime, timezone
from typing import Dict, List, Sequence

from .tune_rule import add_paired, cascade, paired, prompt_scores, shortlist

# Short answers (<= 36 tokens) that depend on a few positions of the context: what lazy pruning
# and recycled selection can lose. 4 tasks x 2 depths = 8 prompts a sample. The cost is the
# prefills: full attention and each lazy schedule prefill every prompt, the recycle settings
# reuse full's prefill and only decode. On 2 cores at 2K (SmolLM2, ~14 s a full prefill) the
# defaults (9 settings, 8 sweep + 8 held-out + 8 check prompts) take ~12 minutes
# (docs/eval/models-s6/README.md).
DEFAULT_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "qa")
DEFAULT_DEPTHS = (0.25, 0.75)
DEFAULT_LAZY_KEEPS = ("0.7,0.5,0.35", "0.6,0.4,0.25")   # 45/30/20 lost 15 % held out on SmolLM2
LAZY_LAYERS = (0.25, 0.5, 0.75)   # where the schedules prune: the measured default's depths
DEFAULT_K_DIVISORS = (16, 8, 4)   # recycle K = length / divisor
DEFAULT_STRIDES = (16, 32)
# dynamic stride, tried at K = length / 8, stride 16: none by default, its similarity check
# decoded at 19.7 tok/s against full's 42 on the CPU (slower than full attention)
DEFAULT_THRESHOLDS = ()
HELD_OUT_SEED_OFFSET = 1000       # the cascade's held-out prompts
CHECK_SEED_OFFSET = 2000          # the final check's: never part of the choice


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
    """Stages 1 and 2; returns {"rows", "policies", "seconds", "results"}; the rows marked by
    choose (passes: the point screen) and add_paired (holds: the paired bound)."""
    t0 = time.perf_counter()
    policies: Dict[str, dict] = {"full": {}}
    policies.update(lazy_candidates(args.lazy_keeps))
    policies.update(recycle_candidates(args.length, args.k_divisors, args.strides, args.thresholds))
    _stage(args, f"sweep: {len(policies)} settings, seed {args.seed}")
    stage1 = _suite(model_path, policies, args, args.seed, args.samples, os.path.join(work_dir, "stage1"),
                    runner_factory)
    rows = summarize(stage1, args.gen_tokens)
    choose(rows, args.min_accuracy)
    combos = _combos(rows, policies, args.combos)
    results = [stage1]
    if combos:
        policies.update(combos)
        _stage(args, f"sweep stage 2: {', '.join(combos)}")
        # same prompts as stage 1, so its full-attention row is the baseline of these too
        stage2 = _suite(model_path, combos, args, args.seed, args.samples,
                        os.path.join(work_dir, "stage2"), runner_factory)
        results.append(stage2)
        rows += summarize(stage2, args.gen_tokens)
    choose(rows, args.min_accuracy)
    add_paired(rows, prompt_scores(*results), args.bound_z, args.min_accuracy)
    return {"rows": rows, "policies": policies, "results": results,
            "seconds": time.perf_counter() - t0}


def _stage(args: argparse.Namespace, text: str) -> None:
    if not args.no_progress:
        print(f"[pylazy tune] {text}", file=sys.stderr, flush=True)


def decide(model_path: str, args: argparse.Namespace, sweep: dict, work_dir: str,
           runner_factory=None) -> dict:
    """The choice: the held-out cascade over the shortlist (tune_rule.cascade), or without
    --verify-samples the fastest sweep row whose paired bound holds. Returns {"chosen",
    "fallback", "verification"}."""
    rows = sweep["rows"]
    if not args.verify_samples:
        best = min((r for r in rows if r["holds"]), key=lambda r: (r["est_seconds"], r["name"] != "full"))
        return {"chosen": best["name"], "fallback": False, "verification": None}
    seed = args.seed + HELD_OUT_SEED_OFFSET
    names = [r["name"] for r in shortlist(rows, args.shortlist)]
    verification = {"seed": seed, "samples": args.verify_samples, "shortlist": names, "candidates": []}
    if not names:
        verification["note"] = "no setting faster than full attention met the budget on the sweep's prompts"
        return {"chosen": "full", "fallback": True, "verification": verification}
    _stage(args, f"held out: full + {len(names)} shortlisted settings, seed {seed}")
    held = _suite(model_path, {"full": {}, **{n: sweep["policies"][n] for n in names}}, args, seed,
                  args.verify_samples, os.path.join(work_dir, "verify"), runner_factory)
    held_rows = {r["name"]: r for r in summarize(held, args.gen_tokens)}
    chosen, records = cascade(names, prompt_scores(*sweep["results"]), prompt_scores(held),
                              args.bound_z, args.min_accuracy)
    for rec in records:   # the held-out speed too: what the estimate was on other prompts
        rec["held_out"]["speedup"] = round(held_rows["full"]["est_seconds"] / held_rows[rec["name"]]["est_seconds"], 4)
    verification.update(prompts=records[0]["held_out"]["prompts"], full_accuracy=round(
        held_rows["full"]["accuracy"], 4), candidates=records)
    return {"chosen": chosen, "fallback": chosen == "full", "verification": verification}


def final_check(model_path: str, args: argparse.Namespace, chosen: str, policy: dict, work_dir: str,
                runner_factory=None) -> dict:
    """Full attention and the chosen setting on a third seed (seed + 2000) that took no part in
    the choice: reported, never used to choose."""
    seed = args.seed + CHECK_SEED_OFFSET
    out = {"seed": seed, "samples": args.check_samples,
           "note": "reported only: these prompts took no part in the choice"}
    if chosen == "full":
        return {**out, "meets_budget": True, "relative_accuracy": 1.0,
                "skipped": "full attention was chosen: it is the baseline itself"}
    _stage(args, f"final check: full + {chosen}, seed {seed}")
    res = _suite(model_path, {"full": {}, chosen: policy}, args, seed, args.check_samples,
                 os.path.join(work_dir, "check"), runner_factory)
    scores = prompt_scores(res)
    st = paired(scores["full"], scores[chosen], args.bound_z)
    rows = {r["name"]: r for r in summarize(res, args.gen_tokens)}
    return {**out, **{k: round(v, 4) if isinstance(v, float) else v for k, v in st.items()},
            "speedup": round(rows["full"]["est_seconds"] / rows[chosen]["est_seconds"], 4),
            "meets_budget": st["relative_accuracy"] >= args.min_accuracy - 1e-9}


# ----- the profile, its plot, the command ------------------------------------------------------
def build_profile(model_path: str, args: argparse.Namespace, sweep: dict, decision: dict) -> dict:
    """The JSON a person reads and Llama applies: the chosen policies, how they were chosen, every
    sweep row and every verification."""
    from .profiles import file_identity, policy_to_dict
    name = decision["chosen"]
    policy = sweep["policies"][name]
    keep = ("name", "prompts", "accuracy", "relative_accuracy", "relative_lower", "wins", "losses",
            "ttft_s", "decode_tok_s", "est_seconds", "speedup", "passes", "holds")
    return {
        "model": {"path": os.path.abspath(model_path), "bytes": os.path.getsize(model_path),
                  "identity": file_identity(model_path)},
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "chosen": name,
        "fallback": decision["fallback"],
        "lazy": policy_to_dict(policy.get("lazy")),
        "recycle": policy_to_dict(policy.get("recycle")),
        "tuned": {"length": args.length, "tasks": list(args.tasks), "depths": list(args.depths),
                  "seed": args.seed, "samples": args.samples, "prompts": sweep["rows"][0]["prompts"],
                  "min_accuracy": args.min_accuracy, "bound_z": args.bound_z, "gen_tokens": args.gen_tokens,
                  "max_new_tokens": args.max_new_tokens, "shortlist": args.shortlist,
                  "threads": args.threads, "sweep_seconds": round(sweep["seconds"], 1),
                  "rule": RULE},
        "sweep": [{k: (round(r[k], 4) if isinstance(r[k], float) and math.isfinite(r[k]) else r[k])
                   for k in keep} for r in sweep["rows"]],
        "verification": decision["verification"],
    }


RULE = ("sweep: passes = accuracy >= min_accuracy x full's on the sweep prompts; the --shortlist fastest "
        "passers (TTFT + gen_tokens / decode tok/s) run again with full on held-out prompts (seed + 1000); "
        "chosen: the fastest that meets the budget held out and whose paired lower bound "
        "1 + (mean(d) - z sd(d)/sqrt(n)) / full accuracy, d = its score - full's per prompt over sweep + "
        "held-out prompts, is >= min_accuracy; none: full attention (fallback). Without held-out "
        "prompts: the fastest whose paired bound over the sweep holds. check: a third seed (seed + 2000), "
        "reported only")


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
    _plot_held_out(ax, profile)
    best = next(r for r in profile["sweep"] if r["name"] == profile["chosen"])
    ax.scatter([best["speedup"]], [best["relative_accuracy"]], s=320, facecolors="none",
               edgecolors="red", linewidths=1.5, zorder=4,
               label=f"chosen: {best['name']}" + (" (fallback)" if profile.get("fallback") else ""))
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


def _plot_held_out(ax, profile: dict) -> None:
    """Each verified setting's held-out point (an arrow from its sweep point) and the check's."""
    sweep = {r["name"]: r for r in profile["sweep"]}
    for i, c in enumerate((profile.get("verification") or {}).get("candidates", [])):
        a, h = sweep[c["name"]], c["held_out"]
        ax.annotate("", xy=(a["speedup"], h["relative_accuracy"]), xytext=(a["speedup"], a["relative_accuracy"]),
                    arrowprops={"arrowstyle": "->", "color": "gray", "lw": 0.8})
        ax.scatter([a["speedup"]], [h["relative_accuracy"]], marker="x", color="gray", zorder=3,
                   label="held out (verified)" if i == 0 else None)
    c = profile.get("check")
    if c and "skipped" not in c:
        ax.scatter([c["speedup"]], [c["relative_accuracy"]], marker="D", color="red", s=40, zorder=5,
                   label=f"check, seed {c['seed']}: {c['relative_accuracy']:.3f}")


def tune(model_path: str, args: argparse.Namespace, runner_factory=None) -> dict:
    """The whole command: sweep, held-out cascade, final check, profile + plot; returns the profile."""
    from .profiles import save_profile
    import tempfile
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pylazy-tune-") as work:
        sweep = run_sweep(model_path, args, work, runner_factory)
        decision = decide(model_path, args, sweep, work, runner_factory)
        profile = build_profile(model_path, args, sweep, decision)
        if args.check_samples:
            name = profile["chosen"]
            profile["check"] = final_check(model_path, args, name, sweep["policies"][name], work, runner_factory)
    profile["tuned"]["total_seconds"] = round(time.perf_counter() - t0, 1)
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
    ap.add_argument("--shortlist", type=int, default=3,
                    help="fastest sweep-passers verified on held-out prompts (default 3)")
    ap.add_argument("--verify-samples", type=int, default=1,
                    help="held-out samples per task/depth for the shortlist (default 1; 0: choose on the "
                         "sweep's prompts by the paired bound alone)")
    ap.add_argument("--check-samples", type=int, default=1,
                    help="samples per task/depth of the final check on a third seed, reported only (default 1; 0: none)")
    ap.add_argument("--bound-z", type=float, default=1.0,
                    help="z of the paired lower bound on accuracy vs full (default 1.0; 0: the point estimate)")
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
    for name in ("combos", "verify_samples", "check_samples", "bound_z"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
    if args.shortlist < 1:
        raise ValueError("--shortlist must be >= 1")
    if max(args.samples, args.verify_samples, args.check_samples) > HELD_OUT_SEED_OFFSET:
        raise ValueError(f"at most {HELD_OUT_SEED_OFFSET} samples: the held-out and check seeds "
                         f"are seed + {HELD_OUT_SEED_OFFSET} and seed + {CHECK_SEED_OFFSET}")
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
    print(report(profile))
    print(f"profile: {profile['path']}" + ("" if args.no_plot else
          f" (plot {os.path.splitext(profile['path'])[0]}.png)"), file=sys.stderr)
    return 0


def report(profile: dict) -> str:
    """What the command prints: the sweep table, each verification, the choice, the check."""
    budget = profile["tuned"]["min_accuracy"]
    lines = [f"\n{'setting':<32} {'acc':>5} {'vs full':>8} {'bound':>6} {'W/L':>5} {'TTFT s':>7} "
             f"{'tok/s':>6} {'speedup':>7}  passes holds"]
    for r in profile["sweep"]:
        lines.append(f"{r['name']:<32} {r['accuracy']:5.2f} {r['relative_accuracy']:8.3f} "
                     f"{r['relative_lower']:6.3f} {r['wins']:>2}/{r['losses']:<2} {r['ttft_s']:7.2f} "
                     f"{r['decode_tok_s'] or 0:6.1f} {r['speedup']:7.2f}  {'yes' if r['passes'] else 'no':<6} "
                     f"{'yes' if r['holds'] else 'no'}")
    v = profile.get("verification")
    if v:
        lines.append(f"held out (seed {v['seed']}, {v.get('prompts', 0)} prompts): "
                     + ("; ".join(v["shortlist"]) if v["shortlist"] else v.get("note", "")))
        for c in v["candidates"]:
            h, p = c["held_out"], c["pooled"]
            lines.append(f"  {c['name']:<30} held out {h['accuracy']:.2f} vs full {h['full_accuracy']:.2f} = "
                         f"{h['relative_accuracy']:.3f}; pooled {p['prompts']} prompts {p['relative_accuracy']:.3f}, "
                         f"bound {p['relative_lower']:.3f}: {'ACCEPTED' if c['accepted'] else 'no'} ({c['why']})")
    lines.append(f"chosen: {profile['chosen']}" + (" (fallback: no shortlisted setting met the budget held out; "
                                                  "full attention)" if profile["fallback"] else ""))
    c = profile.get("check")
    if c and "skipped" in c:
        lines.append(f"check (seed {c['seed']}): skipped, {c['skipped']}")
    elif c:
        lines.append(f"check (seed {c['seed']}, {c['prompts']} prompts never used to choose): {c['accuracy']:.2f} "
                     f"vs full {c['full_accuracy']:.2f} = {c['relative_accuracy']:.3f} of full, speedup "
                     f"{c['speedup']:.2f}; {'meets' if c['meets_budget'] else 'MISSES'} the budget {budget:g}")
    t = profile["tuned"]
    lines.append(f"total wall time: {t['total_seconds']:.0f} s (sweep {t['sweep_seconds']:.0f} s)")
    return "\n".join(lines)
