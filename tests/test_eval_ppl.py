"""Teacher-forced perplexity (pylazy.Llama.perplexity and the eval harness) against llama.cpp.

The reference is llama.cpp run the same way (both without flash attention, the default): the context
in one eval, then one token per eval (its decode path), each forced token scored by the logits
before it. Both run one thread: the thread count can change the summation order of decode steps
(ggml's one-query flash attention splits the KV cache across threads from 512 cells).
"""
import json
import math
import os

import numpy as np
import pytest

N_CONTEXT, N_SCORED = 256, 64   # 63 decode steps: the last scored token is never evaluated


def nlls_of(rows, targets):
    x = np.asarray(rows, dtype=np.float64)
    m = x.max(axis=1)
    return m + np.log(np.exp(x - m[:, None]).sum(axis=1)) - x[np.arange(len(x)), targets]


def llama_cpp_nlls(path, tokens, n_context, stepwise=True):
    """NLL of tokens[n_context:] from llama.cpp (its default attention, as pylazy's)."""
    import llama_cpp
    from pylazy.llama_ref import reference_llama
    ref = reference_llama(str(path), n_ctx=len(tokens) + 8, n_batch=512,
                          logits_all=not stepwise, n_threads=1)
    try:
        if not stepwise:   # one batch, all logits: llama.cpp's batched kernels
            ref.eval(tokens)
            return nlls_of(np.array(ref.scores[n_context - 1: len(tokens) - 1]), tokens[n_context:])
        rows = []
        for chunk in [tokens[:n_context]] + [[t] for t in tokens[n_context:-1]]:
            ref.eval(chunk)
            ptr = llama_cpp.llama_get_logits_ith(ref.ctx, -1)
            rows.append(np.ctypeslib.as_array(ptr, shape=(ref.n_vocab(),)).copy())
        return nlls_of(np.stack(rows), tokens[n_context:])
    finally:
        ref.close()


@pytest.fixture(scope="module")
def llm(default_model_path):
    import pylazy
    m = pylazy.Llama(default_model_path, n_ctx=512, verbose=False, n_threads=1)
    yield m
    m.close()


@pytest.fixture(scope="module")
def tokens(llm):
    from pylazy.eval.haystack import natural_prefix
    ids = llm.tokenize(natural_prefix(4000).encode())[:N_CONTEXT + N_SCORED]
    assert len(ids) == N_CONTEXT + N_SCORED
    return ids


@pytest.fixture(scope="module")
def reference(default_model_path, tokens):
    return llama_cpp_nlls(default_model_path, tokens, N_CONTEXT)


def test_full_attention_equals_llama_cpp(llm, tokens, reference, default_model_path):
    r = llm.perplexity(tokens, N_CONTEXT)
    assert r["n_tokens"] == N_SCORED and r["n_context"] == N_CONTEXT
    assert (r["full_steps"], r["recycled_steps"]) == (N_SCORED - 1, 0)
    np.testing.assert_allclose(r["nlls"], reference, rtol=0, atol=1e-6)
    assert r["ppl"] == pytest.approx(math.exp(reference.mean()), rel=1e-9)
    assert r["nll"] == pytest.approx(reference.sum(), rel=1e-9)
    # llama.cpp's one-batch logits of the whole text take other kernels: close, not equal
    batch = llama_cpp_nlls(default_model_path, tokens, N_CONTEXT, stepwise=False)
    assert r["ppl"] == pytest.approx(math.exp(batch.mean()), rel=0.02)


@pytest.mark.parametrize("k, stride, full", [(16, 1, N_SCORED - 1), (1024, 16, 4)])
def test_recycle_that_keeps_everything_is_full_attention(llm, tokens, reference, k, stride, full):
    """stride 1: every step refreshes; k >= context: the recycled cache holds every token."""
    import pylazy
    r = llm.perplexity(tokens, N_CONTEXT, recycle=pylazy.Recycle(k=k, stride=stride))
    assert (r["full_steps"], r["recycled_steps"]) == (full, N_SCORED - 1 - full)
    np.testing.assert_allclose(r["nlls"], reference, rtol=0, atol=1e-6)


