"""Token sampling and stop strings for pylazy.Llama, in numpy.

Parameters mean what they mean in llama-cpp-python 0.3.36, whose ``Llama._init_sampler``
builds this llama.cpp chain (min_keep = 1 everywhere):

    logits_processors -> penalties -> top_k -> typical -> top_p -> min_p -> temperature -> draw

so the filters see logits *before* temperature, and temperature only reshapes what is left.
``temperature == 0`` is greedy: processors and penalties, then argmax (first index on ties,
as llama.cpp's greedy sampler). The draw uses a numpy Generator, so a seed reproduces our own
sequence, not llama.cpp's mt19937 stream; the distribution drawn from is the same.

Every filter takes logits (1-D, ``-inf`` = already dropped) and returns a new array with the
dropped tokens set to ``-inf``, so a test can read the kept set as ``np.isfinite(out)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

LogitsProcessor = Callable[[np.ndarray, np.ndarray], np.ndarray]

# llama.cpp's LLAMA_DEFAULT_SEED: "pick a random seed". -1 is the older llama-cpp-python spelling.
_RANDOM_SEEDS = (-1, 0xFFFFFFFF)


@dataclass
class SamplingParams:
    """Sampling settings; defaults are llama-cpp-python's ``create_completion`` defaults.

    temperature: 0 = greedy; > 0 divides the logits left after the filters.
    top_k: keep the k largest logits; 0 = disabled.
    top_p: nucleus, keep the smallest prefix (by probability) whose mass reaches top_p; 1 = off.
    min_p: keep tokens with p >= min_p * p_max; 0 = off.
    typical_p: locally typical sampling mass; 1 = off.
    repeat_penalty: tokens seen in the penalty window get logit / r if > 0, logit * r if <= 0.
    frequency_penalty, presence_penalty: subtracted, count * f + (count > 0) * p.
    penalty_last_n: how many of the latest history tokens the penalties look at; 0 = off.
    seed: None (or -1 / 0xFFFFFFFF as in llama.cpp) = fresh entropy; else reproducible.
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_last_n: int = 64
    seed: Optional[int] = None

    def validate(self) -> "SamplingParams":
        """Raise TypeError/ValueError naming the field and its allowed range; return self."""
        for name in ("temperature", "top_p", "min_p", "typical_p", "repeat_penalty",
                     "frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Real):
                raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")
        if self.temperature < 0:
            # llama-cpp-python reads temp < 0 as "draw from the unfiltered softmax"; we ask
            # for that spelled out instead of a sign trick.
            raise ValueError(
                f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}; for plain "
                "sampling use temperature=1.0, top_k=0, top_p=1.0, min_p=0.0")
        for name in ("top_p", "min_p", "typical_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if self.repeat_penalty <= 0:
            raise ValueError(
                f"repeat_penalty must be > 0 (1.0 = off), got {self.repeat_penalty!r}")
        for name in ("top_k", "penalty_last_n"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Integral):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 0:
                raise ValueError(f"{name} must be an int >= 0 (0 = disabled), got {value!r}")
        if self.seed is not None:
            if isinstance(self.seed, bool) or not isinstance(self.seed, Integral):
                raise TypeError(f"seed must be an int or None, got {type(self.seed).__name__}")
            if self.seed < 0 and self.seed not in _RANDOM_SEEDS:
                raise ValueError(f"seed must be None, -1 or an int >= 0, got {self.seed!r}")
        return self


def _as_logits(logits: np.ndarray) -> np.ndarray:
    out = np.array(logits, dtype=np.float64, copy=True)
    if out.ndim != 1:
        raise ValueError(f"logits must be 1-D [n_vocab], got shape {out.shape}")
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities over the finite logits (float64); ``-inf`` entries get exactly 0."""
    x = np.asarray(logits, dtype=np.float64)
    top = np.max(x) if x.size else -np.inf
    if not np.isfinite(top):
        raise ValueError("softmax of logits with no finite entry")
    alive = x > -np.inf
    e = np.zeros_like(x)
    e[alive] = np.exp(x[alive] - top)  # exp(-inf) is slow in numpy; skip the dropped ones
    return e / e.sum()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities of the raw logits, as llama-cpp-python's ``logits_to_logprobs``.

    llama-cpp-python reports ``logprobs`` from the model's raw logits (no penalties, filters
    or temperature), so pylazy.Llama should use this, not ``Sampler.probs``, for them.
    """
    x = np.asarray(logits, dtype=np.float32)
    top = np.max(x)
    shifted = x - (top if np.isfinite(top) else np.float32(0))
    with np.errstate(divide="ignore"):
        return shifted - np.log(np.sum(np.exp(shifted)))


def apply_penalties(logits: np.ndarray, history: Sequence[int], repeat_penalty: float = 1.0,
                    frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                    penalty_last_n: int = 64) -> np.ndarray:
    """llama.cpp's penalties over the last ``penalty_last_n`` tokens of ``history``.

    For each token id seen c > 0 times in that window: logit * r if logit <= 0 else logit / r,
    then minus c * frequency_penalty + presence_penalty.
    """
    out = _as_logits(logits)
    if penalty_last_n <= 0 or (repeat_penalty == 1.0 and frequency_penalty == 0.0
                               and presence_penalty == 0.0):
        return out
    window = np.asarray(history, dtype=np.int64)[-penalty_last_n:]
    if window.size == 0:
        return out
    if window.min() < 0 or window.max() >= out.size:
        raise ValueError(f"history holds a token id outside [0, {out.size})")
    seen, counts = np.unique(window, return_counts=True)  # window-sized, not vocab-sized
    x = out[seen]
    x = np.where(x <= 0, x * repeat_penalty, x / repeat_penalty)
    out[seen] = x - counts * frequency_penalty - presence_penalty
    return out


def _top_k_ids(x: np.ndarray, k: int) -> np.ndarray:
    """Ascending ids of the k largest finite values of x (all finite ones if k <= 0)."""
    alive = x > -np.inf
    n_alive = int(np.count_nonzero(alive))
    if k <= 0 or k >= n_alive:
        return np.flatnonzero(alive)
    # O(n_vocab) partition, not a sort: this runs every decode step on the whole vocab.
    kth = x[np.argpartition(x, x.size - k)[x.size - k]]
    above = np.flatnonzero(x > kth)
    ties = np.flatnonzero(x == kth)[: k - above.size]
    return np.sort(np.concatenate([above, ties]))


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits; k <= 0 keeps all. Ties at the cut go to the lower id."""
    x = _as_logits(logits)
    ids = _top_k_ids(x, k)
    out = np.full_like(x, -np.inf)
    out[ids] = x[ids]
    return out


def _by_logit(x: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """ids reordered by x, largest first, ties by lower id."""
    ids = np.sort(ids)
    return ids[np.argsort(-x[ids], kind="stable")]


def _alive_by_logit(x: np.ndarray) -> np.ndarray:
    return _by_logit(x, np.flatnonzero(x > -np.inf))


# top_p over a whole vocabulary: sort only this many best first, as llama.cpp does, and
# sort everything only when their mass falls short of p.
_TOP_P_PARTIAL = 256


def top_p_filter(logits: np.ndarray, p: float, min_keep: int = 1) -> np.ndarray:
    """Keep the most probable tokens until their mass reaches p (>= p, as llama.cpp)."""
    out = _as_logits(logits)
    if p >= 1.0:
        return out
    alive = np.flatnonzero(out > -np.inf)
    top = np.max(out)
    total = np.sum(np.exp(out[alive] - top))
    order = alive
    if alive.size > 4 * _TOP_P_PARTIAL:
        part = np.argpartition(-out[alive], _TOP_P_PARTIAL)[:_TOP_P_PARTIAL]
        order = _by_logit(out, alive[part])
        if np.sum(np.exp(out[order] - top)) / total < p:
            order = alive
    if order is alive:
        order = _by_logit(out, alive)
    cum = np.cumsum(np.exp(out[order] - top) / total)
    reached = np.flatnonzero((cum >= p) & (np.arange(1, order.size + 1) >= min_keep))
    if not reached.size:
        return out
    keep = order[: int(reached[0]) + 1]
    kept = out[keep]
    out[:] = -np.inf
    out[keep] = kept
    return out


def min_p_filter(logits: np.ndarray, p: float, min_keep: int = 1) -> np.ndarray:
    """Keep tokens with probability >= p * (largest probability); p <= 0 keeps all."""
    out = _as_logits(logits)
    if p <= 0.0:
        return out
    floor = np.max(out) + math.log(p)
    keep = out >= floor
    if np.count_nonzero(keep) < min_keep:
        keep[_alive_by_logit(out)[:min_keep]] = True
    out[~keep] = -np.inf
    return out


def typical_filter(logits: np.ndarray, p: float, min_keep: int = 1) -> np.ndarray:
    """Locally typical sampling (arXiv 2202.00666) as llama.cpp does it.

    Rank tokens by |-log p_i - H| (H = entropy) and keep the first ones whose mass
    exceeds p (strictly, as llama.cpp); p >= 1 keeps all.
    """
    out = _as_logits(logits)
    if p >= 1.0:
        return out
    order = _alive_by_logit(out)
    probs = softmax(out[order])
    with np.errstate(divide="ignore", invalid="ignore"):
        logp = np.log(probs)
        entropy = -np.sum(np.where(probs > 0, probs * logp, 0.0))
        shifted = np.abs(-logp - entropy)
    rank = np.argsort(shifted, kind="stable")
    cum = np.cumsum(probs[rank])
    past = np.flatnonzero((cum > p) & (np.arange(1, rank.size + 1) >= min_keep))
    n_keep = int(past[0]) + 1 if past.size else rank.size
    out[order[rank[n_keep:]]] = -np.inf
    return out


def _as_processor_list(processors) -> List[LogitsProcessor]:
    if processors is None:
        return []
    if callable(processors):
        return [processors]
    processors = list(processors)
    for fn in processors:
        if not callable(fn):
            raise TypeError(f"logits processor {fn!r} is not callable")
    return processors


def _keep_finite(ids: np.ndarray, x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    alive = x > -np.inf
    return ids[alive], x[alive]


class Sampler:
    """Picks the next token from one row of logits; holds the seeded random stream.

    ``history`` is every token id the model has seen so far (prompt + generated), which is
    what llama-cpp-python gives logits processors as ``input_ids``. Penalties look only at
    ``history[n_prompt:]``: llama-cpp-python builds its sampler chain when generation starts
    and feeds it only sampled tokens, so pass ``n_prompt=len(prompt_tokens)`` to match it
    (the default 0 also penalises prompt tokens).
    """

    def __init__(self, params: Optional[SamplingParams] = None,
                 logits_processors: Union[None, LogitsProcessor,
                                          Iterable[LogitsProcessor]] = None):
        self.params = (params if params is not None else SamplingParams()).validate()
        self.logits_processors = _as_processor_list(logits_processors)
        self.reset()

    def reset(self) -> None:
        """Restart the random stream (same seed -> same draws again)."""
        seed = self.params.seed
        self._rng = np.random.default_rng(None if seed in (None, *_RANDOM_SEEDS) else seed)

    def _history_ids(self, history: Sequence[int]) -> np.ndarray:
        """history as an int32 array for logits processors (llama-cpp-python's input_ids), kept
        between steps and extended by the tokens appended since, not rebuilt every step."""
        buf, n = getattr(self, "_ids", (np.empty(0, dtype=np.intc), 0))
        size = len(history)
        if size < n or (n and history[n - 1] != buf[n - 1]) or (n and history[0] != buf[0]):
            n = 0   # another history: start over
        if size > buf.size:
            grown = np.empty(max(size, 2 * buf.size), dtype=np.intc)
            grown[:n] = buf[:n]
            buf = grown
        buf[n:size] = np.asarray(history[n:size], dtype=np.intc)
        self._ids = (buf, size)
        return buf[:size]

    def _penalized(self, logits: np.ndarray, history: Sequence[int],
                   n_prompt: int) -> np.ndarray:
        """Full-vocab logits after logits processors and penalties."""
        x = _as_logits(logits)
        if np.isnan(x).any():
            raise ValueError("logits contain NaN")
        if self.logits_processors:
            ids = self._history_ids(history)
            for fn in self.logits_processors:
                # llama-cpp-python hands processors float32 scores and takes the return value.
                scores = np.asarray(fn(ids, x.astype(np.float32)))
                if scores.shape != x.shape:
                    raise ValueError(f"logits processor {fn!r} returned shape {scores.shape}, "
                                     f"expected {x.shape}")
                x = scores.astype(np.float64)
        p = self.params
        if p.penalty_last_n > 0 and (p.repeat_penalty != 1.0 or p.frequency_penalty != 0.0
                                     or p.presence_penalty != 0.0):
            # only the window the penalties read: converting a 128K-token history every step cost
            # ~5 ms a token (H200 whole-request bench)
            recent = history[max(n_prompt, len(history) - p.penalty_last_n):]
            x = apply_penalties(x, np.asarray(recent, dtype=np.int64), p.repeat_penalty,
                                p.frequency_penalty, p.presence_penalty, p.penalty_last_n)
        if not np.max(x) > -np.inf:
            raise ValueError("no token left to pick: every logit is -inf")
        return x

    def _candidates(self, x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(ids, logits / temperature) of the tokens the filters keep (temperature > 0).

        After top_k the filters run on the short candidate list, as llama.cpp does: same
        functions, same result as on the masked full vocab, a fraction of the time.
        """
        p = self.params
        ids = _top_k_ids(x, p.top_k)
        c = x[ids]
        c = typical_filter(c, p.typical_p)
        c = top_p_filter(c, p.top_p)
        ids, c = _keep_finite(ids, min_p_filter(c, p.min_p))
        return ids, c / p.temperature

    def processed_logits(self, logits: np.ndarray, history: Sequence[int],
                         n_prompt: int = 0) -> np.ndarray:
        """[n_vocab] logits after processors, penalties and (temperature > 0) the four
        filters and temperature; dropped tokens are -inf."""
        x = self._penalized(logits, history, n_prompt)
        if self.params.temperature == 0:
            return x
        ids, c = self._candidates(x)
        out = np.full_like(x, -np.inf)
        out[ids] = c
        return out

    def probs(self, logits: np.ndarray, history: Sequence[int], n_prompt: int = 0) -> np.ndarray:
        """The distribution ``sample`` draws from, [n_vocab] float64, 0 on dropped tokens.

        Greedy (temperature 0) gives a one-hot vector on the argmax.
        """
        x = self._penalized(logits, history, n_prompt)
        out = np.zeros_like(x)
        if self.params.temperature == 0:
            out[int(np.argmax(x))] = 1.0
        else:
            ids, c = self._candidates(x)
            out[ids] = softmax(c)
        return out

    def sample(self, logits: np.ndarray, history: Sequence[int], n_prompt: int = 0) -> int:
        """Next token id. Greedy draws no random number (as llama.cpp's greedy sampler)."""
        x = self._penalized(logits, history, n_prompt)
        if self.params.temperature == 0:
            return int(np.argmax(x))
        ids, c = self._candidates(x)
        cum = np.cumsum(softmax(c))
        # first candidate whose running mass reaches u * total, as llama.cpp's dist sampler
        i = int(np.searchsorted(cum, self._rng.random() * cum[-1], side="left"))
        return int(ids[min(i, ids.size - 1)])


def _normalize_stops(stops: Union[None, str, Sequence[str]]) -> List[str]:
    if stops is None:
        return []
    if isinstance(stops, str):
        stops = [stops]
    out = []
    for s in stops:
        if not isinstance(s, str):
            raise TypeError(f"stop strings must be str, got {type(s).__name__}")
        # llama-cpp-python would "find" an empty stop at once and return empty text;
        # we read it as no stop at all.
        if s:
            out.append(s)
    return out


class StopMatcher:
    """Streaming stop-string cut, as llama-cpp-python's completion.

    The returned text ends right before the earliest stop string found (the stop itself is
    not returned; the caller reports finish_reason "stop"). While streaming, the longest tail
    that could still grow into a stop string is held back, so no part of a stop is emitted.
    Works on ``str``: the caller decodes bytes and holds back incomplete UTF-8 itself.
    """

    def __init__(self, stops: Union[None, str, Sequence[str]]):
        self.stops = _normalize_stops(stops)
        self._held = ""
        self.stopped = False
        self.matched: Optional[str] = None  # the stop string that ended the text

    def _holdback(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def feed(self, text: str) -> Tuple[str, bool]:
        """Add generated text; return (text safe to emit now, whether a stop was hit)."""
        if self.stopped:
            return "", True
        buf = self._held + text
        hits = [(buf.find(s), s) for s in self.stops]
        hits = [h for h in hits if h[0] >= 0]
        if hits:
            cut, self.matched = min(hits, key=lambda h: h[0])
            self._held = ""
            self.stopped = True
            return buf[:cut], True
        n = self._holdback(buf)
        self._held = buf[len(buf) - n:] if n else ""
        return buf[:len(buf) - n], False

    def flush(self) -> str:
        """At the end of generation: the held-back tail (it never became a stop)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held
