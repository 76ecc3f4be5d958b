"""KV cache types (type_k / type_v) and repacked weights against stock llama-cpp-python.

Files: tiny llamas (head size 64, so a quantized cache is rotated as in llama.cpp) quantized by
llama.cpp to Q4_0 and Q4_K_M, whose weights both engines repack (CPU_REPACK). Measured on this
machine: every comparison below is exact (max |logit diff| 0.0) - same kernels on both sides,
including llama.cpp's Walsh-Hadamard rotation of q/k/v with a quantized cache - so the bound is 0.
"""
import ctypes

import numpy as np
import pytest

import models.tiny as tiny
from pylazy import Llama
from pylazy.engine import KV_TYPES, Context, Model
from pylazy.policy import StepKind
from pylazy.llama_ref import amx_offered, reference_llama

MAX_ABS_DIFF = 0.0
THREADS = 1
N_CTX = 256
TOKENS = np.random.default_rng(5).integers(100, 40000, size=96).tolist()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import llama_cpp
    d = tmp_path_factory.mktemp("kv")
    src = tiny.make_tiny_model(d / "f32.gguf", arch="llama", n_embd=256, n_head=4, n_head_kv=2, n_ff=512,
                               n_layer=2, tied_output=True)
    out = {}
    for ftype in ("Q4_0", "Q4_K_M"):
        dst = d / f"{ftype}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
        params.nthread = 1
        assert llama_cpp.llama_model_quantize(src.encode(), str(dst).encode(), ctypes.byref(params)) == 0
        out[ftype] = str(dst)
    return out


def _ref_logits(path, tokens, flash_attn, type_k, type_v, use_extra_bufts=None):
    ref = reference_llama(path, n_ctx=N_CTX, n_batch=N_CTX, n_ubatch=N_CTX, logits_all=True, n_threads=THREADS,
                          flash_attn=flash_attn, type_k=KV_TYPES[type_k], type_v=KV_TYPES[type_v],
                          use_extra_bufts=use_extra_bufts)
    try:
        ref.eval(tokens)
        return np.array(ref.scores[: len(tokens)], dtype=np.float32)
    finally:
        ref.close()


@pytest.mark.parametrize("ftype,flash_attn,type_k,type_v", [
    ("Q4_0", False, "f16", "f16"),                                          # repacked weights
    ("Q4_0", True, "q8_0", "q8_0"), ("Q4_K_M", True, "q8_0", "q8_0"),      # + quantized KV (V needs flash)
    ("Q4_K_M", False, "q8_0", "f16"), ("Q4_0", True, "q4_0", "q4_0"),
])
def test_logits_equal_llama_cpp(files, ftype, flash_attn, type_k, type_v):
    path = files[ftype]
    want = _ref_logits(path, TOKENS, flash_attn, type_k, type_v)
    with Model(path, n_threads=THREADS) as m, \
            Context(m, n_ctx=N_CTX, flash_attn=flash_attn, type_k=type_k, type_v=type_v) as ctx:
        if not amx_offered():
            assert m.info.n_extra_tensors > 0 and m.info.extra_bufts == "CPU_REPACK"
        got = ctx.eval(TOKENS, all_logits=True)
        # the cache holds the model's K/V (dequantized, rotated back): layer 0's, which no earlier
        # attention over a quantized cache has touched, are an F16 cache's up to quantization
        k, v = ctx.read_kv(0, [0, 90])
    with Model(path, n_threads=THREADS) as m, Context(m, n_ctx=N_CTX, flash_attn=flash_attn) as ctx:
        ctx.eval(TOKENS)
        k16, v16 = ctx.read_kv(0, [0, 90])
    assert np.abs(got - want).max() <= MAX_ABS_DIFF and (got.argmax(1) == want.argmax(1)).all()
    rms = lambda x: float(np.sqrt(np.mean(np.square(x))))
    bound = {"f16": 1e-3, "q8_0": 0.02, "q4_0": 0.15}
    assert rms(k - k16) < bound[type_k] * rms(k16) and rms(v - v16) < bound[type_v] * rms(v16)


