"""RULER's string-match metrics (arXiv 2404.06654, its eval/synthetic/constants.py): a reference
answer counts as found when it is a substring of the output, case-insensitively; scores are
fractions in [0, 1] rather than RULER's percentages. The output is first cleaned as RULER's
postprocess_pred does (control characters become newlines, then strip)."""
from __future__ import annotations

import re
from typing import Sequence

_CONTROL = re.compile(r"[\x00-\x1f]")


def _clean(output: str) -> str:
    # RULER's postprocess_pred: control characters become newlines, then strip
    return _CONTROL.sub("\n", output).strip().lower()


def string_match_all(output: str, answers: Sequence[str]) -> float:
    """Fraction of the reference answers that occur in the output."""
    if not answers:
        raise ValueError("no reference answers")
    out = _clean(output)
    return sum(a.lower() in out for a in answers) / len(answers)


def string_match_part(output: str, answers: Sequence[str]) -> float:
    """1.0 when any reference answer occurs in the output, else 0.0."""
    if not answers:
        raise ValueError("no reference answers")
    out = _clean(output)
    return float(any(a.lower() in out for a in answers))


# RULER scores every synthetic family with string_match_all except QA (part).
METRIC = {"niah_single": string_match_all, "niah_multikey": string_match_all,
          "niah_multivalue": string_match_all, "vt": string_match_all, "cwe": string_match_all,
          "fwe": string_match_all, "qa": string_match_part}


def score(task, output: str) -> float:
    """The task's RULER metric on one output, in [0, 1]."""
    return METRIC.get(task.name, string_match_all)(output, task.answers)


def baseline_policy(results: dict) -> str:
    """The full-attention policy of a run_suite result: the first with no keyword arguments, else
    the first. (Here, not in plots.py: the tables need it without importing matplotlib, which
    segfaulted after llama_cpp on the GPU machine.)"""
    pols = results["config"]["policies"]
    return next((k for k, v in pols.items() if not v), next(iter(pols)))
