"""Accuracy-against-speed evaluation: RULER-style tasks, scoring, a suite runner and plots.

    python -m pylazy.eval.runner --backend llama_cpp --lengths 1024 --quick
"""
from .scoring import score, string_match_all, string_match_part
from .tasks import FAMILIES, Task, make_task, make_tasks

__all__ = ["FAMILIES", "Task", "make_task", "make_tasks", "score", "string_match_all",
           "string_match_part"]
