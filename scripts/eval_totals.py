#!/usr/bin/env python3
"""Needles scored per policy, summed over the prompts of several `pylazy eval` runs, and as a share of
full attention's sum in the same runs (the recycling issue's "recycled >= 95 % of full").

    python3 scripts/eval_totals.py docs/eval/gpu/sweep6-*.json.gz docs/eval/gpu/sweep7-seed13-results.json.gz

Reads results.json or results.json.gz; --lengths keeps only those context lengths (default 4096, 7936);
--rename OLD=NEW counts a policy name of older runs as another (e.g. rec_s16=rec_share0 for runs made
before Recycle() defaulted to share=0.5).
"""
from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict


def load(path: str) -> dict:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def totals(path: str, lengths, rename) -> dict:
    """policy -> [needles scored, prompts]"""
    out = defaultdict(lambda: [0.0, 0])
    for r in load(path)["records"]:
        if lengths and r["context_len"] not in lengths:
            continue
        p = rename.get(r["policy"], r["policy"])
        out[p][0] += sum(i["score"] for i in r["instances"])
        out[p][1] += len(r["instances"])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--lengths", default="4096,7936")
    ap.add_argument("--rename", action="append", default=[])
    args = ap.parse_args(argv)
    lengths = {int(x) for x in args.lengths.split(",") if x}
    rename = dict(x.split("=", 1) for x in args.rename)
    runs = [(f, totals(f, lengths, rename)) for f in args.files]
    policies = list(dict.fromkeys(p for _, t in runs for p in t))
    grand = defaultdict(lambda: [0.0, 0])
    with_full = defaultdict(lambda: [0.0, 0.0])  # policy -> [its sum, full's sum] over runs that have both
    print("| run | " + " | ".join(policies) + " |\n|---|" + "---|" * len(policies))
    for f, t in runs:
        full = t.get("full", [0.0, 0])[0]
        cells = []
        for p in policies:
            if p not in t:
                cells.append("")
                continue
            s, n = t[p]
            grand[p][0] += s
            grand[p][1] += n
            if full and p != "full":
                with_full[p][0] += s
                with_full[p][1] += full
            cells.append(f"{s:.2f} / {n}" + (f" ({100 * s / full:.1f} %)" if full and p != "full" else ""))
        print(f"| {f.split('/')[-1]} | " + " | ".join(cells) + " |")
    print("| **all** | " + " | ".join(
        f"{grand[p][0]:.2f} / {grand[p][1]}" + (f" ({100 * with_full[p][0] / with_full[p][1]:.1f} % of full)"
                                                 if with_full[p][1] else "") for p in policies) + " |")


if __name__ == "__main__":
    main()
