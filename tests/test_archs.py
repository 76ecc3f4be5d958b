"""Architectures llama, qwen2 (q/k/v biases, NEOX RoPE) and qwen3 (per-head q/k RMSNorm, head size
from attention.key_length), and the common weight types, against llama.cpp on tiny random models.

Both sides run the same attention path (llama.cpp's default without flash attention unless a test
says flash_attn=True) and llama.cpp's default CPU weight buffers (repacked Q4_0 / Q4_K / IQ4_NL);
measured here every case below gives identical logits (max |diff| 0.0), so MAX_ABS_DIFF is a bound,
not a tolerance for another kernel.
K-quants: gguf.quants cannot quantize them, so llama.cpp's own quantizer writes a Q4_K_M file.
"""
import ctypes

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT

import models.tiny as tiny
from tests.conftest import write_stub_gguf
from pylazy.engine import Context, Model
from pylazy.errors import ModelLoadError
from pylazy.gguf_check import check_gguf
from pylazy.llama_ref import reference_llama

MAX_ABS_DIFF = 1e-3   # measured 0.0 for every arch and weight type below
THREADS = 1   # tiny models: a second thread only adds barrier waits (very slow on busy cores)
N_CTX = 256
TOKENS = np.random.default_rng(0).integers(100, 40000, size=96).tolist()
# Block quant types gguf.quants writes, beyond the ones models/tiny.py knows.
EXTRA_WTYPES = {"q4_0": (GT.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
                "q5_0": (GT.Q5_0, gguf.LlamaFileType.MOSTLY_Q5_0),
                "q5_1": (GT.Q5_1, gguf.LlamaFileType.MOSTLY_Q5_1)}


def _compare(path, tokens=TOKENS, flash_attn=False):
    """(max |logit diff|, top-1 agreement) of pylazy vs llama.cpp over every position."""
    ref = reference_llama(str(path), n_ctx=N_CTX, n_batch=N_CTX, n_ubatch=N_CTX, logits_all=True,
                          flash_attn=flash_attn, n_threads=THREADS)
    ref.eval(tokens)
    want = np.array(ref.scores[: len(tokens)], dtype=np.float32)
    ref.close()
    with Model(str(path), n_threads=THREADS) as m, Context(m, n_ctx=N_CTX, flash_attn=flash_attn) as ctx:
        got = ctx.eval(tokens, all_logits=True)
    return float(np.abs(got - want).max()), float((got.argmax(1) == want.argmax(1)).mean())


def _assert_matches(path, flash_attn=False):
    diff, top1 = _compare(path, flash_attn=flash_attn)
    assert top1 == 1.0 and diff <= MAX_ABS_DIFF, (path, diff, top1)


@pytest.mark.parametrize("arch,flash_attn", [("llama", False), ("qwen2", False), ("qwen3", False), ("qwen3", True)])
def test_arch_f32_matches_llama_cpp(tmp_path, arch, flash_attn):
    path = tiny.make_tiny_model(tmp_path / f"{arch}.gguf", arch=arch, n_layer=3)
    info = check_gguf(path, supported_archs=("llama", "qwen2", "qwen3"))
    assert info.arch == arch and info.hparams["head_dim"] == 16
    with Model(path, n_threads=THREADS) as m:
        assert m.info.arch == arch
    _assert_matches(path, flash_attn)


# each type on one arch, spread so every arch meets quantized weights
@pytest.mark.parametrize("wtype,arch", [("f16", "qwen3"), ("q8_0", "qwen2"), ("q4_1", "llama"),
                                        ("q4_0", "qwen3"), ("q5_0", "qwen2"), ("q5_1", "qwen3")])
def test_weight_type_matches_llama_cpp(tmp_path, monkeypatch, wtype, arch):
    for name, types in EXTRA_WTYPES.items():
        monkeypatch.setitem(tiny._WTYPES, name, types)
    path = tiny.make_tiny_model(tmp_path / f"{wtype}.gguf", arch=arch, wtype=wtype, n_layer=2, tied_output=True)
    qtype = tiny._WTYPES[wtype][0]
    assert GT(check_gguf(path, supported_archs=("llama", "qwen2", "qwen3")).tensors["blk.0.attn_q.weight"].ggml_type) == qtype
    _assert_matches(path)


# Files as users download them: llama.cpp's own quantizer, so every tensor gets the type (and the
# fallbacks) a real Q*_K / IQ4 / BF16 file has. `expect` must be among the weight types found.
@pytest.mark.parametrize("ftype,expect,flash_attn", [
    ("Q4_K_M", {"Q4_K", "Q6_K"}, False), ("Q4_K_M", {"Q4_K", "Q6_K"}, True), ("Q2_K", {"Q2_K"}, False),
    ("Q3_K_M", {"Q3_K"}, False), ("Q5_K_M", {"Q5_K"}, False), ("Q6_K", {"Q6_K"}, False), ("IQ4_NL", {"IQ4_NL"}, False),
    ("IQ4_XS", {"IQ4_XS"}, False), ("BF16", {"BF16"}, False)])
def test_llama_cpp_quantized_files_match(tmp_path, ftype, expect, flash_attn):
    import llama_cpp

    src = tiny.make_tiny_model(tmp_path / "f32.gguf", arch="qwen3", n_embd=256, n_ff=512, n_layer=2, tied_output=True)
    dst = tmp_path / f"{ftype}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = THREADS
    assert llama_cpp.llama_model_quantize(src.encode(), str(dst).encode(), ctypes.byref(params)) == 0
    types = {GT(t.ggml_type).name for t in check_gguf(str(dst), supported_archs=("qwen3",)).tensors.values()}
    assert expect <= types, types
    _assert_matches(dst, flash_attn)


def _write_model(path, arch, *, n_embd=64, n_head=4, n_head_kv=2, head_dim=None, n_ff=128, n_layer=2,
                 rope_freqs=False, drop=(), reshape=None):
    """A tied-output model with an explicit head size (key_length/value_length written when given),
    optionally llama3's rope_freqs tensor; `drop` leaves tensors out, `reshape` overrides shapes."""
    rng, rng_freqs = np.random.default_rng(1), np.random.default_rng(2)   # same weights with or without rope_freqs
    D = head_dim or n_embd // n_head
    shapes = {"token_embd.weight": (49152, n_embd), "output_norm.weight": (n_embd,)}
    if rope_freqs:
        shapes["rope_freqs.weight"] = (D // 2,)
    for il in range(n_layer):
        p = f"blk.{il}."
        shapes.update({p + "attn_norm.weight": (n_embd,), p + "attn_q.weight": (n_head * D, n_embd),
                       p + "attn_k.weight": (n_head_kv * D, n_embd), p + "attn_v.weight": (n_head_kv * D, n_embd),
                       p + "attn_output.weight": (n_embd, n_head * D), p + "ffn_norm.weight": (n_embd,),
                       p + "ffn_gate.weight": (n_ff, n_embd), p + "ffn_up.weight": (n_ff, n_embd),
                       p + "ffn_down.weight": (n_embd, n_ff)})
        if arch == "qwen2":
            shapes.update({p + "attn_q.bias": (n_head * D,), p + "attn_k.bias": (n_head_kv * D,),
                           p + "attn_v.bias": (n_head_kv * D,)})
        if arch == "qwen3":
            shapes.update({p + "attn_q_norm.weight": (D,), p + "attn_k_norm.weight": (D,)})
    shapes.update(reshape or {})
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(4096)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    if head_dim:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    for key, value, vtype, sub_type in tiny._tokenizer_fields(tiny.DEFAULT_MODEL_PATH):
        w.add_key_value(key, value, vtype, sub_type=sub_type)
    for name, shape in shapes.items():
        if name in drop:
            continue
        if name == "rope_freqs.weight":   # divisors of the rotation frequencies, in [1, 4]
            arr = 1.0 + 3.0 * rng_freqs.random(shape)
        elif len(shape) == 1:             # norms and biases near 1
            arr = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            arr = rng.standard_normal(shape) * (1.5 if "attn_q" in name or "attn_k" in name else 0.8) / np.sqrt(shape[1])
        w.add_tensor(name, arr.astype(np.float32))
    return tiny.finish(w, path)


def test_qwen3_head_size_from_key_length(tmp_path):
    # n_head * head_dim = 128 != n_embd 64: wq is [64, 128], wo [128, 64]
    path = _write_model(tmp_path / "wide.gguf", "qwen3", head_dim=32)
    with Model(path, n_threads=THREADS) as m:
        assert (m.info.head_dim, m.info.n_embd, m.info.n_head) == (32, 64, 4)
    _assert_matches(path)


def test_llama_rope_freqs_match_llama_cpp(tmp_path):
    path = _write_model(tmp_path / "rope_freqs.gguf", "llama", rope_freqs=True)
    diff, top1 = _compare(path)
    assert top1 == 1.0 and diff <= MAX_ABS_DIFF, (diff, top1)
    # the divisors matter: the same weights without them give other logits
    plain = _write_model(tmp_path / "plain.gguf", "llama")
    with Model(path, n_threads=THREADS) as a, Model(plain, n_threads=THREADS) as b, \
            Context(a, n_ctx=N_CTX) as ca, Context(b, n_ctx=N_CTX) as cb:
        assert np.abs(ca.eval(TOKENS) - cb.eval(TOKENS)).max() > 1e-2


@pytest.mark.parametrize("arch,kwargs,match", [
    ("qwen3", dict(drop=("blk.1.attn_k_norm.weight",)), "blk.1.attn_k_norm.weight.*missing"),
    ("qwen2", dict(reshape={"blk.0.attn_k.bias": (64,)}), "blk.0.attn_k.bias.*shape"),
    ("qwen3", dict(reshape={"blk.0.attn_q_norm.weight": (32,)}), "blk.0.attn_q_norm.weight.*shape"),
    ("llama", dict(reshape={"blk.0.attn_q_norm.weight": (16,)}), "attn_q_norm.weight.*not part of a llama"),
])
def test_bad_arch_tensors_raise(tmp_path, arch, kwargs, match):
    path = _write_model(tmp_path / "bad.gguf", arch, **kwargs)
    with pytest.raises(ModelLoadError, match=match):
        Model(path)


def test_unsupported_arch_and_type_raise(tmp_path):
    from pylazy import _native as N

    p = write_stub_gguf(tmp_path / "gemma2.gguf", "gemma2", block_count=1)
    with pytest.raises(ModelLoadError, match="unsupported architecture 'gemma2'"):
        Model(p)
    # the native loader refuses it too, should anything reach it unchecked
    h = ctypes.c_void_p()
    params = N.ModelParams(0, 1)
    assert N.lib.plz_model_load(str(p).encode(), ctypes.byref(params), ctypes.byref(h)) == N.PLZ_ERR_LOAD
    assert "gemma2" in N.last_error()

    # A weight stored as I32 (same size as F32, so the file stays consistent) and an unknown type id.
    src = _write_model(tmp_path / "ok.gguf", "qwen2")
    entry = dict(check_gguf(src, supported_archs=("qwen2",)).layout)["tensor:blk.0.attn_q.weight"]
    type_at = entry + 8 + len("blk.0.attn_q.weight") + 4 + 2 * 8   # name, n_dims, 2 dims
    raw = bytearray(open(src, "rb").read())
    assert int.from_bytes(raw[type_at:type_at + 4], "little") == GT.F32
    for type_id, match in ((GT.I32, "type I32 cannot hold weights"), (4, "unknown ggml type 4")):
        raw[type_at:type_at + 4] = int(type_id).to_bytes(4, "little")
        bad = tmp_path / f"type{int(type_id)}.gguf"
        bad.write_bytes(bytes(raw))
        with pytest.raises(ModelLoadError, match=match):
            Model(str(bad))


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_lazy_keep_all_equals_full_attention(tmp_path, arch):
    path = tiny.make_tiny_model(tmp_path / f"{arch}.gguf", arch=arch)   # 4 layers: one per stage
    # Set directly: LazyPrefill.resolve drops keep=1.0 entries as no-ops, which would test nothing.
    schedule = [(0, 1.0), (1, 1.0), (2, 1.0)]
    prompt = np.random.default_rng(2).integers(100, 40000, size=150).tolist()
    outs = []
    with Model(path, n_threads=THREADS) as m:
        for sched in ([], schedule):
            with Context(m, n_ctx=256, n_ubatch=32) as ctx:
                ctx.set_lazy(sched)
                seq = [ctx.eval(prompt)[0]]
                for _ in range(8):
                    seq.append(ctx.eval([int(seq[-1].argmax())])[0])
                outs.append(np.array(seq))
    assert np.array_equal(outs[0], outs[1])
