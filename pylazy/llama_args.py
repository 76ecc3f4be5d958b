"""The checks `Llama()` and its calls run on llama-cpp-python's arguments before any work starts."""
from __future__ import annotations

from typing import Any, Dict, Tuple

import numpy as np

from .engine import KV_TYPE_NAMES, KV_TYPES, kv_type

# llama_cpp.Llama keywords accepted for drop-in use that change nothing here: placement,
# threading and memory mapping are the engine's choice, and it can always return logprobs.
_IGNORED_KWARGS = frozenset({
    "use_mmap", "use_mlock", "n_threads_batch", "offload_kqv",
    "op_offload", "swa_full", "no_perf", "numa", "logits_all",
})
# Keywords accepted only at their llama-cpp-python default: other values ask for features
# the engine does not have, and silently ignoring them would change results.
_DEFAULT_ONLY_KWARGS: Dict[str, Any] = {
    "vocab_only": False, "embedding": False, "kv_overrides": None,
    "rope_scaling_type": -1, "pooling_type": -1, "attention_type": -1,
    "rope_freq_base": 0.0, "rope_freq_scale": 0.0, "yarn_ext_factor": -1.0,
    "yarn_attn_factor": 1.0, "yarn_beta_fast": 32.0, "yarn_beta_slow": 1.0, "yarn_orig_ctx": 0,
    "lora_base": None, "lora_scale": 1.0, "lora_path": None, "draft_model": None,
    "tokenizer": None, "spm_infill": False,
}



def check_llama_kwargs(kwargs: Dict[str, Any]) -> None:
    """Llama()'s llama-cpp-python keywords beyond its own: ignored, default-only, or a TypeError."""
    for name, value in kwargs.items():
        if name in _IGNORED_KWARGS:
            continue
        if name not in _DEFAULT_ONLY_KWARGS:
            raise TypeError(f"Llama() got an unexpected keyword argument {name!r}")
        if value != _DEFAULT_ONLY_KWARGS[name]:
            raise ValueError(f"Llama({name}={value!r}) is not supported by pylazy "
                             f"(only the default {_DEFAULT_ONLY_KWARGS[name]!r})")


def structured_output(grammar: Any, response_format: Any) -> Any:
    """The grammar a call asks for: ``grammar`` or one made from ``response_format``."""
    from .grammar import grammar_for_response_format
    from_format = grammar_for_response_format(response_format)
    if from_format is not None and grammar is not None:
        raise ValueError("give grammar or a JSON response_format, not both")
    return grammar if from_format is None else from_format


def check_kv_types(flash_attn: Any, type_k: Any, type_v: Any) -> Tuple[int, int]:
    """(type_k, type_v) as ggml type ids, or a clear error before any model is loaded."""
    if not isinstance(flash_attn, (bool, np.bool_)):
        raise TypeError(f"flash_attn must be a bool, got {type(flash_attn).__name__}")
    k, v = kv_type(type_k, "type_k"), kv_type(type_v, "type_v")
    if v not in (KV_TYPES["f32"], KV_TYPES["f16"], KV_TYPES["bf16"]) and not flash_attn:
        raise ValueError(f"a quantized V cache (type_v={KV_TYPE_NAMES[v]}) needs flash_attn=True, as in llama.cpp")
    return k, v
