"""What the engine should do: where lazy prefill prunes, when decode refreshes attention.

Pure Python; the engine asks these objects and runs what they say.

- ``LazyPrefill``: pruning layers and keep ratios (LazyLLM, arXiv 2407.14057).
- ``Recycle`` / ``StreamingWindow``: decode attention settings (recycled attention,
  arXiv 2411.05787; StreamingLLM sinks + window as the baseline).
- ``StridePolicy`` and its implementations: asked once per decode step, full or recycled
  (a ``StepKind``), and whether to return the query similarity for this step;
  ``ReselectSchedule`` turns some full steps after a lazy prefill into re-selecting ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from numbers import Integral, Real
from typing import Any, List, NamedTuple, Optional, Protocol, Sequence, Tuple, Union, runtime_checkable

LayerSpec = Union[int, float]

# Default schedule: prune after 1/4, 1/2, 3/4 of the depth down to 70 %, 50 %, 30 % of the
# prompt. A placeholder from the LazyLLM paper's spirit; to be re-chosen by measurement
# (speed vs. quality on long-context tasks) once the engine runs.
_DEFAULT_LAYERS: Tuple[float, ...] = (0.25, 0.5, 0.75)
# Chosen on SmolLM2 needles (docs/eval/README.md, GPU sweep 2, 90 prompts a policy, pool 8): keeping
# 60/40/25 % found 61 % of the needles (full attention 50 %, 70/50/30 % 56 %, pruning from 20 % depth
# 21 %) while computing 57 % of the token-layers: 1.98x TTFT at 8K on the CPU.
_DEFAULT_KEEP: Tuple[float, ...] = (0.6, 0.4, 0.25)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_pool(pool) -> None:
    _check_int("pool", pool, 0)
    if pool > 64:
        raise ValueError(f"pool must be at most 64, got {pool}")


@dataclass(frozen=True)
class LazyPrefill:
    """Lazy prefill schedule: after layer ``layers[i]`` keep ``keep[i]`` of the prompt.

    layers: layer indices (int, 0-based) or fractions of depth (float in (0, 1)), in
        increasing order; ints and floats may be mixed.
    keep: fractions of the *whole prompt* still alive after each pruning layer, in (0, 1],
        non-increasing, one per layer.
    Both None: the default schedule (0.25, 0.5, 0.75) of depth keeping (0.6, 0.4, 0.25).
    ``LazyPrefill(layers=(), keep=())`` prunes nothing.
    pool: a token's importance becomes the max over the tokens within ``pool`` positions
        of it before the top-k, so the tokens after an attended one are kept with it. 0 is
        the paper's plain top-k; in [0, 64].
    window: a token's importance is its attention from the prompt's last ``window`` tokens
        (mean over them and the heads; SnapKV's observation window) rather than from the
        last token alone (1, as LazyLLM); in [1, 256]. A prompt's last prefill chunk is
        made to hold the whole window.
    reselect: during decode, every ``reselect``-th full step re-selects at each pruning
        layer with the new token's attention and revives what it selects from the aux cache
        (LazyLLM's decode step; 1 = every step, as the paper). Between re-selections every
        stage attends to its last selection plus the tokens generated since, in one graph
        per token, reused from step to step. With ``recycle=`` a due re-selection waits for
        the next refresh step. 0 (default): the prompt's selection holds for the whole answer.
    Defaults pool=16, window=32, reselect=0, chosen on SmolLM2 needles (docs/eval/README.md,
    "whole request"): on 120 GPU prompts at 4K-8K they score 70.5 against full attention's
    57.5, where the paper's rule (window 1, re-selecting every step, pool 8) scored 58 % of
    full on 18 CPU prompts at 2K and decoded at 8.4 tok/s against 59.7; keeping the prompt's
    selection with window 1 and pool 8 scored 61 % of full on the GPU prompts.
    """

    layers: Optional[Tuple[LayerSpec, ...]] = None
    keep: Optional[Tuple[float, ...]] = None
    pool: int = 16
    reselect: int = 0
    window: int = 32

    def __post_init__(self) -> None:
        _check_pool(self.pool)
        _check_int("reselect", self.reselect, 0)
        _check_int("window", self.window, 1)
        if self.window > 256:
            raise ValueError(f"window must be at most 256, got {self.window}")
        layers, keep = self.layers, self.keep
        if layers is None and keep is None:
            layers, keep = _DEFAULT_LAYERS, _DEFAULT_KEEP
        elif layers is None or keep is None:
            raise ValueError("LazyPrefill needs both layers and keep, or neither (defaults)")
        if isinstance(layers, (str, bytes)) or isinstance(keep, (str, bytes)):
            raise TypeError("layers and keep must be sequences of numbers")
        try:
            layers, keep = tuple(layers), tuple(keep)
        except TypeError:
            raise TypeError("layers and keep must be sequences of numbers") from None
        if len(layers) != len(keep):
            raise ValueError(f"layers and keep must have the same length, got "
                             f"{len(layers)} and {len(keep)}")
        for spec in layers:
            if isinstance(spec, bool) or not isinstance(spec, Real):
                raise TypeError(f"a layer must be an int index or a float fraction of depth, "
                                f"got {type(spec).__name__}")
            if isinstance(spec, Integral):
                if spec < 0:
                    raise ValueError(f"layer index must be >= 0, got {spec!r}")
            elif not 0.0 < spec < 1.0:
                raise ValueError(f"a float layer is a fraction of depth in (0, 1), got {spec!r}"
                                 "; pass an int for a layer index")
        # Same kind compared directly; an int vs. a fraction can only be checked in resolve().
        for a, b in zip(layers, layers[1:]):
            if isinstance(a, Integral) == isinstance(b, Integral) and not a < b:
                raise ValueError(f"layers must be increasing, got {a!r} before {b!r}")
        for ratio in keep:
            if isinstance(ratio, bool) or not isinstance(ratio, Real):
                raise TypeError(f"keep ratios must be numbers, got {type(ratio).__name__}")
            if not 0.0 < ratio <= 1.0:
                raise ValueError(f"keep ratios must be in (0, 1], got {ratio!r}")
        for a, b in zip(keep, keep[1:]):
            if b > a:
                raise ValueError(f"keep ratios must be non-increasing (a pruned token does not "
                                 f"come back in prefill), got {a!r} then {b!r}")
        object.__setattr__(self, "layers", tuple(int(x) if isinstance(x, Integral) else float(x)
                                                 for x in layers))
        object.__setattr__(self, "keep", tuple(float(x) for x in keep))

    @classmethod
    def for_model(cls, model_path: str, **overrides: Any) -> "LazyPrefill":
        """The schedule measured best for a registry model's file (models/registry.json: 70/50/30 %
        on Qwen2.5-Coder-0.5B, where 60/40/25 % lost 3.9 points at 8K), else ``LazyPrefill()``;
        ``overrides`` (e.g. pool=8) replace single fields."""
        from .models import registry_lazy
        return cls(**{**(registry_lazy(model_path) or {}), **overrides})

    def resolve(self, n_layer: int) -> List[Tuple[int, float]]:
        """[(l, keep)] for a model of n_layer layers: prune after layer l (0-based).

        The pruning layer l's attention (last token's query) picks what enters layer l + 1,
        so 0 <= l < n_layer - 1. A fraction f maps to l = floor(f * n_layer + 0.5) - 1 (the
        first round(f * n_layer) layers see every token), clamped into [0, n_layer - 2];
        an int index out of that range is an error. Dedup rules, in this order:
        entries landing on the same layer merge into one with the smallest keep (keep is a
        fraction of the whole prompt, so the later, smaller ratio is what survives);
        an entry whose keep equals what is already alive (1.0 at first) prunes nothing and
        is dropped. The result is strictly increasing in l, strictly decreasing in keep.
        """
        _check_int("n_layer", n_layer, 1)
        resolved: List[Tuple[int, float]] = []
        for spec, ratio in zip(self.layers, self.keep):
            if isinstance(spec, int):
                if spec > n_layer - 2:
                    raise ValueError(f"pruning layer {spec} must be < n_layer - 1 = "
                                     f"{n_layer - 1} (the model has {n_layer} layers)")
                layer = spec
            else:
                if n_layer < 2:
                    raise ValueError("a model needs at least 2 layers to prune between them")
                layer = min(max(math.floor(spec * n_layer + 0.5) - 1, 0), n_layer - 2)
            if resolved and layer < resolved[-1][0]:
                raise ValueError(f"layers {self.layers} resolve out of order for "
                                 f"n_layer={n_layer}")
            if resolved and layer == resolved[-1][0]:
                resolved[-1] = (layer, min(ratio, resolved[-1][1]))
            else:
                resolved.append((layer, ratio))
        out: List[Tuple[int, float]] = []
        alive = 1.0
        for layer, ratio in resolved:
            if ratio < alive:
                out.append((layer, ratio))
                alive = ratio
        return out


def keep_count(ratio: float, n_tokens: int) -> int:
    """Tokens a lazy-prefill stage keeps out of n_tokens at a keep ratio, by the engine's own
    rule (native/keep.h: ceil of the product rounded to 6 decimals, at least 1, the last token)."""
    from . import _native as N   # the engine's rule, not a copy of it (loads libpylazy on first use)
    return int(N.lib.plz_keep_count(float(ratio), int(n_tokens)))


def snap_to_global_layers(schedule: List[Tuple[int, float]], swa: Sequence[bool]) -> List[Tuple[int, float]]:
    """Move pruning layers off sliding-window layers (gemma3: 5 of every 6).

    A sliding-window layer's last-token attention covers only the last n_swa tokens, so as a pruning
    layer it scores every older token 0 and the top-k among them is arbitrary. Each pruning layer
    goes to the nearest global layer that may prune (index < n_layer - 1), the later one on a tie;
    entries landing together merge with the smallest keep. Without SWA layers: unchanged.
    """
    if not any(swa):
        return list(schedule)
    n = len(swa)
    allowed = [il for il in range(n - 1) if not swa[il]]
    if not allowed:
        return []
    out: List[Tuple[int, float]] = []
    for layer, keep in schedule:
        target = min(allowed, key=lambda g: (abs(g - layer), -g))
        if out and out[-1][0] == target:
            out[-1] = (target, min(out[-1][1], keep))
        elif not out or target > out[-1][0]:
            out.append((target, keep))
    return out


@dataclass(frozen=True)
class Recycle:
    """Recycled attention in decode: full attention every ``stride`` steps picks, per layer
    and KV head, the top ``k`` tokens; the steps between attend to those k + new tokens.

    dynamic_threshold: if set, a recycled step also returns the mean over layers of
    cosine(q_now, q_at_last_full) every ``check_every`` recycled steps, and a value below
    the threshold makes the next step full (see DynamicStride). In (-1, 1].

    pool: before the top-k, each token's score becomes the max over the tokens within
    ``pool`` positions of it, so the tokens after an attended one come along (a copied
    number is read one digit per step). 0 is the paper's plain top-k; in [0, 64]. Default
    8: on SmolLM2 needles (docs/eval/README.md) k=L/8, stride 16 finds 0 % with pool=0 and
    42-47 % with pool=8 (full attention 50-52 %).

    share: each (layer, KV head) score adds ``share`` x the token's best score over all
    layers and KV heads, so a token that some layer attends strongly is kept in every layer
    (a middle layer's refresh query often does not look at the needle its next steps read).
    0 is the paper's per-layer selection; in [0, 1]. Default 0.5: on SmolLM2 needles at
    4K-8K, 96.5 % of full attention's score over 720 GPU prompts (96.4 % on 240 held out)
    against 91 % with share=0 (docs/eval/README.md). After a lazy prefill (one graph per
    stage), the picks wait until every stage has scored, so the best score still spans all
    layers (a token a stage never computed takes its best from the stages that did).
    """

    k: int
    stride: int = 16
    dynamic_threshold: Optional[float] = None
    check_every: int = 1
    pool: int = 8
    share: float = 0.5

    def __post_init__(self) -> None:
        _check_int("k", self.k, 1)
        _check_int("stride", self.stride, 1)
        _check_int("check_every", self.check_every, 1)
        _check_pool(self.pool)
        if isinstance(self.share, bool) or not isinstance(self.share, Real):
            raise TypeError(f"share must be a float, got {type(self.share).__name__}")
        if not 0.0 <= self.share <= 1.0:
            raise ValueError(f"share must be in [0, 1], got {self.share!r}")
        t = self.dynamic_threshold
        if t is not None:
            if isinstance(t, bool) or not isinstance(t, Real):
                raise TypeError(f"dynamic_threshold must be a float or None, got "
                                f"{type(t).__name__}")
            if not -1.0 < t <= 1.0:
                raise ValueError(f"dynamic_threshold is a cosine similarity in (-1, 1], "
                                 f"got {t!r}")
        elif self.check_every != 1:
            raise ValueError("check_every only applies with a dynamic_threshold")


@dataclass(frozen=True)
class StreamingWindow:
    """StreamingLLM-style decode: attend to the first ``sinks`` tokens and the last
    ``window`` tokens only (default 4 + 1020 = 1024 cells), plus the tokens decoded since the
    window last moved: the engine slides it every ``stride`` tokens (same recycled-cache
    graph as Recycle, so the KV budget of StreamingWindow(sinks, window) equals
    Recycle(k=sinks + window, stride))."""

    sinks: int = 4
    window: int = 1020
    stride: int = 16

    def __post_init__(self) -> None:
        _check_int("sinks", self.sinks, 0)
        _check_int("window", self.window, 1)
        _check_int("stride", self.stride, 1)


class StepKind(str, Enum):
    """What one decode step runs; the engine takes it as it is (pylazy.engine.Context.decode).
    A str enum: StepKind.FULL == "full"."""

    FULL = "full"           # full attention (a refresh of the recycled cache when recycling)
    RECYCLED = "recycled"   # attention over the recycled cache only
    SELECT = "select"       # full, and after a lazy prefill re-select and revive at every stage


class Step(NamedTuple):
    """One decode step's orders: which graph to run, and whether it returns similarity."""

    kind: StepKind
    check_similarity: bool = False


FULL = Step(StepKind.FULL, False)


@runtime_checkable
class StridePolicy(Protocol):
    """Asked by the engine loop each decode step.

    Per step: ``step = policy.next_step()``; run it; if ``step.check_similarity``, call
    ``policy.observe(similarity)`` with what the engine returned (``observe(None)`` is
    allowed and does nothing). ``reset()`` before a new generation.
    """

    def reset(self) -> None: ...

    def next_step(self) -> Step: ...

    def observe(self, similarity: Optional[float]) -> None: ...


class FullAttention:
    """No recycling: every step is full attention."""

    def reset(self) -> None:
        pass

    def next_step(self) -> Step:
        return FULL

    def observe(self, similarity: Optional[float]) -> None:
        pass

    def __repr__(self) -> str:
        return "FullAttention()"


class FixedStride:
    """Full at steps 0, S, 2S, ...; recycled in between; never checks similarity."""

    def __init__(self, stride: int):
        _check_int("stride", stride, 1)
        self.stride = stride
        self.reset()

    def reset(self) -> None:
        self._step = 0

    def next_step(self) -> Step:
        step, self._step = self._step, self._step + 1
        return FULL if step % self.stride == 0 else Step(StepKind.RECYCLED, False)

    def observe(self, similarity: Optional[float]) -> None:
        pass

    def __repr__(self) -> str:
        return f"FixedStride({self.stride})"


class DynamicStride:
    """Full on the first step; recycled after, refreshed early when the query drifts.

    Every ``check_every``-th recycled step since the last full step asks the engine for the
    similarity (mean over layers of cosine(q_now, q_at_last_full)). An observed value below
    ``threshold`` (or NaN) makes the NEXT step full. In any case a full step comes at the
    latest ``stride`` steps after the previous one, so with no drift this is FixedStride.
    """

    def __init__(self, stride: int, threshold: float, check_every: int = 1):
        # same ranges as Recycle's fields; k plays no part here
        Recycle(k=1, stride=stride, dynamic_threshold=threshold, check_every=check_every)
        self.stride, self.threshold, self.check_every = stride, float(threshold), check_every
        self.reset()

    def reset(self) -> None:
        self._since_full: Optional[int] = None  # None: no step yet
        self._refresh = False

    def next_step(self) -> Step:
        if self._since_full is None or self._refresh or self._since_full + 1 >= self.stride:
            self._since_full, self._refresh = 0, False
            return FULL
        self._since_full += 1
        return Step(StepKind.RECYCLED, self._since_full % self.check_every == 0)

    def observe(self, similarity: Optional[float]) -> None:
        if similarity is None:
            return
        # NaN compares False with everything; treat it as drift (refresh) rather than trust it.
        if not similarity >= self.threshold:
            self._refresh = True

    def __repr__(self) -> str:
        return (f"DynamicStride({self.stride}, threshold={self.threshold}, "
                f"check_every={self.check_every})")


class SinkWindowStride:
    """For StreamingWindow: one full step first, then recycled forever.

    The kept set follows a fixed rule (sinks + the most recent window), not attention
    scores, so there is nothing to refresh and no similarity to check; the first step is
    full so the engine lays out its cache the same way as for recycling.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._started = False

    def next_step(self) -> Step:
        if not self._started:
            self._started = True
            return FULL
        return Step(StepKind.RECYCLED, False)

    def observe(self, similarity: Optional[float]) -> None:
        pass

    def __repr__(self) -> str:
        return "SinkWindowStride()"


class ReselectSchedule:
    """When a decode step after a lazy prefill re-selects (LazyPrefill.reselect): at the first full
    step once ``every`` steps have passed since the prefill or the last re-selection."""

    def __init__(self, every: int):
        _check_int("reselect", every, 0)
        self.every = every
        self._since = 0

    def select(self, full_step: bool) -> bool:
        self._since += 1
        if self.every and full_step and self._since >= self.every:
            self._since = 0
            return True
        return False

    def kind(self, kind: StepKind) -> StepKind:
        """The kind one decode step runs: the stride policy's, a due full step made SELECT."""
        return StepKind.SELECT if self.select(kind == StepKind.FULL) else kind


def make_stride_policy(recycle: Union[None, Recycle, StreamingWindow]) -> StridePolicy:
    """None -> FullAttention, Recycle -> FixedStride or DynamicStride (with a threshold),
    StreamingWindow -> SinkWindowStride."""
    if recycle is None:
        return FullAttention()
    if isinstance(recycle, Recycle):
        if recycle.dynamic_threshold is None:
            return FixedStride(recycle.stride)
        return DynamicStride(recycle.stride, recycle.dynamic_threshold, recycle.check_every)
    if isinstance(recycle, StreamingWindow):
        return SinkWindowStride()
    raise TypeError(f"expected None, Recycle or StreamingWindow, got {type(recycle).__name__}")
