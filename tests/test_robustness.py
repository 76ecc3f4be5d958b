"""Hostile prompts and arguments: random bytes and random Unicode tokenise and run; over-long prompts and
bad values raise clear Python exceptions before any work; closed objects refuse calls."""
import random

import pytest

import pylazy


@pytest.fixture(scope="module")
def llm(default_model_path):
    m = pylazy.Llama(default_model_path, n_ctx=512, verbose=False, n_threads=2)
    yield m
    m.close()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_bytes_and_unicode_prompts_run(llm, seed):
    rng = random.Random(seed)
    raw = bytes(rng.randrange(256) for _ in range(120))
    toks = llm.tokenize(raw, add_bos=True)
    assert 0 < len(toks) <= 512
    out = llm(raw.decode("utf-8", "replace"), max_tokens=3, temperature=0)
    assert out["usage"]["prompt_tokens"] > 0
    text = "".join(chr(rng.choice([rng.randrange(32, 0x7F), rng.randrange(0xA0, 0xD7FF), rng.randrange(0x1F300, 0x1FAFF)]))
                   for _ in range(60))
    out = llm(text, max_tokens=3, temperature=0)
    assert out["choices"][0]["finish_reason"] in ("length", "stop")


def test_prompt_over_context_raises_before_work(llm):
    with pytest.raises(ValueError, match="context"):
        llm("word " * 2000, max_tokens=1)
    # the model still works afterwards
    assert llm("Hello", max_tokens=1, temperature=0)["usage"]["completion_tokens"] <= 1


@pytest.mark.parametrize("kwargs, exc", [
    ({"top_p": 1.5}, ValueError), ({"min_p": -0.1}, ValueError), ({"temperature": -1}, ValueError),
    ({"top_k": -3}, ValueError), ({"lazy": "yes"}, TypeError), ({"recycle": 5}, TypeError),
    ({"no_such_argument": 1}, TypeError),
])
def test_bad_arguments_raise(llm, kwargs, exc):
    with pytest.raises(exc):
        llm("Hi", max_tokens=1, **kwargs)


@pytest.mark.parametrize("make", [lambda: pylazy.LazyPrefill(layers=(0.5,), keep=(1.5,)),
                                  lambda: pylazy.LazyPrefill(layers=(0.5, 0.25), keep=(0.5, 0.3)),
                                  lambda: pylazy.Recycle(k=0), lambda: pylazy.Recycle(k=8, stride=0),
                                  lambda: pylazy.Recycle(k=8, dynamic_threshold=2.0),
                                  lambda: pylazy.StreamingWindow(window=0)])
def test_bad_policy_values_raise(make):
    with pytest.raises((ValueError, TypeError)):
        make()


def test_closed_llama_refuses_calls(default_model_path):
    m = pylazy.Llama(default_model_path, n_ctx=64, verbose=False)
    m.close()
    m.close()
    with pytest.raises(Exception, match="closed"):
        m("Hi", max_tokens=1)
