"""Shared test setup: repo root importable, the default model, one tiny random model,
the `slow` marker, and a llama.cpp opener for comparisons."""
import os
import sys
from pathlib import Path

# Single-threaded BLAS for the numpy reference: on 2 busy cores OpenBLAS's worker threads
# spin and made the SmolLM2 reference forward 5x slower (2.3 s vs 0.44 s CPU). Set before
# numpy is imported; an explicit setting in the environment wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# `pylazy tune` profiles in the user's cache would change what Llama() defaults to; tests that
# need profiles point PYLAZY_PROFILES at a temporary folder themselves.
os.environ["PYLAZY_PROFILES"] = "off"

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from models.tiny import DEFAULT_MODEL_PATH, finish as finish_gguf, make_tiny_model  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~20 s; CI deselects it (-m 'not slow')")


def open_llama_cpp(path, *, n_ctx=256, kv_type="f16", vocab_only=False, flash_attn=False):
    """llama_cpp.Llama for comparisons with the numpy reference: all logits kept, quiet,
    f16 or f32 KV cache, no flash attention by default (tests/reference.py's ggml_rounding
    mimics that path). Built through pylazy.llama_ref.reference_llama, which turns off
    llama.cpp's extra buffer types: their AMX matmul segfaults on this machine's CPU."""
    import llama_cpp.llama_cpp as lib
    from pylazy.llama_ref import reference_llama

    kv = {"f16": lib.GGML_TYPE_F16, "f32": lib.GGML_TYPE_F32}[kv_type]
    return reference_llama(
        str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, type_k=kv, type_v=kv,
        vocab_only=vocab_only, flash_attn=flash_attn, n_threads=min(4, os.cpu_count() or 1),
    )


@pytest.fixture(scope="session")
def default_model_path():
    if not Path(DEFAULT_MODEL_PATH).exists():
        pytest.skip(f"default model not found: {DEFAULT_MODEL_PATH}")
    return DEFAULT_MODEL_PATH


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """Default tiny model: llama arch, 4 layers, n_embd 64, 4/2 heads, f32, untied, seed 0."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-f32.gguf")


@pytest.fixture(scope="session")
def open_llama():
    """The open_llama_cpp function above, for tests that compare with llama.cpp."""
    pytest.importorskip("llama_cpp")
    return open_llama_cpp


@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    """(engine Model, hparams, float weights) of the tiny model, for tests against tests/reference.py."""
    from models.tiny import load_tiny_weights
    from pylazy.engine import Model

    hp, w = load_tiny_weights(tiny_model_path)
    m = Model(tiny_model_path, n_threads=2)
    yield m, hp, w
    m.close()


def write_stub_gguf(path, arch, **hparams):
    """A minimal GGUF of `arch` with one 16x8 embedding and the given {arch}.* integer keys."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    for key, value in hparams.items():
        w.add_uint32(f"{arch}.{key}", value)
    w.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    return finish_gguf(w, path)


@pytest.fixture(scope="module")
def ref():
    """Stock llama_cpp.Llama on the default model with its defaults (pylazy.Llama's too), n_ctx 512;
    logits_all for logprobs (greedy text is the same without it)."""
    from pylazy.llama_ref import reference_llama
    from pylazy.models import default_model_path
    r = reference_llama(default_model_path(), n_ctx=512, logits_all=True)
    yield r
    r.close()


@pytest.fixture(scope="module")
def llm():
    """pylazy.Llama on the default model, n_ctx 512, its defaults."""
    from pylazy import Llama
    m = Llama(n_ctx=512, verbose=False)
    yield m
    m.close()
