"""The token loop, outside any class: ``generate_step`` (after mlx-lm's) and what it needs.

    cache = ContextCache(ctx)                       # a Context and the tokens it holds
    logits = prefill(cache, prompt, lazy=LazyPrefill(), swa=model.swa_layers())
    stats = StepStats()
    for token, logits in generate_step(cache, logits[-1], Greedy(), recycle=Recycle(k=256),
                                       stats=stats):
        ...                                         # break when done
    stats.as_dict()                                 # full / recycled steps, query similarity

``generate_step`` yields (token, the logits it was drawn from) and evaluates a token only
when the next one is asked for, so the last token of a generation is never evaluated (as in
llama-cpp-python). Each decode step's kind (full or recycled, similarity or not) comes from
the stride policy of ``recycle`` (pylazy.policy); the engine runs what it is told.
``pylazy.Llama`` (completions, ``generate``, ``perplexity``) and ``pylazy bench`` run this loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple, Union

import numpy as np

from .engine import RecycleConfig, RecycleMode
from .policy import LazyPrefill, Recycle, ReselectSchedule, StepKind, StreamingWindow, make_stride_policy
from .reuse import FreshPrefill, aligned_step, lazy_settings, settings_key

RecyclePolicy = Union[None, Recycle, StreamingWindow]
StoppingCriteria = Callable[[np.ndarray, np.ndarray], bool]


class TokenSampler(Protocol):
    """What generate_step draws tokens with (pylazy.sampling.Sampler, Greedy, Forced)."""

    def sample(self, logits: np.ndarray, history: Sequence[int], n_prompt: int = 0) -> int: ...


class Greedy:
    """The most likely token (the first of equal ones, as numpy's argmax)."""

    def sample(self, logits: np.ndarray, history: Sequence[int], n_prompt: int = 0) -> int:
        return int(np.argmax(logits))


class Forced:
    """Teacher forcing: "draws" the given tokens in order, then asks ``then`` (if any)."""

    def __init__(self, tokens: Sequence[int], then: Optional[TokenSampler] = None):
        self._next = iter(tokens)
        self._then = then

    def sample(self, logits: np.ndarray, history: Sequence[int], n_prompt: int = 0) -> int:
        token = next(self._next, None)
        if token is None:
            if self._then is None:
                raise RuntimeError("Forced ran out of tokens")
            return self._then.sample(logits, history, n_prompt)
        return int(token)


class ContextCache:
    """A Context and what it holds: the evaluated tokens, the logits after the last one
    (mlx-lm's prompt cache) and how often decode re-selects after its lazy prefill.
    Whoever evaluates into the context keeps these true."""

    def __init__(self, ctx: Any):
        self.ctx = ctx
        self.tokens: List[int] = []
        self.last_logits: Optional[np.ndarray] = None   # float32 [n_vocab]
        self.reselect_every = 0   # LazyPrefill.reselect of the prefill that built the cache
        self.fresh: Optional[FreshPrefill] = None   # the last prefill from empty (pylazy.reuse)

    def reset(self) -> None:
        self.ctx.reset()
        self.tokens = []
        self.last_logits = None
        self.reselect_every = 0
        self.fresh = None

    def settings_key(self) -> tuple:
        """The lazy settings the cache was prefilled under (pylazy.reuse.settings_key)."""
        ctx = self.ctx
        return settings_key(ctx.lazy_schedule, ctx.lazy_pool, ctx.lazy_window, self.reselect_every)

    def truncate(self, n: int) -> None:
        """Keep the first n tokens (full attention only); last_logits is then the caller's."""
        self.ctx.truncate(n)
        del self.tokens[n:]


def prefill(cache: ContextCache, tokens: List[int], lazy: Optional[LazyPrefill], *,
            swa: Sequence[bool], n_batch: int, all_logits: bool = False,
            progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
    """Evaluate tokens after the cache; logits [len(tokens) if all_logits else 1, n_vocab].

    On an empty cache the context takes the lazy schedule asked for (None: full attention;
    pruning layers moved off sliding-window layers, see snap_to_global_layers). A lazy
    prefill runs the whole prompt at once (pruning is scored by its last token); full
    attention goes in chunks of n_batch (rounded to whole n_ubatch pieces: pylazy.reuse) so
    `progress(done, total)` can report. Tokens after an existing cache run through the schedule
    the cache was built with. A prefill from an empty cache is recorded as cache.fresh.
    """
    ctx = cache.ctx
    from_empty = ctx.n_past == 0
    if from_empty:
        schedule, pool, window, reselect = lazy_settings(lazy, swa)
        if (schedule, pool, window) != (ctx.lazy_schedule, ctx.lazy_pool, ctx.lazy_window):
            ctx.set_lazy(schedule, pool, window)
        cache.reselect_every = reselect
    step = len(tokens) if ctx.lazy_schedule else aligned_step(n_batch, ctx.n_ubatch)
    rows = []
    for start in range(0, len(tokens), step):
        chunk = tokens[start:start + step]
        rows.append(ctx.eval(chunk, all_logits=all_logits))
        cache.tokens.extend(chunk)
        if progress is not None:
            progress(start + len(chunk), len(tokens))
    logits = np.concatenate(rows) if all_logits else rows[-1]
    cache.last_logits = logits[-1].copy()
    if from_empty:
        cache.fresh = FreshPrefill(list(tokens), cache.last_logits.copy(), cache.settings_key())
    return logits


# ----- policy -> engine ----------------------------------------------------------------------
def recycle_config(recycle: RecyclePolicy) -> RecycleConfig:
    """The engine's recycled-cache settings for a decode policy (the one translation)."""
    if recycle is None:
        return RecycleConfig()
    if isinstance(recycle, StreamingWindow):
        return RecycleConfig(RecycleMode.WINDOW, recycle.sinks + recycle.window, recycle.stride, recycle.sinks)
    return RecycleConfig(RecycleMode.TOPK, recycle.k, recycle.stride, 0, recycle.pool, float(recycle.share))


def configure_recycle(ctx: Any, recycle: RecyclePolicy) -> None:
    """Give the context the recycled cache `recycle` asks for (only when it changes: a new
    configuration drops the recycled cache, and the next step must be a full one)."""
    want = recycle_config(recycle)
    if want != ctx.recycle_config:
        ctx.set_recycle(*want)


# ----- stats ---------------------------------------------------------------------------------
@dataclass
class StepStats:
    """What one generate_step run did; filled as it goes, final once the generator is closed."""

    full_steps: int = 0          # decode steps the engine ran with full attention
    recycled_steps: int = 0      # ... and over the recycled cache
    recycle_k: Optional[int] = None
    similarities: List[float] = field(default_factory=list)   # mean query similarity per check

    @property
    def mean_query_similarity(self) -> Optional[float]:
        return float(np.mean(self.similarities)) if self.similarities else None

    def as_dict(self) -> Dict[str, Any]:
        return {"full_steps": self.full_steps, "recycled_steps": self.recycled_steps,
                "recycle_k": self.recycle_k, "mean_query_similarity": self.mean_query_similarity}


def prefill_stats(layer_stats: Dict[str, list], now: Dict[str, list], n_prompt: int,
                  lazy_schedule: list) -> Dict[str, Any]:
    """Counters of a prefill (`layer_stats` right after it, over n_prompt tokens) and of the
    context `now`: token-layers computed, revivals since, KV memory."""
    computed = layer_stats["cells"]
    return {
        "lazy_schedule": list(lazy_schedule),
        "tokens_computed_per_layer": computed,
        "computed_fraction": sum(computed) / (max(1, n_prompt) * len(computed)),
        "revived_tokens": int(sum(now["revived"])),
        "revived_per_layer": now["revived"],
        "kv_bytes": int(sum(now["kv_bytes"])),
        "kv_bytes_per_layer": now["kv_bytes"],
    }


# ----- the loop ------------------------------------------------------------------------------
def decode_step(cache: ContextCache, token: int, kind: StepKind,
                similarity: bool) -> Tuple[np.ndarray, Optional[float]]:
    """Evaluate one generated token as `kind` says; (its logits, the mean query similarity or None).

    The similarity is the mean over the layers where the engine computed it, and only when a
    recycled step ran and was asked for it.
    """
    logits, ran_recycled, sims = cache.ctx.decode(token, kind, similarity=similarity)
    mean = None
    if ran_recycled and sims is not None and np.isfinite(sims).any():
        mean = float(np.nanmean(sims))
    cache.tokens.append(token)
    cache.last_logits = logits
    return logits, mean


def generate_step(cache: ContextCache, logits: Optional[np.ndarray], sampler: TokenSampler, *,
                  recycle: RecyclePolicy = None, history: Optional[List[int]] = None,
                  n_prompt: Optional[int] = None, stopping_criteria: Optional[StoppingCriteria] = None,
                  stats: Optional[StepStats] = None) -> Iterator[Tuple[int, np.ndarray]]:
    """Yield (token, the logits it was drawn from); evaluate it when asked for the next.

    logits: after the last token in the cache (None only for a sampler that needs none).
    history: what the sampler's penalties see (default: the cache's tokens), extended with
        each yielded token; n_prompt: where generated tokens start in it (default: its length).
    Ends when stopping_criteria(evaluated ids, logits) says so (its token is dropped).
    """
    history = list(cache.tokens) if history is None else history
    n_prompt = len(history) if n_prompt is None else n_prompt
    stats = StepStats() if stats is None else stats
    policy = make_stride_policy(recycle)
    policy.reset()
    configure_recycle(cache.ctx, recycle)
    config = cache.ctx.recycle_config
    stats.recycle_k = config.k if config.mode != RecycleMode.OFF else None
    start = cache.ctx.recycle_stats()
    reselect = ReselectSchedule(cache.reselect_every if cache.ctx.lazy_schedule else 0)
    try:
        while True:
            token = sampler.sample(logits, history, n_prompt)
            if stopping_criteria is not None and stopping_criteria(
                    np.asarray(cache.tokens, dtype=np.intc), logits.copy()):
                return
            yield token, logits
            history.append(token)
            step = policy.next_step()   # the step's kind, decided here once
            kind = reselect.kind(step.kind)
            logits, similarity = decode_step(cache, token, kind, step.check_similarity)
            if similarity is not None:
                stats.similarities.append(similarity)
            if step.check_similarity:
                policy.observe(similarity)
    finally:
        now = cache.ctx.recycle_stats()
        stats.full_steps = now["full_steps"] - start["full_steps"]
        stats.recycled_steps = now["recycled_steps"] - start["recycled_steps"]
