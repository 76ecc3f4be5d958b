"""Sampling filters, penalties, the Sampler chain and StopMatcher against hand-computed values.

Several vectors come from llama.cpp's tests/test-sampling.cpp (probabilities in, kept set
out), so the filters are checked against the reference implementation's own expectations.
"""

import math

import numpy as np
import pytest

from pylazy.sampling import (SamplingParams, Sampler, StopMatcher, apply_penalties, log_softmax,
                             min_p_filter, softmax, top_k_filter, top_p_filter, typical_filter)

P4 = np.log([0.1, 0.2, 0.3, 0.4])  # token i has probability 0.1 * (i + 1)


def kept(x):
    return set(np.flatnonzero(np.isfinite(x)).tolist())


@pytest.mark.parametrize("k, expected", [(1, {3}), (3, {1, 2, 3}), (4, {0, 1, 2, 3}),
                                         (0, {0, 1, 2, 3}), (9, {0, 1, 2, 3})])
def test_top_k_kept_set(k, expected):
    assert kept(top_k_filter(P4, k)) == expected


def test_top_k_ties_go_to_lower_id_and_masked_stay_masked():
    x = np.array([1.0, 5.0, 3.0, 3.0, 3.0, -np.inf])
    assert kept(top_k_filter(x, 3)) == {1, 2, 3}
    assert kept(top_k_filter(x, 5)) == {0, 1, 2, 3, 4}  # k above the alive count keeps all


@pytest.mark.parametrize("p, expected", [(0.0, {3}), (0.3, {3}), (0.65, {2, 3}),
                                         (0.8, {1, 2, 3}), (0.95, {0, 1, 2, 3}),
                                         (1.0, {0, 1, 2, 3})])
def test_top_p_kept_set(p, expected):
    assert kept(top_p_filter(P4, p)) == expected


@pytest.mark.parametrize("p, expected", [(0.0, {0, 1, 2, 3}), (0.24, {0, 1, 2, 3}),
                                         (0.26, {1, 2, 3}), (0.49, {1, 2, 3}),
                                         (0.51, {2, 3}), (0.74, {2, 3}), (0.76, {3}),
                                         (1.0, {3})])
def test_min_p_kept_set(p, expected):
    # keep p_i >= p * p_max = p * 0.4
    assert kept(min_p_filter(P4, p)) == expected


def test_mass_boundary_top_p_inclusive_typical_strict():
    # four equal logits: probabilities are exactly 0.25, running mass exactly 0.5 after two
    flat = np.zeros(4)
    assert kept(top_p_filter(flat, 0.5)) == {0, 1}        # llama.cpp: cum_sum >= p
    assert kept(typical_filter(flat, 0.5)) == {0, 1, 2}   # llama.cpp: cum_sum > p


def test_typical_kept_set():
    assert kept(typical_filter(np.log([0.97, 0.01, 0.01, 0.01]), 0.5)) == {0}
    # H = 1.332; |-ln .4 - H| = 0.416 > |-ln .2 - H| = 0.277: the 0.2s rank first;
    # masses 0.2, 0.4, 0.6 -> first strictly above 0.5 is the third
    x = np.log([0.4, 0.2, 0.2, 0.2])
    assert kept(typical_filter(x, 0.5)) == {1, 2, 3}
    assert kept(typical_filter(x, 0.3)) == {1, 2}  # equal scores: lower id first
    assert kept(typical_filter(x, 1.0)) == {0, 1, 2, 3}


def test_filters_do_not_touch_kept_values():
    out = top_p_filter(P4, 0.65)
    np.testing.assert_array_equal(out[2:], P4[2:])
    assert np.isneginf(out[:2]).all()


def test_penalties_hand_example_llama_cpp_rule():
    x = np.array([2.0, -1.0, 0.5, 3.0, -2.0, 0.0])
    hist = [0, 5, 1, 1, 3]  # window of the last 4: 5, 1, 1, 3 (token 0 falls out)
    out = apply_penalties(x, hist, repeat_penalty=2.0, frequency_penalty=0.5,
                          presence_penalty=0.25, penalty_last_n=4)
    expected = [2.0,                      # outside the window
                -1.0 * 2.0 - 2 * 0.5 - 0.25,  # negative: multiplied; seen twice
                0.5,                      # never seen
                3.0 / 2.0 - 0.5 - 0.25,   # positive: divided; seen once
                -2.0,
                0.0 - 0.5 - 0.25]         # zero: unchanged by r either way
    np.testing.assert_allclose(out, expected)
    np.testing.assert_array_equal(apply_penalties(x, hist, 2.0, 0.5, 0.25, 0), x)  # n=0 off


