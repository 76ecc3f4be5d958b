"""Join per-length results.json files into one, and compare greedy outputs across runs.

    python -m pylazy.eval.merge OUT_DIR RUN_DIR... [--reference REF_DIR... --policy full]

Writes OUT_DIR/results.json, table.md (records and perplexity concatenated, lengths joined), the
table and the plots; with --reference, OUT_DIR/agreement.json: for each task instance run
by both, whether the reference backend's greedy output equals the policy's.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Sequence


def load(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "results.json")) as f:
        return json.load(f)


def merge(parts: Sequence[dict]) -> dict:
    """One result from runs of the same suite at different lengths (first run's config)."""
    if not parts:
        raise ValueError("nothing to merge")
    config = dict(parts[0]["config"])
    config["lengths"] = sorted({n for p in parts for n in p["config"]["lengths"]})
    for p in parts[1:]:   # a callable policy records its kwargs per length
        for name, desc in p["config"]["policies"].items():
            if "per_length" in desc:
                config["policies"][name]["per_length"].update(desc["per_length"])
    return {"config": config, "records": [r for p in parts for r in p["records"]],
            "perplexity": [x for p in parts for x in p.get("perplexity", [])]}


def _instances(results: dict, policy: str) -> dict:
    return {(r["task"], r["context_len"], i["depth"], i["seed"]): i
            for r in results["records"] if r["policy"] == policy for i in r["instances"]}


def agreement(results: dict, reference: dict, policy: str = "full", ref_policy: str = "full") -> dict:
    """Instance by instance: does the reference's greedy output equal results' policy's?"""
    ours, ref = _instances(results, policy), _instances(reference, ref_policy)
    rows = []
    for key in sorted(set(ours) & set(ref), key=str):
        a, b = ours[key], ref[key]
        rows.append({"task": key[0], "context_len": key[1], "depth": key[2],
                     "identical": a["output"] == b["output"], "score": a["score"],
                     "ref_score": b["score"], "output": a["output"], "ref_output": b["output"]})
    return {"policy": policy, "ref_policy": ref_policy, "compared": len(rows),
            "identical": sum(r["identical"] for r in rows), "instances": rows}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--reference", nargs="*", default=[], help="run dirs of the reference backend")
    ap.add_argument("--policy", default="full", help="the policy compared with the reference's")
    ap.add_argument("--no-plots", action="store_true")
    a = ap.parse_args(argv)
    from .runner import format_table
    results = merge([load(d) for d in a.runs])
    os.makedirs(a.out, exist_ok=True)
    if a.reference:
        ref = merge([load(d) for d in a.reference])
        agree = agreement(results, ref, a.policy, next(iter(ref["config"]["policies"])))
        results["reference_agreement"] = {k: v for k, v in agree.items() if k != "instances"}
        results["reference_agreement"]["reference"] = [   # its outputs are in agreement.json
            {k: r[k] for k in ("task", "policy", "context_len", "accuracy", "ttft_s", "decode_tok_s")}
            for r in ref["records"]]
        results["reference_agreement"]["reference_config"] = ref["config"]
        with open(os.path.join(a.out, "agreement.json"), "w") as f:
            json.dump(agree, f, indent=1)
        print(f"greedy outputs identical to the reference: {agree['identical']}/{agree['compared']}")
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(format_table(results))
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(markdown_table(results) + "\n")
    if not a.no_plots:
        from .plots import plot_all
        for path in plot_all(results, a.out):
            print("wrote", path)



def markdown_table(results: dict) -> str:
    """policy x length: accuracy per task and mean, TTFT, decode tok/s, computed fraction, KV MiB."""
    recs = results["records"]
    specs = list(dict.fromkeys(r["task"] for r in recs))
    mean = lambda xs: sum(xs) / len(xs) if xs else None   # noqa: E731
    head = ["policy", "len"] + specs + ["mean acc", "TTFT s", "decode tok/s", "computed", "KV MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for pol in dict.fromkeys(r["policy"] for r in recs):
        for n in sorted({r["context_len"] for r in recs if r["policy"] == pol}):
            sub = {r["task"]: r for r in recs if r["policy"] == pol and r["context_len"] == n}
            rs = list(sub.values())
            shared = any(i.get("ttft_shared") for r in rs for i in r["instances"])
            num = lambda key: [r[key] for r in rs if r.get(key) is not None]   # noqa: E731
            stat = lambda key: [r["stats"][key] for r in rs if r["stats"].get(key) is not None]  # noqa: E731
            fmt = lambda x, f: "-" if x is None else format(x, f)   # noqa: E731
            kv = mean(stat("kv_bytes"))
            lines.append("| " + " | ".join(
                [pol, str(n)] + [fmt(sub[s]["accuracy"], ".2f") if s in sub else "-" for s in specs]
                + [fmt(mean([r["accuracy"] for r in rs]), ".2f"),
                   fmt(mean(num("ttft_s")), ".2f") + (" (shared)" if shared else ""),
                   fmt(mean(num("decode_tok_s")), ".1f"), fmt(mean(stat("computed_fraction")), ".2f"),
                   fmt(None if kv is None else kv / 2 ** 20, ".1f")]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
