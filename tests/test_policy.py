"""LazyPrefill / Recycle / StreamingWindow validation and resolution, and the stride policies'
step patterns."""

import math

import pytest

from pylazy.policy import (DynamicStride, FixedStride, FullAttention, LazyPrefill, Recycle,
                           SinkWindowStride, Step, StreamingWindow, StridePolicy, keep_count,
                           make_stride_policy)

F, R, RC = Step("full", False), Step("recycled", False), Step("recycled", True)


def test_lazy_prefill_default_and_equality():
    d = LazyPrefill()
    assert d == LazyPrefill(layers=[0.25, 0.5, 0.75], keep=[0.6, 0.4, 0.25])
    assert d.layers == (0.25, 0.5, 0.75) and d.keep == (0.6, 0.4, 0.25)
    assert repr(d) == "LazyPrefill(layers=(0.25, 0.5, 0.75), keep=(0.6, 0.4, 0.25), pool=16, reselect=0, window=32)"
    assert hash(d) == hash(LazyPrefill())
    assert d != LazyPrefill(layers=[0.25], keep=[0.7])


@pytest.mark.parametrize("n_layer, expected", [
    # l = floor(f * n + 0.5) - 1: 30 layers -> 7.5+.5, 15+.5, 22.5+.5 -> 7, 14, 22
    (30, [(7, 0.6), (14, 0.4), (22, 0.25)]),
    (32, [(7, 0.6), (15, 0.4), (23, 0.25)]),
    (4, [(0, 0.6), (1, 0.4), (2, 0.25)]),
    # 2 layers: every fraction lands on layer 0; merged, the smallest keep wins
    (2, [(0, 0.25)]),
])
def test_lazy_prefill_resolve_fractions(n_layer, expected):
    assert LazyPrefill().resolve(n_layer) == expected


def test_lazy_prefill_resolve_ints_and_dedup():
    assert LazyPrefill([3, 10], [0.5, 0.5]).resolve(30) == [(3, 0.5)]  # 2nd prunes nothing
    assert LazyPrefill([5], [1.0]).resolve(30) == []
    assert LazyPrefill([], []).resolve(30) == []
    assert LazyPrefill([0, 28], [0.9, 0.1]).resolve(30) == [(0, 0.9), (28, 0.1)]
    assert LazyPrefill([0.5, 20], [0.6, 0.4]).resolve(30) == [(14, 0.6), (20, 0.4)]
    assert LazyPrefill([14, 0.5], [0.6, 0.4]).resolve(30) == [(14, 0.4)]  # same layer: merged


def test_lazy_prefill_resolve_errors():
    with pytest.raises(ValueError, match="< n_layer - 1"):
        LazyPrefill([29], [0.5]).resolve(30)
    with pytest.raises(ValueError, match="out of order"):
        LazyPrefill([20, 0.5], [0.6, 0.4]).resolve(30)
    with pytest.raises(ValueError, match="at least 2 layers"):
        LazyPrefill().resolve(1)
    with pytest.raises(ValueError, match="n_layer"):
        LazyPrefill().resolve(0)


@pytest.mark.parametrize("layers, keep, exc, words", [
    ([1.0], [0.5], ValueError, "(0, 1)"),
    ([0.0], [0.5], ValueError, "(0, 1)"),
    ([-1], [0.5], ValueError, ">= 0"),
    ([True], [0.5], TypeError, "int index"),
    (["3"], [0.5], TypeError, "int index"),
    ("ab", [0.5, 0.5], TypeError, "sequences"),
    ([3, 3], [0.5, 0.4], ValueError, "increasing"),
    ([0.5, 0.25], [0.5, 0.4], ValueError, "increasing"),
    ([3, 5], [0.5, 0.7], ValueError, "non-increasing"),
    ([3], [0.0], ValueError, "(0, 1]"),
    ([3], [1.5], ValueError, "(0, 1]"),
    ([3, 5], [0.5], ValueError, "same length"),
    ([3], None, ValueError, "both"),
    (None, [0.5], ValueError, "both"),
])
def test_lazy_prefill_validation(layers, keep, exc, words):
    with pytest.raises(exc) as info:
        LazyPrefill(layers, keep)
    assert words in str(info.value)


def test_keep_count():
    assert keep_count(0.7, 10) == 7  # 0.7 * 10 = 7.000000000000001 must not round up
    assert keep_count(0.5, 7) == 4
    assert keep_count(0.3, 1) == 1
    assert keep_count(1.0, 5) == 5


def test_recycle_and_window_validation():
    assert Recycle(64) == Recycle(k=64, stride=16, dynamic_threshold=None, check_every=1)
    Recycle(8, 4, dynamic_threshold=1.0, check_every=3)
    for kwargs, exc in [(dict(k=0), ValueError), (dict(k=1.5), TypeError),
                        (dict(k=8, stride=0), ValueError),
                        (dict(k=8, dynamic_threshold=-1.0), ValueError),
                        (dict(k=8, dynamic_threshold=1.5), ValueError),
                        (dict(k=8, dynamic_threshold="0.9"), TypeError),
                        (dict(k=8, dynamic_threshold=0.9, check_every=0), ValueError),
                        (dict(k=8, check_every=2), ValueError),
                        (dict(k=8, share=-0.1), ValueError), (dict(k=8, share=1.5), ValueError),
                        (dict(k=8, share=True), TypeError), (dict(k=8, share="0.5"), TypeError)]:
        with pytest.raises(exc):
            Recycle(**kwargs)
    assert StreamingWindow() == StreamingWindow(4, 1020)
    StreamingWindow(sinks=0, window=1)
    for kwargs, exc in [(dict(sinks=-1), ValueError), (dict(window=0), ValueError),
                        (dict(window=2.0), TypeError)]:
        with pytest.raises(exc):
            StreamingWindow(**kwargs)


