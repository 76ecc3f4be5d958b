"""llama-cpp-python as the reference implementation (tests, benchmarks, eval).

`reference_llama()` builds a `llama_cpp.Llama` with llama.cpp's *extra buffer types* off. On CPUs that
report AMX (these machines do), llama.cpp 0.3.36 places Q4_0/Q4_1/Q8_0 weights in its AMX buffer type
and its AMX matmul segfaults in the first llama_decode here (seen: SIGSEGV in ggml_backend_amx_mul_mat).
Without extra buffers llama.cpp runs its ordinary CPU kernels — the same path pylazy's engine uses.
"""
from __future__ import annotations

import contextlib

import llama_cpp
import llama_cpp.llama_cpp as _api  # the module llama_cpp.Llama reads its defaults from


@contextlib.contextmanager
def _no_extra_bufts():
    original = _api.llama_model_default_params

    def patched():
        params = original()
        params.use_extra_bufts = False
        return params

    _api.llama_model_default_params = patched
    try:
        yield
    finally:
        _api.llama_model_default_params = original


def reference_llama(model_path: str, **kwargs) -> "llama_cpp.Llama":
    """llama_cpp.Llama(model_path, **kwargs) that runs on this machine's CPU (see module doc)."""
    kwargs.setdefault("verbose", False)
    with _no_extra_bufts():
        return llama_cpp.Llama(model_path=model_path, **kwargs)
