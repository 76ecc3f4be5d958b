"""pylazy.Llama against llama-cpp-python (the reference) on the default model.

Same calls on both, each with its defaults (llama_cpp.Llama() as a user opens it: no flash
attention, repacked weights where llama.cpp repacks); greedy text must match exactly (pylazy's
full-attention logits equal llama.cpp's), and responses must have the same keys and value types.
Other models and flash_attn=True on both sides: tests/test_conformance_models.py.
"""
from __future__ import annotations

import numpy as np
import pytest

from pylazy import LazyPrefill, Llama, Recycle, StreamingWindow, default_model_path
from pylazy.llama_ref import reference_llama

N_CTX = 512
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
CHAT = [{"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three primary colors."}]


# `ref` (stock llama_cpp.Llama) and `llm` (pylazy.Llama), both with their defaults on the default model
# at n_ctx 512: tests/conftest.py


@pytest.fixture(scope="module")
def greedy(ref, llm):
    """(reference response, pylazy response) per prompt: 32 greedy tokens."""
    return [(ref(p, max_tokens=32, temperature=0), llm(p, max_tokens=32, temperature=0))
            for p in PROMPTS]


def shape(obj):
    """Keys and value types, recursively; numpy scalars count as the Python type."""
    if isinstance(obj, dict):
        return {k: shape(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [shape(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return "float"
    if isinstance(obj, (int, np.integer)) and not isinstance(obj, bool):
        return "int"
    return type(obj).__name__


def text(resp):
    return resp["choices"][0]["text"]


def test_model_facts_and_tokenizer_match(ref, llm):
    assert (llm.n_ctx(), llm.n_vocab(), llm.token_bos(), llm.token_eos()) == \
        (ref.n_ctx(), ref.n_vocab(), ref.token_bos(), ref.token_eos()) == (N_CTX, 49152, 1, 2)
    raw = "Héllo wörld <|im_start|>user".encode()
    for special in (False, True):
        assert llm.tokenize(raw, special=special) == ref.tokenize(raw, special=special)
    toks = ref.tokenize(raw, add_bos=False, special=True)
    assert llm.detokenize(toks) == ref.detokenize(toks) == "Héllo wörld user".encode()
    assert llm.detokenize(toks, special=True) == raw
    with pytest.raises(TypeError, match="bytes"):
        llm.tokenize("not bytes")


def test_greedy_completion_matches_reference(greedy):
    for a, b in greedy:
        assert text(b) == text(a)
        assert len(text(b)) > 20
        assert b["usage"] == a["usage"]
        assert b["choices"][0]["finish_reason"] == a["choices"][0]["finish_reason"]


def test_completion_response_shape(greedy, llm):
    for a, b in greedy:
        assert shape(b) == shape(a)
        assert b["object"] == "text_completion" and b["id"].startswith("cmpl-")
        assert b["model"] == llm.model_path == a["model"]
        assert isinstance(b["created"], int)
    assert {"prompt_tokens", "prefill_s", "decode_s", "generated_tokens"} <= set(llm.stats)
    assert llm.stats["generated_tokens"] == greedy[-1][1]["usage"]["completion_tokens"]


def test_chat_completion_matches_reference(ref, llm):
    a = ref.create_chat_completion(CHAT, temperature=0, max_tokens=24)
    b = llm.create_chat_completion(CHAT, temperature=0, max_tokens=24)
    assert b["choices"][0]["message"] == a["choices"][0]["message"]
    assert len(b["choices"][0]["message"]["content"]) > 5
    assert b["usage"] == a["usage"]
    assert shape(b) == shape(a) and b["object"] == "chat.completion"
    # the next turn keeps whole 512-token chunks of the last prefill only, never the decoded reply,
    # so its result is a fresh context's (pylazy.reuse; tests/test_determinism.py)
    assert b["choices"][0]["finish_reason"] == "stop"
    turn = CHAT + [b["choices"][0]["message"], {"role": "user", "content": "And one more?"}]
    llm.create_chat_completion(turn, temperature=0, max_tokens=2)
    assert llm.stats["reused_tokens"] == b["usage"]["prompt_tokens"] // 512 * 512


def test_chat_stream_matches(ref, llm):
    a = list(ref.create_chat_completion(CHAT, temperature=0, max_tokens=12, stream=True))
    b = list(llm.create_chat_completion(CHAT, temperature=0, max_tokens=12, stream=True))
    joined = lambda chunks: "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert joined(b) == joined(a) and len(joined(b)) > 5
    # first chunk carries the role, the last the finish reason, as in llama-cpp-python
    for i in (0, 1, -1):
        assert shape(b[i]) == shape(a[i])
    assert b[-1]["choices"][0]["finish_reason"] == a[-1]["choices"][0]["finish_reason"]


def test_stream_concatenates_to_completion(ref, llm, greedy):
    chunks = list(llm(PROMPTS[0], max_tokens=16, temperature=0, stream=True))
    streamed = "".join(c["choices"][0]["text"] for c in chunks)
    assert streamed == text(llm(PROMPTS[0], max_tokens=16, temperature=0))
    assert len(streamed) > 20 and text(greedy[0][1]).startswith(streamed)
    assert len(chunks) > 3 and all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    ref_chunks = list(ref(PROMPTS[0], max_tokens=4, temperature=0, stream=True))
    assert shape(chunks[0]) == shape(ref_chunks[0]) and shape(chunks[-1]) == shape(ref_chunks[-1])
    assert len({c["id"] for c in chunks}) == 1


def test_stop_strings_like_reference(ref, llm, greedy):
    full = text(greedy[1][0])            # "\n    if n == 0:\n        return ..."
    stop = full[len(full) // 2:len(full) // 2 + 3]
    expected = full[:full.index(stop)]
    for stops in (stop, ["@@never@@", stop]):
        a = ref(PROMPTS[1], max_tokens=32, temperature=0, stop=stops)
        b = llm(PROMPTS[1], max_tokens=32, temperature=0, stop=stops)
        assert text(a) == text(b) == expected
        assert a["choices"][0]["finish_reason"] == b["choices"][0]["finish_reason"] == "stop"
    chunks = [c["choices"][0]["text"] for c in llm(PROMPTS[1], max_tokens=32, temperature=0,
                                                   stop=[stop], stream=True)]
    assert "".join(chunks) == expected   # no piece of the stop string leaks into the stream


def test_logprobs_match_reference(ref, llm):
    a = ref(PROMPTS[0], max_tokens=4, temperature=0, logprobs=3)["choices"][0]["logprobs"]
    b = llm(PROMPTS[0], max_tokens=4, temperature=0, logprobs=3)["choices"][0]["logprobs"]
    assert b["tokens"] == a["tokens"] and b["text_offset"] == a["text_offset"]
    np.testing.assert_allclose(b["token_logprobs"], a["token_logprobs"], atol=1e-4)
    for ta, tb in zip(a["top_logprobs"], b["top_logprobs"]):
        assert list(tb) == list(ta)
        np.testing.assert_allclose(list(tb.values()), list(ta.values()), atol=1e-4)
    assert shape(b) == shape(a)


def test_invalid_arguments_raise(llm):
    with pytest.raises(ValueError, match="top_p"):
        llm("Hi", top_p=1.5)
    with pytest.raises(ValueError, match="min_p"):
        llm("Hi", min_p=-0.1)
    with pytest.raises(TypeError, match="nonsense"):
        llm("Hi", nonsense=1)
    with pytest.raises(TypeError, match="nonsense"):
        Llama(nonsense=1)
    with pytest.raises(ValueError, match="n_ctx"):
        Llama(n_ctx=-5)
    with pytest.raises(ValueError, match="lora_path"):
        Llama(lora_path="x.gguf")
    with pytest.raises(TypeError, match="lazy"):
        llm("Hi", lazy="yes")
    with pytest.raises(TypeError, match="recycle"):
        llm("Hi", recycle=LazyPrefill())
    with pytest.raises(ValueError, match="pruning layer"):
        llm("Hi", lazy=LazyPrefill(layers=(40,), keep=(0.5,)))
    with pytest.raises(ValueError, match="mirostat"):
        llm("Hi", mirostat_mode=2)


def test_prompt_over_context_raises_before_work(ref, llm):
    long_prompt = [42] * N_CTX
    with pytest.raises(ValueError, match="context window"):
        ref(long_prompt, max_tokens=4)
    before = llm.n_tokens
    with pytest.raises(ValueError, match=r"Requested tokens \(512\) exceed context window of 512"):
        llm(long_prompt, max_tokens=4)
    assert llm.n_tokens == before


def test_max_tokens_none_runs_to_context_end():
    # n_ctx 256 (llama.cpp pads contexts to 256) and a prompt 6 tokens short of it:
    # None, <= 0 and too many all mean "to the end of the context"
    n_ctx = 256
    ref = reference_llama(default_model_path(), n_ctx=n_ctx)
    small = Llama(n_ctx=n_ctx, verbose=False)
    try:
        numbers = ", ".join(str(i) for i in range(200)).encode()
        prompt = ref.tokenize(numbers, add_bos=False)[:n_ctx - 6]
        a = ref(prompt, max_tokens=None, temperature=0)
        assert a["usage"]["total_tokens"] == n_ctx and a["choices"][0]["finish_reason"] == "length"
        for limit in (None, 1000):   # (0 and negatives take None's branch)
            b = small(prompt, max_tokens=limit, temperature=0)
            assert text(b) == text(a) and b["usage"] == a["usage"]
    finally:
        ref.close()
        small.close()


def test_prefix_reuse_and_state_round_trip(llm, greedy):
    llm.reset()
    base = llm(PROMPTS[0], max_tokens=8, temperature=0)
    evaluated = llm.n_tokens                     # prompt + 7 (the last token is not evaluated)
    assert evaluated == base["usage"]["total_tokens"] - 1
    cont = llm.detokenize(llm.input_ids.tolist()).decode() + " Yes"
    reused = llm(cont, max_tokens=6, temperature=0)
    assert llm.stats["reused_tokens"] == 0   # only whole 512-token chunks of a prefill are kept
    state = llm.save_state()
    llm.reset()
    fresh = llm(cont, max_tokens=6, temperature=0)
    assert llm.stats["reused_tokens"] == 0 and text(fresh) == text(reused)
    after = text(llm(" More", max_tokens=6, temperature=0))
    llm.load_state(state)
    assert llm.n_tokens == state.n_tokens and llm.input_ids.tolist() == state.input_ids.tolist()
    assert text(llm(" More", max_tokens=6, temperature=0)) == after


def test_policies_per_call_and_defaults(llm, greedy):
    # Per-call policies reach the engine: pruning shows in computed_fraction, recycling in the step counts.
    llm(PROMPTS[0], max_tokens=16, temperature=0, lazy=LazyPrefill(layers=(0.5,), keep=(0.5,)),
        recycle=Recycle(k=4, stride=4))
    assert llm.stats["computed_fraction"] < 0.9
    assert llm.stats["recycled_steps"] > 0 and llm.stats["recycle_k"] == 4
    # A window larger than the whole text keeps every token: exactly full attention.
    out = llm(PROMPTS[0], max_tokens=32, temperature=0, recycle=StreamingWindow(sinks=4, window=4096))
    assert text(out) == text(greedy[0][1])
    assert llm.stats["computed_fraction"] == 1.0 and llm.stats["recycled_steps"] > 0


def test_seeded_sampling_is_reproducible(llm):
    kw = dict(max_tokens=12, temperature=0.9, top_k=0, top_p=1.0, min_p=0.0)
    a, b = llm(PROMPTS[2], seed=7, **kw), llm(PROMPTS[2], seed=7, **kw)
    assert text(a) == text(b)
    others = {text(llm(PROMPTS[2], seed=s, **kw)) for s in (1, 2, 3)}
    assert len(others | {text(a)}) > 1