def run(policy, n, sims=None):
    """Drive a policy like the engine loop: sims[i] is what step i's check would return."""
    steps = []
    for i in range(n):
        step = policy.next_step()
        steps.append(step)
        if step.check_similarity:
            policy.observe(sims[i] if sims else 1.0)
    return steps


def test_full_attention_and_fixed_stride_patterns():
    assert run(FullAttention(), 3) == [F, F, F]
    p = FixedStride(4)
    assert run(p, 10) == [F, R, R, R, F, R, R, R, F, R]
    p.reset()
    assert run(p, 2) == [F, R]
    assert run(FixedStride(1), 3) == [F, F, F]
    with pytest.raises(ValueError):
        FixedStride(0)


def test_dynamic_stride_low_similarity_makes_next_step_full():
    p = DynamicStride(8, threshold=0.9, check_every=2)
    sims = {2: 0.95, 4: 0.5}  # step 4 drifts -> step 5 is full
    got = run(p, 15, sims=[sims.get(i, 1.0) for i in range(15)])
    assert got == [F, R, RC, R, RC, F, R, RC, R, RC, R, RC, R, F, R]  # 13 = 5 + 8: at latest


def test_dynamic_stride_without_drift_is_fixed_stride():
    assert run(DynamicStride(5, 0.9), 12) == [F, RC, RC, RC, RC, F, RC, RC, RC, RC, F, RC]


def test_dynamic_stride_observe_edge_cases():
    p = DynamicStride(100, 0.9)
    assert p.next_step() == F and p.next_step() == RC
    p.observe(None)
    assert p.next_step() == RC
    p.observe(math.nan)  # unknown similarity counts as drift
    assert p.next_step() == F
    p.reset()
    assert p.next_step() == F
    with pytest.raises(ValueError):
        DynamicStride(4, threshold=2.0)


def test_make_stride_policy():
    assert isinstance(make_stride_policy(None), FullAttention)
    fixed = make_stride_policy(Recycle(64, stride=3))
    assert isinstance(fixed, FixedStride) and fixed.stride == 3
    dyn = make_stride_policy(Recycle(64, stride=8, dynamic_threshold=0.8, check_every=2))
    assert isinstance(dyn, DynamicStride)
    assert (dyn.stride, dyn.threshold, dyn.check_every) == (8, 0.8, 2)
    win = make_stride_policy(StreamingWindow())
    assert isinstance(win, SinkWindowStride) and run(win, 40) == [F] + [R] * 39
    for policy in (fixed, dyn, win, FullAttention()):
        assert isinstance(policy, StridePolicy)
    with pytest.raises(TypeError):
        make_stride_policy("recycle")


def test_snap_to_global_layers():
    from pylazy.policy import snap_to_global_layers
    gemma = [il % 6 != 5 for il in range(18)]          # global layers 5, 11, 17 (17 is last: cannot prune)
    sched = LazyPrefill().resolve(18)                  # layers 4, 8, 13
    assert [l for l, _ in sched] == [4, 8, 13]
    assert snap_to_global_layers(sched, gemma) == [(5, 0.6), (11, 0.25)]   # 8 and 13 merge at 11
    assert snap_to_global_layers(sched, [False] * 18) == sched
    assert snap_to_global_layers(sched, [True] * 18) == []


def test_lazy_reselect_values_and_schedule():
    from pylazy.policy import ReselectSchedule
    assert LazyPrefill().reselect == 0 and LazyPrefill(reselect=4).reselect == 4
    for bad, exc in ((-1, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(exc):
            LazyPrefill(reselect=bad)
    never = ReselectSchedule(0)
    assert [never.select(True) for _ in range(10)] == [False] * 10
    every3 = ReselectSchedule(3)
    assert [every3.select(True) for _ in range(7)] == [False, False, True, False, False, True, False]
    # with recycling a due re-selection waits for the next full (refresh) step
    rec = ReselectSchedule(3)
    assert [rec.select(full) for full in (True, False, False, False, True, False)] == \
        [False, False, False, False, True, False]


def test_lazy_for_model_reads_the_registry_schedule_by_file_name():
    """Qwen2.5-Coder-0.5B's measured schedule (70/50/30 %, docs/eval/models-s10) comes from the
    registry by its file name; other files get LazyPrefill()'s; overrides replace single fields."""
    from pylazy import LazyPrefill
    from pylazy.cli_args import policies_from_args
    from pylazy.models import registry_entry
    qwen = "/anywhere/" + registry_entry("qwen2.5-coder-0.5b")["file"]
    assert LazyPrefill.for_model(qwen).keep == (0.7, 0.5, 0.3)
    assert LazyPrefill.for_model(qwen, pool=4).pool == 4
    assert LazyPrefill.for_model(qwen, pool=4).keep == (0.7, 0.5, 0.3)
    assert LazyPrefill.for_model("/x/other.gguf") == LazyPrefill()
    smol = registry_entry("smollm2")["file"]
    assert LazyPrefill.for_model(smol).keep == (0.6, 0.4, 0.25)

    import argparse
    from pylazy.cli_args import add_policy_arguments
    p = argparse.ArgumentParser()
    add_policy_arguments(p)
    lazy, _ = policies_from_args(p.parse_args(["--lazy"]), qwen)
    assert lazy.keep == (0.7, 0.5, 0.3)
    lazy, _ = policies_from_args(p.parse_args(["--lazy"]), "/x/other.gguf")
    assert lazy == LazyPrefill()
    lazy, _ = policies_from_args(p.parse_args(["--lazy-layers", "0.5", "--lazy-keep", "0.5"]), qwen)
    assert lazy.keep == (0.5,)   # an explicit schedule wins