@pytest.mark.parametrize("hist, rep, freq, pres, expected", [
    ([0], 50.0, 0.0, 0.0, [0, 0.25, 0.25, 0.25, 0.25]),
    ([0, 1, 2, 0, 0], 50.0, 0.0, 0.0, [0, 0, 0, 0.5, 0.5]),
    ([0, 1, 2], 1.0, 5.0, 5.0, [0.000023, 0.000023, 0.000023, 0.499966, 0.499966]),
    ([0, 1, 2, 0, 0], 1.0, 5.0, 5.0, [0.0, 0.000023, 0.000023, 0.499977, 0.499977]),
])
def test_penalties_match_llama_cpp_test_vectors(hist, rep, freq, pres, expected):
    x = np.log(np.full(5, 0.2))
    probs = softmax(apply_penalties(x, hist, rep, freq, pres, penalty_last_n=64))
    np.testing.assert_allclose(probs, expected, atol=2e-6)


@pytest.mark.parametrize("scale", [0.3, 8.0])  # flat: full-sort fallback; peaked: top-256 path
def test_top_p_large_vocab_matches_brute_force(scale):
    x = np.random.default_rng(5).normal(size=5000) * scale
    for p in (0.5, 0.9):
        order = np.argsort(-x, kind="stable")
        cum = np.cumsum(softmax(x)[order])
        expected = set(order[: int(np.argmax(cum >= p)) + 1].tolist())
        assert kept(top_p_filter(x, p)) == expected


@pytest.mark.parametrize("params", [
    dict(), dict(top_k=0, top_p=0.9), dict(top_k=100, typical_p=0.9, min_p=0.1),
    dict(top_k=7, top_p=0.5, repeat_penalty=1.3, presence_penalty=0.5, temperature=1.7)])
def test_sampler_chain_equals_composed_filters(params):
    rng = np.random.default_rng(11)
    x, hist = rng.normal(size=3000) * 2, rng.integers(0, 3000, size=100)
    sp = SamplingParams(**params)
    y = apply_penalties(x, hist, sp.repeat_penalty, sp.frequency_penalty, sp.presence_penalty,
                        sp.penalty_last_n)
    y = min_p_filter(top_p_filter(typical_filter(top_k_filter(y, sp.top_k), sp.typical_p),
                                  sp.top_p), sp.min_p) / sp.temperature
    s = Sampler(sp)
    np.testing.assert_array_equal(s.processed_logits(x, hist), y)
    np.testing.assert_allclose(s.probs(x, hist), softmax(y))


