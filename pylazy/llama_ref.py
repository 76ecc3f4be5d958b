"""llama-cpp-python as the reference implementation (tests, benchmarks, eval).

`reference_llama()` builds a `llama_cpp.Llama` as a user gets it (`llama_cpp.Llama(path, ...)`,
llama.cpp's defaults), with one exception kept from this project's first machines: on CPUs whose
llama.cpp offers the AMX buffer type, llama.cpp 0.3.36 placed Q4_0/Q4_1/Q8_0 weights there and its AMX
matmul segfaulted in the first llama_decode (SIGSEGV in ggml_backend_amx_mul_mat). There, and only
there, the extra buffer types are turned off (and so in pylazy's engine: native/weights.cpp).
Re-checked on the current machines (AMD EPYC, AVX-512, no AMX): the extra types are CPU_REPACK only
and llama.cpp runs with them, so the reference keeps them, as pylazy does.
`use_extra_bufts=False` asks for plain CPU buffers explicitly (llama.cpp's model parameter).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import llama_cpp
import llama_cpp.llama_cpp as _api  # the module llama_cpp.Llama reads its defaults from


@contextlib.contextmanager
def _extra_bufts(enabled: bool):
    original = _api.llama_model_default_params

    def patched():
        params = original()
        params.use_extra_bufts = enabled
        return params

    _api.llama_model_default_params = patched
    try:
        yield
    finally:
        _api.llama_model_default_params = original


def amx_offered() -> bool:
    """Whether ggml's CPU backend offers the AMX buffer type here (the crash above)."""
    from .engine import cpu_extra_buffer_types   # imports the native library
    return "AMX" in cpu_extra_buffer_types()


def reference_llama(model_path: str, use_extra_bufts: Optional[bool] = None, **kwargs) -> "llama_cpp.Llama":
    """llama_cpp.Llama(model_path, **kwargs), quiet by default, that runs on this machine's CPU
    (extra buffer types as llama.cpp's default, off where AMX is offered; see module doc)."""
    kwargs.setdefault("verbose", False)
    if use_extra_bufts is None:
        use_extra_bufts = not amx_offered()
    with _extra_bufts(bool(use_extra_bufts)):
        return llama_cpp.Llama(model_path=model_path, **kwargs)
