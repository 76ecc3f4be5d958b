"""How `pylazy tune` decides: paired comparison with full attention, and the held-out cascade.

With a few dozen prompts the sweep's best-looking setting is partly the luckiest one (the
winner's curse): on SmolLM2 at 2K, `lazy 45/30/20` scored 1.11 x full on 8 sweep prompts and
0.85 x full on 16 held-out ones. Two things resist that here:

* **Paired lower bound.** Every setting runs on the same prompts as full attention, so the
  per-prompt differences d_i = score(setting) - score(full) measure what the setting loses
  without the prompts' own spread. A setting *holds* when the lower bound
  1 + (mean(d) - z * sd(d) / sqrt(n)) / mean(full) is >= the budget: a setting that agrees with
  full on every prompt holds; one that wins some prompts and loses others by as much does not
  until enough prompts say the losses are rare.
* **Held-out cascade.** The fastest few sweep-passers (relative accuracy >= budget on the
  sweep's prompts: a cheap screen) run again with full attention on held-out prompts (another
  seed), in one suite. In speed order, the first whose held-out relative accuracy meets the
  budget *and* whose paired bound over sweep + held-out prompts holds is chosen; when none does
  the choice is full attention (``fallback``), said in the output and the profile.

The final check (pylazy/tune.py, a third seed) takes no part in the choice: it only reports.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

PromptKey = Tuple[str, int, Optional[float], int]   # (task spec, context length, depth, seed)


def prompt_scores(*results: dict) -> Dict[str, Dict[PromptKey, float]]:
    """policy name -> {prompt: score} over run_suite results (later results add prompts)."""
    out: Dict[str, Dict[PromptKey, float]] = defaultdict(dict)
    for res in results:
        for rec in res["records"]:
            for inst in rec["instances"]:
                out[rec["policy"]][(rec["task"], rec["context_len"], inst["depth"], inst["seed"])] = inst["score"]
    return out


def paired(full: Dict[PromptKey, float], cand: Dict[PromptKey, float], z: float) -> dict:
    """The setting against full attention on the prompts both ran: accuracies, relative accuracy,
    its paired lower bound (module doc), and the prompts each one won."""
    keys = [k for k in full if k in cand]
    if not keys:
        raise ValueError("no prompts shared with full attention")
    n = len(keys)
    f = [full[k] for k in keys]
    d = [cand[k] - full[k] for k in keys]
    mean_f, mean_d = sum(f) / n, sum(d) / n
    if mean_f <= 0:
        raise ValueError("full attention scored 0 on these prompts: a budget relative to it says nothing "
                         "(use other --tasks or a shorter --length)")
    sd = math.sqrt(sum((x - mean_d) ** 2 for x in d) / (n - 1)) if n > 1 else 0.0
    return {"prompts": n, "full_accuracy": mean_f, "accuracy": mean_f + mean_d,
            "relative_accuracy": 1.0 + mean_d / mean_f,
            "relative_lower": 1.0 + (mean_d - z * sd / math.sqrt(n)) / mean_f,
            "wins": sum(x > 1e-12 for x in d), "losses": sum(x < -1e-12 for x in d)}


def holds(stats: dict, min_accuracy: float) -> bool:
    return stats["relative_lower"] >= min_accuracy - 1e-9


def add_paired(rows: List[dict], scores: Dict[str, Dict[PromptKey, float]], z: float,
               min_accuracy: float, full: str = "full") -> None:
    """Each row gets its paired bound against full on the sweep's prompts (relative_lower, wins,
    losses, holds)."""
    for r in rows:
        st = paired(scores[full], scores[r["name"]], z)
        r.update(relative_lower=st["relative_lower"], wins=st["wins"], losses=st["losses"],
                 holds=r["name"] == full or holds(st, min_accuracy))


def shortlist(rows: List[dict], n: int, full: str = "full") -> List[dict]:
    """The n fastest sweep-passers faster than full attention (rows marked by tune.choose)."""
    base = next(r for r in rows if r["name"] == full)
    passing = [r for r in rows if r["passes"] and r["name"] != full and r["est_seconds"] < base["est_seconds"]]
    return sorted(passing, key=lambda r: (r["est_seconds"], r["name"]))[:n]


def cascade(names: Sequence[str], sweep_scores: dict, held_scores: dict, z: float,
            min_accuracy: float, full: str = "full") -> Tuple[str, List[dict]]:
    """The first of names (fastest first) that meets the budget on the held-out prompts and whose
    paired bound over sweep + held-out prompts holds; full when none. Returns (chosen, one
    verification record per name, in order, each with accepted and why)."""
    pooled_full = {**sweep_scores[full], **held_scores[full]}
    chosen, records = full, []
    for name in names:
        held = paired(held_scores[full], held_scores[name], z)
        pooled = paired(pooled_full, {**sweep_scores[name], **held_scores[name]}, z)
        held_ok = held["relative_accuracy"] >= min_accuracy - 1e-9
        pooled_ok = holds(pooled, min_accuracy)
        why = ([f"held out {held['relative_accuracy']:.3f} x full < {min_accuracy:g}"] if not held_ok else []) \
            + ([f"pooled paired bound {pooled['relative_lower']:.3f} < {min_accuracy:g}"] if not pooled_ok else [])
        rec = {"name": name, "held_out": _rounded(held), "pooled": _rounded(pooled),
               "passes": held_ok and pooled_ok, "accepted": False,
               "why": "; ".join(why) or "meets the budget held out and its pooled paired bound holds"}
        if rec["passes"] and chosen == full:
            chosen, rec["accepted"] = name, True
        elif rec["passes"]:
            rec["why"] += f" (not chosen: {chosen} is faster)"
        records.append(rec)
    return chosen, records


def _rounded(stats: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()}