def test_recycled_and_lazy_policies_change_perplexity(llm, tokens, reference):
    import pylazy
    full_ppl = math.exp(reference.mean())
    steps = N_SCORED - 1
    cases = {
        "recycle": (pylazy.Recycle(k=32, stride=8), None),
        "dynamic": (pylazy.Recycle(k=32, stride=8, dynamic_threshold=0.95), None),
        "streaming": (pylazy.StreamingWindow(sinks=4, window=28), None),
        "lazy": (None, pylazy.LazyPrefill()),
    }
    out = {name: llm.perplexity(tokens, N_CONTEXT, recycle=rec, lazy=lazy)
           for name, (rec, lazy) in cases.items()}
    for name, r in out.items():
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1, name
        # a real approximation (full attention would be exact to 1e-6; measured: lazy 0.94 % here)
        assert abs(r["ppl"] / full_ppl - 1) > 0.003, name
        assert r["full_steps"] + r["recycled_steps"] == steps, name
    # fixed stride 8: refreshes at steps 0, 8, ..., 56
    assert (out["recycle"]["full_steps"], out["recycle"]["recycled_steps"]) == (8, 55)
    # the dynamic stride refreshes at least as often, and measured the query drift
    assert 8 <= out["dynamic"]["full_steps"] < steps
    assert out["dynamic"]["mean_query_similarity"] is not None
    assert out["streaming"]["recycled_steps"] > 0
    assert out["lazy"]["recycled_steps"] == 0
    assert llm.stats["forced_tokens"] == N_SCORED and llm.stats["computed_fraction"] < 1


def test_perplexity_rejects_bad_arguments(llm, tokens):
    with pytest.raises(TypeError, match="bytes"):
        llm.perplexity(b"some text")
    with pytest.raises(TypeError, match="str or a sequence"):
        llm.perplexity(42)
    with pytest.raises(ValueError, match="n_context"):
        llm.perplexity(tokens[:10], 0)
    with pytest.raises(ValueError, match="leave tokens to score"):
        llm.perplexity(tokens[:10], 10)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        llm.perplexity([tokens[0]])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.perplexity([1, 2, 10 ** 9])
    with pytest.raises(ValueError, match="context window"):
        llm.perplexity(tokens * 2)
    with pytest.raises(TypeError, match="recycle must be"):
        llm.perplexity(tokens[:10], recycle="fast")
    r = llm.perplexity("The quick brown fox jumps over the lazy dog.")   # str: half is context
    assert r["n_context"] + r["n_tokens"] == len(llm.tokenize(
        b"The quick brown fox jumps over the lazy dog."))


def test_harness_records_perplexity_per_policy(tmp_path, default_model_path):
    import pylazy
    from pylazy.eval.runner import natural_text_tokens, run_suite, vocab_tokenizer
    policies = {"full": {}, "lazy": {"lazy": pylazy.LazyPrefill()},
                "recycle": {"recycle": pylazy.Recycle(k=32, stride=8)},
                "dynamic": {"recycle": pylazy.Recycle(k=32, stride=8, dynamic_threshold=0.95)},
                "streaming": {"recycle": pylazy.StreamingWindow(sinks=4, window=28)},
                "lazy+recycle": {"lazy": pylazy.LazyPrefill(), "recycle": pylazy.Recycle(k=32, stride=8)},
                "own_runner": {"n_batch": 64}}   # not a per-call key: a Llama of its own
    run_suite(default_model_path, policies, lengths=[128], tasks=(), progress=False,
              out_dir=str(tmp_path), ppl_tokens=128, ppl_decode=32, n_threads=1)
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    ppl = {q["policy"]: q for q in saved["perplexity"]}
    assert set(ppl) == set(policies) and saved["records"] == []
    for name, q in ppl.items():
        assert q["context_len"] == 128 and q["tokens"] == 32 and q["n_tokens"] == 32
        assert math.isfinite(q["ppl"]) and q["full_steps"] + q["recycled_steps"] == 31, name
    assert (ppl["recycle"]["full_steps"], ppl["recycle"]["recycled_steps"]) == (4, 27)
    ids = natural_text_tokens(vocab_tokenizer(default_model_path), 160)
    ref = math.exp(llama_cpp_nlls(default_model_path, ids, 128).mean())
    assert ppl["full"]["ppl"] == pytest.approx(ref, rel=1e-9)
    assert ppl["own_runner"]["ppl"] == pytest.approx(ref, rel=1e-3)   # other prefill chunks
    assert os.path.exists(tmp_path / "ppl_vs_decode_speedup.png")


def test_harness_llama_cpp_backend_matches(tmp_path, default_model_path):
    """The reference backend teacher-forces the same way: same tokens, same perplexity."""
    from pylazy.eval.runner import natural_text_tokens, run_suite, vocab_tokenizer
    res = run_suite(default_model_path, {"full": {}}, lengths=[128], tasks=(),
                    progress=False, out_dir=str(tmp_path), backend="llama_cpp", ppl_tokens=128,
                    ppl_decode=32, make_plots=False, n_threads=1)
    ids = natural_text_tokens(vocab_tokenizer(default_model_path), 160)
    ref = math.exp(llama_cpp_nlls(default_model_path, ids, 128).mean())
    (q,) = res["perplexity"]
    assert q["ppl"] == pytest.approx(ref, rel=1e-9) and q["full_steps"] == 31