def test_repacking_off_equals_llama_cpp_off(files):
    path = files["Q4_K_M"]
    want = _ref_logits(path, TOKENS, False, "f16", "f16", use_extra_bufts=False)
    with Model(path, n_threads=THREADS, use_extra_bufts=False) as m, Context(m, n_ctx=N_CTX) as ctx:
        assert m.info.n_extra_tensors == 0 and m.info.extra_bufts == ""
        got = ctx.eval(TOKENS, all_logits=True)
    assert np.abs(got - want).max() <= MAX_ABS_DIFF


@pytest.mark.parametrize("flash_attn", [False, True])
def test_quantized_cache_under_lazy_and_recycled_attention(files, flash_attn):
    """Lazy prefill and recycled attention read a Q8_0 K cache (Q8_0 V with flash attention): a
    schedule that keeps everything and a recycled cache holding every token equal full attention."""
    kv = dict(flash_attn=flash_attn, type_k="q8_0", type_v="q8_0" if flash_attn else "f16")
    with Model(files["Q4_0"], n_threads=THREADS) as m:
        def run(schedule=(), k=0):
            with Context(m, n_ctx=N_CTX, **kv) as ctx:
                ctx.set_lazy(list(schedule))
                ctx.set_recycle(1 if k else 0, k, 4, 0, pool=1, share=0.5)
                out = [ctx.eval(TOKENS[:100])[0]]
                for i in range(12):
                    out.append(ctx.decode(int(out[-1].argmax()), StepKind.RECYCLED if i % 4 != 0 else StepKind.FULL)[0])
                return np.array(out), ctx.recycle_stats()
        full, _ = run()
        kept_all, _ = run([(0, 1.0)])
        big_k, st = run(k=4096)
        pruned, st2 = run([(0, 0.5)], k=16)      # a real selection and gather: runs, finite
    assert np.array_equal(full, kept_all) and np.array_equal(full, big_k)
    assert st["recycled_steps"] > 0 and st2["recycled_steps"] > 0 and np.isfinite(pruned).all()


def test_llama_kv_types_stats_and_bad_input(default_model_path):
    llm = Llama(n_ctx=256, flash_attn=True, type_k="q8_0", type_v=KV_TYPES["q8_0"], verbose=False)
    base = Llama(n_ctx=256, verbose=False)
    try:
        llm("Hello", max_tokens=2, temperature=0)
        base("Hello", max_tokens=2, temperature=0)
        assert llm.stats["kv_types"] == ("q8_0", "q8_0") and llm.stats["flash_attn"] is True
        assert base.stats["kv_types"] == ("f16", "f16") and base.stats["flash_attn"] is False
        assert llm.stats["kv_bytes"] * 64 == base.stats["kv_bytes"] * 34   # 34-byte blocks of 32 values
    finally:
        llm.close()
        base.close()
    with pytest.raises(ValueError, match="flash_attn=True"):
        Llama(n_ctx=256, type_v="q8_0", verbose=False)
    with pytest.raises(ValueError, match="not a supported KV cache type"):
        Llama(n_ctx=256, type_k="q3_k", verbose=False)
    with pytest.raises(ValueError, match="not a supported KV cache type"):
        Llama(n_ctx=256, type_k=10, verbose=False)      # GGML_TYPE_Q2_K
    with pytest.raises(TypeError, match="type_k"):
        Llama(n_ctx=256, type_k=True, verbose=False)
    with pytest.raises(TypeError, match="flash_attn"):
        Llama(n_ctx=256, flash_attn="yes", verbose=False)


def test_head_size_not_a_block_multiple_is_refused(tiny_model_path):
    # the default tiny model's heads have 16 values: no 32-value block fits
    with Model(tiny_model_path, n_threads=1) as m:
        with pytest.raises(ValueError, match="multiple of 32"):
            Context(m, n_ctx=64, type_k="q8_0")
        with Context(m, n_ctx=64, type_k="bf16", type_v="f32") as ctx:
            assert np.isfinite(ctx.eval([1, 2, 3])).all()