def test_softmax_and_log_softmax():
    np.testing.assert_allclose(softmax(P4), [0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(softmax(np.array([0.0, -np.inf])), [1.0, 0.0])
    np.testing.assert_allclose(np.exp(log_softmax(P4)), [0.1, 0.2, 0.3, 0.4], rtol=1e-6)
    with pytest.raises(ValueError):
        softmax(np.array([-np.inf, -np.inf]))


OFF = dict(top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0)


def test_temperature_zero_is_argmax():
    rng = np.random.default_rng(0)
    s = Sampler(SamplingParams(temperature=0.0))
    for _ in range(20):
        logits = rng.normal(size=300).astype(np.float32)
        assert s.sample(logits, []) == int(np.argmax(logits))
    assert s.sample(np.array([1.0, 7.0, 7.0]), []) == 1  # tie -> first, as llama.cpp greedy
    np.testing.assert_array_equal(s.probs(np.array([1.0, 7.0, 2.0]), []), [0, 1, 0])


def test_temperature_zero_still_applies_penalties():
    s = Sampler(SamplingParams(temperature=0.0, repeat_penalty=4.0))
    assert s.sample(np.array([1.0, 2.0, 0.0]), [1]) == 0  # 2/4 = 0.5 < 1


def test_seeded_reproducible_and_reset_replays():
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(40, 500))
    a, b = Sampler(SamplingParams(seed=123)), Sampler(SamplingParams(seed=123))
    seq_a = [a.sample(r, []) for r in rows]
    assert seq_a == [b.sample(r, []) for r in rows]
    a.reset()
    assert seq_a == [a.sample(r, []) for r in rows]
    c = Sampler(SamplingParams(seed=124))
    assert seq_a != [c.sample(r, []) for r in rows]


def test_draws_follow_the_distribution_and_never_pick_dropped_tokens():
    s = Sampler(SamplingParams(temperature=1.0, seed=7, **OFF))
    n = 8000
    counts = np.bincount([s.sample(P4, []) for _ in range(n)], minlength=4) / n
    np.testing.assert_allclose(counts, [0.1, 0.2, 0.3, 0.4], atol=0.02)
    s2 = Sampler(SamplingParams(temperature=1.0, seed=7, **{**OFF, "top_k": 2}))
    assert {s2.sample(P4, []) for _ in range(300)} == {2, 3}


def test_temperature_applies_after_filters():
    # min_p on raw logits keeps {2, 3}; had temperature 5 come first (p ** 0.2) it would keep all
    s = Sampler(SamplingParams(temperature=5.0, **{**OFF, "min_p": 0.51}))
    probs = s.probs(P4, [])
    w = np.array([0.3, 0.4]) ** (1 / 5)
    np.testing.assert_allclose(probs, [0, 0, *(w / w.sum())])


def test_default_chain_on_hand_logits():
    # defaults: top_k 40 (no-op here), top_p 0.95 drops 0.1? mass 0.4+0.3+0.2 = 0.9 < 0.95 so
    # all four stay; min_p 0.05 * 0.4 = 0.02 keeps all; temperature 0.8 -> p ** 1.25
    probs = Sampler(SamplingParams()).probs(P4, [])
    w = np.array([0.1, 0.2, 0.3, 0.4]) ** 1.25
    np.testing.assert_allclose(probs, w / w.sum())


def test_n_prompt_limits_penalties_to_generated_tokens():
    s = Sampler(SamplingParams(temperature=0.0, repeat_penalty=10.0))
    logits = np.array([3.0, 2.0, 1.0])
    assert s.sample(logits, [0, 2], n_prompt=1) == 0   # only token 2 penalised
    assert s.sample(logits, [0, 2], n_prompt=0) == 1   # token 0 penalised too: 0.3 < 2


def test_logits_processors_llama_cpp_signature():
    seen = {}

    def ban_top(input_ids, scores):
        seen["ids"], seen["dtype"] = input_ids.copy(), scores.dtype
        scores = scores.copy()
        scores[np.argmax(scores)] = -np.inf
        return scores

    s = Sampler(SamplingParams(temperature=0.0), logits_processors=[ban_top])
    assert s.sample(P4, [4, 2, 9]) == 2
    np.testing.assert_array_equal(seen["ids"], [4, 2, 9])
    assert seen["ids"].dtype == np.intc and seen["dtype"] == np.float32
    bad = Sampler(SamplingParams(), logits_processors=[lambda ids, sc: sc[:2]])
    with pytest.raises(ValueError, match="shape"):
        bad.sample(P4, [])


def test_sampler_rejects_bad_logits():
    s = Sampler(SamplingParams(temperature=0.0))
    with pytest.raises(ValueError, match="NaN"):
        s.sample(np.array([0.0, np.nan]), [])
    with pytest.raises(ValueError, match="1-D"):
        s.sample(np.zeros((2, 3)), [])
    with pytest.raises(ValueError, match="outside"):
        Sampler(SamplingParams(repeat_penalty=1.1)).sample(P4, [7])


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(top_p=1.5), ValueError, "[0, 1]"),
    (dict(min_p=-0.1), ValueError, "[0, 1]"),
    (dict(typical_p=2.0), ValueError, "[0, 1]"),
    (dict(temperature=-1.0), ValueError, ">= 0"),
    (dict(temperature=math.inf), ValueError, "finite"),
    (dict(top_k=-1), ValueError, ">= 0"),
    (dict(top_k=2.5), TypeError, "int"),
    (dict(top_k=True), TypeError, "int"),
    (dict(repeat_penalty=0.0), ValueError, "> 0"),
    (dict(frequency_penalty=math.nan), ValueError, "finite"),
    (dict(presence_penalty="1"), TypeError, "real"),
    (dict(penalty_last_n=-1), ValueError, ">= 0"),
    (dict(seed=-5), ValueError, "seed"),
    (dict(seed=1.5), TypeError, "seed"),
])
def test_params_validation_messages(kwargs, exc, words):
    with pytest.raises(exc) as info:
        SamplingParams(**kwargs).validate()
    assert words in str(info.value)
    assert next(iter(kwargs)) in str(info.value)


def test_params_defaults_are_llama_cpp_python_completion_defaults():
    p = SamplingParams().validate()
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.typical_p, p.repeat_penalty,
            p.penalty_last_n) == (0.8, 40, 0.95, 0.05, 1.0, 1.0, 64)
    SamplingParams(seed=0xFFFFFFFF).validate()  # llama.cpp's "random seed"


def feed_all(m, chunks):
    out, stopped = "", False
    for c in chunks:
        emit, stopped = m.feed(c)
        out += emit
        if stopped:
            break
    return out + m.flush(), stopped


