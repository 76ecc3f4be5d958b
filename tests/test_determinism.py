"""A call's result does not depend on what the cache held: the same call on a used `Llama` (same
prompt again, a prompt sharing a prefix, after reset() or load_state()) equals the call on a fresh
`Llama`, exactly (greedy text and logprobs), for full attention, lazy prefill, recycled attention and
the streaming window, with and without flash attention.

Why it needs care: ggml's kernels round a row differently by batch shape. The control test below
shows it: re-evaluating a prompt's last token alone, as prefix reuse used to, changes its logits.
"""
import numpy as np
import pytest

from pylazy import LazyPrefill, Llama, Recycle, StreamingWindow
from pylazy.engine import Context

PROMPT = ("The lighthouse keeper climbed the stairs every evening, counting the steps as his father "
          "had taught him. At the top he trimmed the wick, polished the great lens and watched the "
          "ships. One winter night a small boat appeared without lights, drifting towards the rocks. "
          "He rang the bell, lowered the lamp and shouted into the storm until the boat turned. "
          "In the morning the fishermen found the boat on the beach, empty but for a wet dog and a "
          "basket of apples. Nobody in the village knew where it had come from, and the keeper, who "
          "had never owned a dog, named him Lantern and taught him to climb the stairs. Lantern slept "
          "by the lamp through every storm that followed, and for years no ship was lost on the rocks. ")
POLICIES = {
    "full": dict(),
    "lazy": dict(lazy=LazyPrefill(layers=(0.5,), keep=(0.5,))),
    "recycled": dict(recycle=Recycle(k=16, stride=4)),
    "streaming": dict(recycle=StreamingWindow(sinks=4, window=32)),
}
GEN = dict(max_tokens=12, temperature=0, logprobs=3)


def _open(flash_attn, n_ubatch=64):
    # n_ubatch 64: the ~150-token prompts below prefill in two chunks and a partial one
    return Llama(n_ctx=512, n_batch=n_ubatch, n_ubatch=n_ubatch, flash_attn=flash_attn, verbose=False)


def _result(out):
    c = out["choices"][0]
    return c["text"], c["logprobs"]["token_logprobs"], c["logprobs"]["top_logprobs"]


@pytest.fixture(scope="module", params=[False, True], ids=["mulmat", "flash"])
def pair(request):
    """(a used Llama, a function that opens a fresh one) per attention path."""
    used = _open(request.param)
    yield used, lambda: _open(request.param)
    used.close()


def test_control_one_row_reevaluation_changes_logits(default_model_path):
    # What prefix reuse used to do with the same prompt: the last token alone, after the rest.
    llm = _open(True, n_ubatch=512)
    try:
        toks = llm.tokenize(PROMPT.encode() * 3)
        with Context(llm._model, n_ctx=512, n_ubatch=512, flash_attn=True) as ctx:
            whole = ctx.eval(toks)[0]
            ctx.reset()
            ctx.eval(toks[:-1])
            alone = ctx.eval(toks[-1:])[0]
    finally:
        llm.close()
    assert np.abs(whole - alone).max() > 1e-3


@pytest.mark.parametrize("policy", POLICIES)
def test_same_call_twice_equals_fresh(pair, policy):
    used, fresh = pair
    kw = dict(GEN, **POLICIES[policy])
    first = _result(used(PROMPT, **kw))
    second = _result(used(PROMPT, **kw))
    if policy in ("full", "recycled", "streaming"):
        assert used.stats["reused_tokens"] == len(used.tokenize(PROMPT.encode()))   # the prefill kept
    f = fresh()
    try:
        want = _result(f(PROMPT, **kw))
    finally:
        f.close()
    assert first == want and second == want
    assert len(want[0]) > 10


def test_shared_prefix_reuses_whole_chunks_only(pair):
    used, fresh = pair
    n_prompt = len(used.tokenize(PROMPT.encode()))
    used.reset()
    used(PROMPT, **GEN)
    # A prompt sharing the first ~130 tokens: whole 64-token chunks of the last prefill are kept.
    other = PROMPT[:-20] + "Then the sea was calm again, and"
    got = _result(used(other, **GEN))
    common = 0
    for a, b in zip(used.tokenize(PROMPT.encode()), used.tokenize(other.encode())):
        if a != b:
            break
        common += 1
    assert used.stats["reused_tokens"] == common // 64 * 64 == 128 and n_prompt > 128
    # A continuation of the conversation (prompt + reply + more): the reply's decoded rows are not kept.
    turn = other + got[0] + " The keeper"
    cont = _result(used(turn, **GEN))
    assert used.stats["reused_tokens"] == len(used.tokenize(other.encode())) // 64 * 64
    f = fresh()
    try:
        assert _result(f(other, **GEN)) == got
        f.reset()
        assert _result(f(turn, **GEN)) == cont
    finally:
        f.close()


def test_reset_and_load_state_equal_fresh(pair):
    used, fresh = pair
    used(PROMPT, **GEN)
    state = used.save_state()
    after_state = PROMPT + " Years later"
    used("Something else entirely.", **GEN)
    used.reset()
    a = _result(used(after_state, **GEN))
    used.load_state(state)
    b = _result(used(after_state, **GEN))
    assert used.stats["reused_tokens"] > 0
    f = fresh()
    try:
        want = _result(f(after_state, **GEN))
    finally:
        f.close()
    assert a == want and b == want


def test_streamed_equals_fresh_non_streamed(pair):
    used, fresh = pair
    used(PROMPT, **GEN)
    chunks = list(used(PROMPT, max_tokens=12, temperature=0, stream=True))
    f = fresh()
    try:
        want = f(PROMPT, max_tokens=12, temperature=0)["choices"][0]["text"]
    finally:
        f.close()
    assert "".join(c["choices"][0]["text"] for c in chunks) == want
