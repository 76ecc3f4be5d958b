"""PNG plots of a run_suite result: accuracy against speedup, depth x length heatmaps, and
perplexity against teacher-forced decode speedup."""
from __future__ import annotations

import math
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")   # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .scoring import baseline_policy  # noqa: E402,F401  (re-exported: plots.baseline_policy)


def _geomean(xs):
    xs = [x for x in xs if x and x > 0 and math.isfinite(x)]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def speedups(results: dict, key: str, higher_is_faster: bool) -> dict:
    """policy -> (mean accuracy, geometric-mean speedup over the baseline on matching
    task x length records)."""
    base = baseline_policy(results)
    ref = {(r["task"], r["context_len"]): r[key] for r in results["records"] if r["policy"] == base}
    out = {}
    for pol in dict.fromkeys(r["policy"] for r in results["records"]):
        recs = [r for r in results["records"] if r["policy"] == pol]
        ratios = []
        for r in recs:
            b, v = ref.get((r["task"], r["context_len"])), r[key]
            if b and v:
                ratios.append(v / b if higher_is_faster else b / v)
        out[pol] = (float(np.mean([r["accuracy"] for r in recs])), _geomean(ratios))
    return out


def _scatter(results, key, higher_is_faster, xlabel, path):
    base = baseline_policy(results)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for pol, (acc, sp) in speedups(results, key, higher_is_faster).items():
        if sp is None:
            continue
        full = pol == base
        ax.scatter([sp], [acc], marker="*" if full else "o", s=160 if full else 50,
                   color="black" if full else None, zorder=3)
        label = pol + (" (full attention)" if full and pol != "full" else "")
        ax.annotate(label, (sp, acc),
                    textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.axvline(1.0, color="gray", lw=0.8, ls=":")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (mean over tasks and lengths)")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def depth_length_grid(results: dict, policy: str):
    """(depths, lengths, matrix[depth, length]) of accuracy averaged over depth tasks."""
    cells = defaultdict(list)
    for r in results["records"]:
        if r["policy"] != policy:
            continue
        for d, acc in r["by_depth"].items():
            if d != "none" and acc is not None:
                cells[(float(d), r["context_len"])].append(acc)
    depths = sorted({d for d, _ in cells})
    lengths = sorted({n for _, n in cells})
    m = np.full((len(depths), len(lengths)), np.nan)
    for (d, n), v in cells.items():
        m[depths.index(d), lengths.index(n)] = float(np.mean(v))
    return depths, lengths, m


def _heatmaps(results, path):
    pols = list(dict.fromkeys(r["policy"] for r in results["records"]))
    fig, axes = plt.subplots(1, len(pols), figsize=(3.2 * len(pols) + 1, 3.6), squeeze=False)
    im = None
    for ax, pol in zip(axes[0], pols):
        depths, lengths, m = depth_length_grid(results, pol)
        im = ax.imshow(m, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=8)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=8)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(pol, fontsize=9)
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if not np.isnan(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7)
    if im is not None:
        fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label="accuracy")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def ppl_speedups(results: dict) -> dict:
    """(policy, context_len) -> (ppl, decode speedup over the baseline's teacher-forced
    decode at the same context, or None) for the perplexity runs that have a ppl."""
    base = baseline_policy(results)
    runs = [q for q in results.get("perplexity", []) if q.get("ppl")]
    ref = {q["context_len"]: q.get("decode_tok_s") for q in runs if q["policy"] == base}
    out = {}
    for q in runs:
        b, v = ref.get(q["context_len"]), q.get("decode_tok_s")
        out[(q["policy"], q["context_len"])] = (q["ppl"], v / b if b and v else None)
    return out


def _ppl_scatter(results, path):
    base = baseline_policy(results)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for (pol, n), (ppl, sp) in ppl_speedups(results).items():
        if sp is None:
            continue
        full = pol == base
        ax.scatter([sp], [ppl], marker="*" if full else "o", s=160 if full else 50,
                   color="black" if full else None, zorder=3)
        ax.annotate(f"{pol} ({n})", (sp, ppl), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.axvline(1.0, color="gray", lw=0.8, ls=":")
    ax.margins(x=0.15, y=0.15)   # room for the labels
    ax.set_xlabel("teacher-forced decode speedup over full attention (x)")
    ax.set_ylabel("perplexity of the forced tokens (lower is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_all(results: dict, out_dir: str) -> list[str]:
    """Writes the PNGs into out_dir and returns their paths: accuracy plots when there are
    task records, perplexity against decode speedup when there are perplexity runs."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    if results["records"]:
        paths += [
            _scatter(results, "ttft_s", False, "TTFT speedup over full attention (x)",
                     os.path.join(out_dir, "accuracy_vs_ttft_speedup.png")),
            _scatter(results, "decode_tok_s", True, "decode speedup over full attention (x)",
                     os.path.join(out_dir, "accuracy_vs_decode_speedup.png")),
            _heatmaps(results, os.path.join(out_dir, "accuracy_heatmap.png")),
        ]
    if any(sp is not None for _, sp in ppl_speedups(results).values()):
        paths.append(_ppl_scatter(results, os.path.join(out_dir, "ppl_vs_decode_speedup.png")))
    return paths
