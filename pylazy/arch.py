"""The supported architectures and their tensors, as the engine's table says (native/arch.cpp).

One table serves the native loader, the file checks (pylazy.gguf_check), the test models
(models/tiny.py) and the numpy reference (tests/reference.py); this module reads it once
through the C API. Reading it loads libpylazy (and llama_cpp) on first use, not on import.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, FrozenSet, Mapping, Tuple


@dataclass(frozen=True)
class TensorSpec:
    """One tensor an architecture's graph may read."""

    name: str                  # per-layer tensors: after "blk.<il>."
    per_layer: bool
    dims: Tuple[str, str]      # ggml shape [ne0, ne1] as hyper-parameter names ("1": none)
    present: FrozenSet[str]    # the archs that have it, required or optional
    required: FrozenSet[str]   # the archs that must have it

    def full_name(self, il: int = 0) -> str:
        return f"blk.{il}.{self.name}" if self.per_layer else self.name


@dataclass(frozen=True)
class ArchTable:
    archs: Tuple[str, ...]
    rope_neox: Mapping[str, bool]
    tensors: Tuple[TensorSpec, ...]   # in the order test models write them


@lru_cache(maxsize=1)
def table() -> ArchTable:
    from . import _native as N
    lib = N.lib
    archs = tuple(lib.plz_arch_name(i).decode() for i in range(lib.plz_arch_count()))

    def names(mask: int) -> FrozenSet[str]:
        return frozenset(a for i, a in enumerate(archs) if mask >> i & 1)

    tensors = []
    for i in range(lib.plz_arch_tensor_count()):
        raw = N.ArchTensorInfo()
        if lib.plz_arch_tensor(i, ctypes.byref(raw)) != N.PLZ_OK:
            raise RuntimeError(f"architecture table row {i} unreadable")
        tensors.append(TensorSpec(raw.name.decode(), bool(raw.per_layer),
                                  (N.PLZ_DIMS[raw.ne[0]], N.PLZ_DIMS[raw.ne[1]]),
                                  names(raw.present), names(raw.required)))
    rope = {a: bool(lib.plz_arch_rope_neox(i)) for i, a in enumerate(archs)}
    return ArchTable(archs, rope, tuple(tensors))


def supported_archs() -> Tuple[str, ...]:
    return table().archs


def dim_sizes(hp: Mapping[str, int], n_vocab: int) -> Dict[str, int]:
    """The size of every table dimension for hyper-parameters hp (n_embd, n_ff, head_dim,
    n_head, n_head_kv; n_rot, default head_dim)."""
    hd = hp["head_dim"]
    return {"1": 1, "n_embd": hp["n_embd"], "n_vocab": n_vocab, "n_ff": hp["n_ff"], "head_dim": hd,
            "q": hd * hp["n_head"], "kv": hd * hp["n_head_kv"], "rope_half": hp.get("n_rot", hd) // 2}


def tensor_shapes(arch: str, hp: Mapping[str, int], n_vocab: int) -> Dict[str, Tuple[Tuple[int, ...], bool]]:
    """name -> (ggml shape, required) for every tensor of `arch` with hp["n_layer"] layers
    (vectors as 1-tuples)."""
    size = dim_sizes(hp, n_vocab)
    out: Dict[str, Tuple[Tuple[int, ...], bool]] = {}
    for spec in table().tensors:
        if arch not in spec.present:
            continue
        shape = (size[spec.dims[0]],) if spec.dims[1] == "1" else (size[spec.dims[0]], size[spec.dims[1]])
        for il in range(hp["n_layer"] if spec.per_layer else 1):
            out[spec.full_name(il)] = (shape, arch in spec.required)
    return out

