"""Layers over several devices: the arguments that say how (llama-cpp-python's meanings), and
ggml's RPC backend (remote devices served by `pylazy rpc-server`).

Placement follows llama.cpp (native/devices.cpp): the device list is every RPC server's devices
(in the order given) then the local GPUs; ``n_gpu_layers`` counts the output head as one more layer
(-1: all), the first layers stay on the CPU and the rest are split over the devices in proportion to
``tensor_split`` (default: each device's free memory); ``split_mode=0`` (none) keeps only device
``main_gpu``; ``split_mode=2`` (row) splits by layers too, as llama.cpp does on devices without a
row-split buffer type. The input embeddings stay on the CPU; the head goes with the last layer.
"""
from __future__ import annotations

import math
import os
from numbers import Integral, Real
from typing import List, Optional, Sequence

from . import _native as N

LLAMA_SPLIT_MODE_NONE, LLAMA_SPLIT_MODE_LAYER, LLAMA_SPLIT_MODE_ROW = 0, 1, 2
MAX_DEVICES = 16   # llama_cpp.LLAMA_MAX_DEVICES: tensor_split's longest length
DEFAULT_RPC_PORT = 50052


def rpc_available() -> bool:
    """Whether this llama-cpp-python's ggml has the RPC backend (built with -DGGML_RPC=on)."""
    return bool(N.lib.plz_rpc_available())


def rpc_install_hint() -> str:
    return ('CMAKE_ARGS="-DGGML_RPC=on" pip install --no-cache-dir --force-reinstall --no-deps '
            'llama-cpp-python==0.3.36')


def rpc_server_list(value) -> List[str]:
    """rpc_servers as a list of "host:port": a list/tuple of them, or one comma-separated string
    (as llama-cpp-python once took it and llama.cpp's --rpc takes it); None or "" -> []."""
    if value is None:
        return []
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise TypeError(f"rpc_servers must be a list of 'host:port' strings or one comma-separated string, "
                        f"got {type(value).__name__}")
    out = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"rpc_servers entries must be 'host:port' strings, got {item!r}")
        item = item.strip()
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"RPC server {item!r} is not host:port")
        out.append(item)
    if len(out) > MAX_DEVICES:
        raise ValueError(f"at most {MAX_DEVICES} RPC servers")
    if out and not rpc_available():
        raise RuntimeError("rpc_servers needs llama-cpp-python built with ggml's RPC backend: " + rpc_install_hint())
    return out


def check_split(split_mode, main_gpu, tensor_split: Optional[Sequence[float]]) -> List[float]:
    """Validates split_mode / main_gpu / tensor_split as llama-cpp-python takes them; returns the
    proportions as floats ([] for None)."""
    for name, v in (("split_mode", split_mode), ("main_gpu", main_gpu)):
        if isinstance(v, bool) or not isinstance(v, Integral):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if int(split_mode) not in (LLAMA_SPLIT_MODE_NONE, LLAMA_SPLIT_MODE_LAYER, LLAMA_SPLIT_MODE_ROW):
        raise ValueError(f"split_mode must be 0 (none), 1 (layer) or 2 (row), got {split_mode}")
    if tensor_split is None:
        return []
    values = list(tensor_split)
    if len(values) > MAX_DEVICES:
        # llama-cpp-python's own message
        raise ValueError("Attempt to split tensors that exceed maximum supported devices. "
                         f"Current LLAMA_MAX_DEVICES={MAX_DEVICES}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(float(v)) or float(v) < 0:
            raise ValueError(f"tensor_split proportions must be finite numbers >= 0, got {v!r}")
        out.append(float(v))
    return out


def rpc_probe(endpoint: str, timeout: float = 5.0) -> Optional[str]:
    """None when endpoint answers ggml-rpc's HELLO at this build's version within timeout seconds,
    else the reason it does not."""
    code = N.lib.plz_rpc_probe(endpoint.encode(), max(1, int(timeout * 1000)))
    return None if code == N.PLZ_OK else N.last_error()


def rpc_timeout_default() -> float:
    """Seconds to connect to an RPC server at load ($PYLAZY_RPC_TIMEOUT, default 5)."""
    try:
        return max(0.1, float(os.environ.get("PYLAZY_RPC_TIMEOUT", "5")))
    except ValueError:
        return 5.0
