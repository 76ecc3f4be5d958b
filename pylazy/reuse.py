"""Prefix reuse that cannot change a result: which cache rows a new prompt may keep.

ggml's kernels round a row differently by the shape of its batch (tiled flash attention for many
queries, quantized matmul paths, repacked gemm vs gemv), so a token evaluated alone, as
llama-cpp-python re-evaluates a reused prompt's last token, gets other logits than inside its
prefill chunk, and greedy text can diverge. The rule here: a prefill from an empty cache goes in
whole n_ubatch chunks from position 0 (``aligned_step``), and a later prompt keeps only rows a
fresh prefill of it would compute bit for bit (``reusable_rows``), so every call returns what it
returns on a fresh context.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from .policy import LazyPrefill, snap_to_global_layers


@dataclass
class FreshPrefill:
    """The last prefill from an empty cache (or continued as one): cache rows [0, len(tokens))
    are what a fresh context computes for `tokens` under the lazy settings `key`; `logits` are
    its last row's."""

    tokens: List[int]
    logits: np.ndarray
    key: Tuple[Any, ...]


def lazy_settings(lazy: Optional[LazyPrefill], swa: Sequence[bool]) -> Tuple[list, int, int, int]:
    """(schedule, pool, window, reselect) a prefill from an empty cache sets for `lazy`: pruning
    layers moved off sliding-window layers (snap_to_global_layers); all neutral without pruning."""
    schedule = snap_to_global_layers(lazy.resolve(len(swa)) if lazy is not None else [], swa)
    if lazy is None or not schedule:
        return schedule, 0, 1, 0
    return schedule, lazy.pool, lazy.window, lazy.reselect


def settings_key(schedule: Sequence, pool: int, window: int, reselect: int) -> Tuple[Any, ...]:
    return tuple(tuple(x) for x in schedule), int(pool), int(window), int(reselect)


def aligned_step(n_batch: int, n_ubatch: int) -> int:
    """Prefill chunk size: whole n_ubatch pieces (the engine cuts each chunk into n_ubatch rows from
    where it starts), so every chunk boundary of a prefill from an empty cache is a multiple of
    n_ubatch, the points a reused prefix may end at."""
    return max(n_ubatch, n_batch // n_ubatch * n_ubatch)


def reusable_rows(fresh: Optional[FreshPrefill], tokens: Sequence[int], n_past: int, prompt: List[int],
                  key: Tuple[Any, ...], n_ubatch: int) -> int:
    """How many leading rows of a cache holding `tokens` (n_past of them evaluated) a call with
    `prompt` under lazy settings `key` may keep, its result unchanged from a fresh context's.

    A row is reusable only inside a whole n_ubatch chunk of the last fresh prefill whose tokens the
    prompt shares (decoded rows never: they were one-row batches); the partial last chunk only by
    the same prompt again, which keeps all of it with that prefill's logits. A lazy prefill prunes
    by the whole prompt's last token: only the same prompt, with nothing evaluated after it.
    """
    if fresh is None or fresh.key != key or list(tokens[:len(fresh.tokens)]) != fresh.tokens:
        return 0
    pruning = bool(key[0])
    if prompt == fresh.tokens:
        return len(prompt) if not pruning or n_past == len(prompt) else 0
    if pruning:
        return 0
    common = 0
    for a, b in zip(fresh.tokens, prompt):
        if a != b:
            break
        common += 1
    return min(common, len(prompt) - 1) // n_ubatch * n_ubatch   # at least one token evaluated, for its logits