def test_stop_split_across_chunks():
    m = StopMatcher(["###"])
    assert m.feed("Hello #") == ("Hello ", False)
    assert m.feed("#") == ("", False)
    assert m.feed("# world") == ("", True)
    assert m.matched == "###" and m.flush() == ""
    assert m.feed("more") == ("", True)


def test_partial_stop_that_never_completes_is_released():
    assert feed_all(StopMatcher(["###"]), ["ab#", "#c"]) == ("ab##c", False)
    m = StopMatcher(["###"])
    assert m.feed("x##") == ("x", False)
    assert m.flush() == "##"  # end of generation: the held tail was never a stop


def test_multiple_stops_earliest_wins():
    assert feed_all(StopMatcher(["END", "\n\n"]), ["foo\n", "\nbar END"]) == ("foo", True)
    m = StopMatcher(["world", "lo"])
    assert m.feed("hello world") == ("hel", True) and m.matched == "lo"


def test_overlapping_prefix_holdback():
    m = StopMatcher(["aab"])
    assert [m.feed(c) for c in "aaab"] == [("", False), ("", False), ("a", False), ("", True)]


def test_any_chunking_gives_llama_cpp_python_result():
    text = "The answer: 42.\nUser: what?\n### Done\nUser: again"
    stops = ["\nUser:", "###", "Done"]
    first = min(text.index(s) for s in stops)
    rng = np.random.default_rng(3)
    for _ in range(50):
        cuts = sorted(rng.choice(np.arange(1, len(text)), size=8, replace=False).tolist())
        chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        m = StopMatcher(stops)
        emitted = []
        for c in chunks:
            e, stopped = m.feed(c)
            emitted.append(e)
            # never emits any part of a stop: everything so far is a prefix of the answer
            assert text[:first].startswith("".join(emitted))
            if stopped:
                break
        assert "".join(emitted) == text[:first] and stopped


def test_stop_normalization():
    assert StopMatcher(None).stops == [] and StopMatcher("x").stops == ["x"]
    assert StopMatcher(["", "y"]).stops == ["y"]
    assert feed_all(StopMatcher([]), ["a", "b"]) == ("ab", False)
    with pytest.raises(TypeError):
        StopMatcher([1])


def _llama_cpp_chain(llama_cpp, x, hist, sp):
    """llama.cpp's own chain, built as llama-cpp-python 0.3.36's _init_sampler builds it,
    applied to a bare token array (no model needed); returns logits with -inf = dropped."""
    import ctypes
    lc, n = llama_cpp, x.size
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    for smpl in (lc.llama_sampler_init_penalties(n, sp.penalty_last_n, sp.repeat_penalty,
                                                 sp.frequency_penalty, sp.presence_penalty),
                 lc.llama_sampler_init_top_k(sp.top_k),
                 lc.llama_sampler_init_typical(sp.typical_p, 1),
                 lc.llama_sampler_init_top_p(sp.top_p, 1),
                 lc.llama_sampler_init_min_p(sp.min_p, 1),
                 lc.llama_sampler_init_temp(sp.temperature)):
        lc.llama_sampler_chain_add(chain, smpl)
    try:
        for t in hist:
            lc.llama_sampler_accept(chain, int(t))
        data = (lc.llama_token_data * n)(*[lc.llama_token_data(i, float(v), 0.0)
                                           for i, v in enumerate(x)])
        arr = lc.llama_token_data_array(data, n, -1, False)
        lc.llama_sampler_apply(chain, ctypes.byref(arr))
        out = np.full(n, -np.inf)
        for i in range(arr.size):
            out[data[i].id] = data[i].logit
        return out
    finally:
        lc.llama_sampler_free(chain)


@pytest.mark.parametrize("params", [
    dict(), dict(top_k=0, top_p=0.9), dict(top_k=100, typical_p=0.9, min_p=0.1),
    dict(top_k=7, top_p=0.5, repeat_penalty=1.3, frequency_penalty=0.2, presence_penalty=0.5,
         temperature=1.7)])
def test_chain_matches_llama_cpp(params):
    llama_cpp = pytest.importorskip("llama_cpp")
    rng = np.random.default_rng(0)
    x = (rng.normal(size=2000) * 2).astype(np.float32)
    hist = rng.integers(0, 2000, size=100)  # penalties see the last 64, as llama.cpp's ring
    sp = SamplingParams(**params)
    ref = _llama_cpp_chain(llama_cpp, x, hist, sp)
    mine = Sampler(sp).processed_logits(x, hist)
    assert kept(mine) == kept(ref) and len(kept(ref)) > 1
    alive = np.isfinite(ref)
    np.testing.assert_allclose(mine[alive], ref[alive], rtol=1e-6, atol=1e-6)
