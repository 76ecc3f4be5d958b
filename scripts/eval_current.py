#!/usr/bin/env python3
"""One table and plots from chosen policies of several `pylazy eval` runs, on the prompts they share.

    python scripts/eval_current.py docs/eval \
        --run docs/eval/gpu/sweep8-combo-seed13-results.json.gz:full,lazy_default=LazyPrefill(),rec_s16=Recycle(),lazy_rec=both \
        --run docs/eval/gpu/sweep7-seed13-results.json.gz:stream=StreamingLLM

Each --run is FILE:POLICY[=LABEL],... (results.json, .json.gz, or a run's partial.jsonl); a label given in several runs
(other seeds, other lengths) takes the prompts of all of them. Only prompts (task, length, depth,
seed) that every selected policy ran are kept, so each row compares like with like; the records
are rebuilt from those instances. Writes OUT/results.json.gz, OUT/table.md (pylazy.eval.merge's table,
then needles scored over all prompts and their share of full attention's, with TTFT and decode
speedups) and the plots of pylazy.eval.plots.
(Writes OUT/results.json.gz.) The first selected policy is the baseline.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pylazy.eval.runner import _aggregate  # noqa: E402


def load(path: str) -> dict:
    """A results.json(.gz), or the partial.jsonl of a run cut short (policies' kwargs unknown there:
    "full" is taken as the baseline)."""
    if path.endswith(".jsonl"):
        return _load_partial(path)
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        return json.load(f)


def _load_partial(path: str) -> dict:
    groups = defaultdict(list)
    with open(path) as f:
        for line in f:
            if line.strip():
                inst = json.loads(line)
                groups[(inst.pop("policy"), inst.pop("task"), inst.pop("context_len"))].append(inst)
    records = [{"policy": p, "task": t, "context_len": n, "instances": rs} for (p, t, n), rs in groups.items()]
    policies = {p: {} if p == "full" else {"from": "partial.jsonl"} for p, _, _ in groups}
    return {"config": {"policies": policies}, "records": records}


def parse_run(spec: str):
    path, _, names = spec.rpartition(":")
    picks = []
    for item in names.split(","):
        old, _, new = item.partition("=")
        picks.append((old, new or old))
    return path, picks


def _key(task: str, n: int, inst: dict):
    return (task, n, inst["depth"], inst["seed"])


def combine(runs) -> dict:
    """{"config", "records"} of the selected policies on their common prompts."""
    chosen = {}     # label -> {prompt key: instance}
    policies, configs = {}, []
    for path, picks in runs:
        data = load(path)
        configs.append({"file": os.path.basename(path), **{k: data["config"].get(k) for k in
                        ("model", "lengths", "tasks", "depths", "seed", "n_samples", "n_threads", "n_gpu_layers")}})
        for old, new in picks:
            recs = [r for r in data["records"] if r["policy"] == old]
            if not recs:
                raise SystemExit(f"{path}: no policy {old!r} (has {sorted({r['policy'] for r in data['records']})})")
            # the same label from several runs (other seeds) adds their prompts
            chosen.setdefault(new, {}).update({_key(r["task"], r["context_len"], i): i
                                               for r in recs for i in r["instances"]})
            policies[new] = data["config"]["policies"][old]
    common = set.intersection(*(set(v) for v in chosen.values()))
    if not common:
        raise SystemExit("the selected policies share no prompt")
    records = []
    for label, inst in chosen.items():
        groups = defaultdict(list)
        for key in sorted(common, key=str):
            groups[(key[0], key[1])].append(inst[key])
        records += [_aggregate(task, label, n, rs) for (task, n), rs in sorted(groups.items())]
    return {"config": {"policies": policies, "sources": configs,
                       "lengths": sorted({k[1] for k in common}), "prompts": len(common)},
            "records": records, "perplexity": []}


def totals_table(results: dict) -> str:
    """policy: needles over all prompts, % of the baseline's, mean TTFT and decode speedups."""
    from pylazy.eval.plots import speedups
    pols = list(dict.fromkeys(r["policy"] for r in results["records"]))
    score = {p: sum(i["score"] for r in results["records"] if r["policy"] == p for i in r["instances"])
             for p in pols}
    n = sum(len(r["instances"]) for r in results["records"] if r["policy"] == pols[0])
    ttft = speedups(results, "ttft_s", False)
    dec = speedups(results, "decode_tok_s", True)
    fmt = lambda x: "-" if x is None else f"{x:.2f}x"   # noqa: E731
    lines = [f"| policy | score (sum over {n} prompts) | vs {pols[0]} | TTFT speedup | decode speedup |",
             "|---|---|---|---|---|"]
    for p in pols:
        rel = "—" if p == pols[0] else f"{100 * score[p] / score[pols[0]]:.1f} %"
        shared = all(i.get("ttft_shared") for r in results["records"] if r["policy"] == p for i in r["instances"])
        lines.append(f"| {p} | {score[p]:.2f} | {rel} | {'(shared prefill)' if shared and p != pols[0] else fmt(ttft[p][1])}"
                     f" | {fmt(dec[p][1])} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--run", action="append", required=True, metavar="FILE:POLICY[=LABEL],...")
    ap.add_argument("--no-plots", action="store_true")
    a = ap.parse_args(argv)
    from pylazy.eval.merge import markdown_table
    results = combine([parse_run(s) for s in a.run])
    os.makedirs(a.out, exist_ok=True)
    with gzip.open(os.path.join(a.out, "results.json.gz"), "wt") as f:   # ~1.4 MB plain at 120 x 5
        json.dump(results, f, indent=1)
    text = totals_table(results) + "\n\n" + markdown_table(results) + "\n"
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(text)
    print(text)
    if not a.no_plots:
        from pylazy.eval.plots import plot_all
        for p in plot_all(results, a.out):
            print("wrote", p)


if __name__ == "__main__":
    main()
