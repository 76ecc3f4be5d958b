"""Engine objects that own native handles: `Model` (weights) and `Context` (KV cache, graphs).

These are the low-level API; `pylazy.Llama` is the llama-cpp-python-like class on top.
Every handle is freed exactly once (close() or the context manager; __del__ as a last resort),
and any call after close() raises a clear error instead of touching freed memory.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from enum import IntEnum
from typing import List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from . import _native as N
from .arch import supported_archs
from .errors import ContextOverflowError, ModelLoadError, PylazyError, RpcConnectionError
from .gguf_check import check_gguf
from .policy import StepKind

SUPPORTED_ARCHS = supported_archs()   # the engine's architecture table (native/arch.cpp)


class RecycleMode(IntEnum):
    """What the recycled cache holds (plz_set_recycle's mode)."""

    OFF = N.PLZ_RECYCLE_OFF        # no recycled cache: every decode step attends to everything
    TOPK = N.PLZ_RECYCLE_TOPK      # per layer and KV head the top-k tokens by attention (Recycle)
    WINDOW = N.PLZ_RECYCLE_WINDOW  # sinks + the most recent window (StreamingWindow)


class RecycleConfig(NamedTuple):
    """Context.set_recycle's arguments (pylazy.generate.recycle_config makes one from a policy)."""

    mode: RecycleMode = RecycleMode.OFF
    k: int = 0
    tail: int = 0
    sinks: int = 0
    pool: int = 0
    share: float = 0.0


# The engine's code of each decode step kind (PLZ_STEP_*).
_STEP_CODES = {StepKind.FULL: N.PLZ_STEP_FULL, StepKind.RECYCLED: N.PLZ_STEP_RECYCLED,
               StepKind.SELECT: N.PLZ_STEP_SELECT}

# KV cache types (ggml_type values, as llama-cpp-python's type_k / type_v take them, e.g.
# llama_cpp.GGML_TYPE_Q8_0 == 8) and their names.
KV_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30}
KV_TYPE_NAMES = {v: k for k, v in KV_TYPES.items()}


def kv_type(value, which: str = "type_k") -> int:
    """A KV cache type given as a ggml_type int, a name ("q8_0") or None (F16) -> its ggml_type value."""
    if value is None:
        return KV_TYPES["f16"]
    if isinstance(value, str):
        key = value.strip().lower()
        if key not in KV_TYPES:
            raise ValueError(f"{which}={value!r} is not a supported KV cache type ({', '.join(KV_TYPES)})")
        return KV_TYPES[key]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{which} must be a ggml type id (int), a type name or None, got {type(value).__name__}")
    if int(value) not in KV_TYPE_NAMES:
        raise ValueError(f"{which}={value!r} is not a supported KV cache type; supported ggml types: "
                         + ", ".join(f"{n} ({i})" for n, i in KV_TYPES.items()))
    return int(value)


def cpu_extra_buffer_types() -> List[str]:
    """Names of the CPU backend's extra (repacked) buffer types on this machine, e.g. ["CPU_REPACK"]."""
    buf = ctypes.create_string_buffer(256)
    N.lib.plz_cpu_extra_bufts(buf, len(buf))
    return [n for n in buf.value.decode().split(",") if n]


def extra_bufts_default() -> bool:
    """Whether weights go to the CPU's extra buffer types unless told: yes, as llama.cpp, unless the
    environment says PYLAZY_EXTRA_BUFTS=0."""
    return os.environ.get("PYLAZY_EXTRA_BUFTS", "1") != "0"


def _raise_for(code: int, what: str, model_handle=None) -> None:
    if code == N.PLZ_OK:
        return
    msg = f"{what}: {N.last_error()}"
    if model_handle is not None and N.lib.plz_model_lost(model_handle):
        raise RpcConnectionError(msg)
    if "RPC server" in msg or "RPC backend: " in msg:   # native/rpc.cpp's messages
        raise RpcConnectionError(msg)
    if code == N.PLZ_ERR_LOAD:
        raise ModelLoadError(msg)
    if code == N.PLZ_ERR_ARG:
        raise ValueError(msg)
    if code == N.PLZ_ERR_CONTEXT:
        raise ContextOverflowError(msg)
    raise PylazyError(msg)


@dataclass(frozen=True)
class ModelInfo:
    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_ctx_train: int
    rms_eps: float
    rope_base: float
    rope_freq_scale: float
    rope_dim: int
    tied_output: bool
    on_gpu: bool
    weight_bytes: int
    backend: str
    n_swa: int            # sliding window of gemma3's SWA layers; 0: all layers attend globally
    n_swa_layers: int
    n_extra_tensors: int  # weights in an extra (repacked) CPU buffer type
    extra_bufts: str      # their buffer types' names, comma-separated


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def _i32p(a: np.ndarray):
    return a.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))


def _f32p(a: np.ndarray):
    return a.ctypes.data_as(ctypes.POINTER(ctypes.c_float))


class _Owned:
    """A native handle freed exactly once: close(), the context manager, or (last resort) __del__."""

    def swa_layers(self) -> List[bool]:
        """Per layer: True where it attends over a sliding window only (gemma3)."""
        flags = np.zeros(self.info.n_layer, dtype=np.int32)
        _raise_for(N.lib.plz_model_swa_layers(self._h, _i32p(flags)), "swa layers")
        return [bool(f) for f in flags]

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class Model(_Owned):
    """Weights of one GGUF file, its layers placed as llama.cpp places them (all on the offload
    devices by default: n_gpu_layers=-1).

    n_gpu_layers, split_mode, main_gpu, tensor_split: llama.cpp's meanings (pylazy.devices);
    rpc_servers: "host:port" list (or comma string) of `pylazy rpc-server`s whose devices come
    first in the device list; rpc_timeout: seconds to connect to each (None: $PYLAZY_RPC_TIMEOUT or 5).
    use_extra_bufts: on the CPU, weights go to the extra (repacked) buffer types llama.cpp puts them
    in (None: yes unless PYLAZY_EXTRA_BUFTS=0)."""

    def __init__(self, path: str, *, n_gpu_layers: int = -1, n_threads: Optional[int] = None,
                 use_extra_bufts: Optional[bool] = None, split_mode: int = 1, main_gpu: int = 0,
                 tensor_split: Optional[Sequence[float]] = None, rpc_servers=None, rpc_timeout: Optional[float] = None):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ModelLoadError(f"model file not found: {path!r}")
        self.path = path
        self._h = ctypes.c_void_p()
        # Every header field, tensor extent and vocabulary entry is checked in Python first: ggml's
        # and libllama's loaders abort the process on some malformed files.
        self.gguf = check_gguf(path, supported_archs=SUPPORTED_ARCHS)
        if use_extra_bufts is None:
            use_extra_bufts = extra_bufts_default()
        from .devices import check_split, rpc_server_list, rpc_timeout_default
        servers = rpc_server_list(rpc_servers)
        rpc_timeout = rpc_timeout_default() if rpc_timeout is None else float(rpc_timeout)
        split = check_split(split_mode, main_gpu, tensor_split)
        self.rpc_servers = servers
        splits = (ctypes.c_float * len(split))(*split)
        params = N.ModelParams(int(n_gpu_layers), int(n_threads or default_threads()), int(bool(use_extra_bufts)),
                               int(split_mode), int(main_gpu), splits, len(split),
                               ",".join(servers).encode() if servers else None, max(1, int(rpc_timeout * 1000)))
        _raise_for(N.lib.plz_model_load(path.encode(), ctypes.byref(params), ctypes.byref(self._h)),
                   f"cannot load {path!r}")
        raw = N.ModelInfo()
        _raise_for(N.lib.plz_model_get_info(self._h, ctypes.byref(raw)), "model info")
        self.info = ModelInfo(**{
            f: (getattr(raw, f).decode() if isinstance(getattr(raw, f), bytes) else getattr(raw, f))
            for f, _ in N.ModelInfo._fields_
        })
        self._contexts: list = []

    @property
    def handle(self) -> ctypes.c_void_p:
        if self._h is None or not self._h:
            raise PylazyError("model is closed")
        return self._h

    def layer_devices(self) -> List[str]:
        """The backend holding each layer's weights, then the output head's (n_layer + 1 names)."""
        buf = ctypes.create_string_buffer(256)
        out = []
        for il in range(self.info.n_layer + 1):
            _raise_for(min(0, N.lib.plz_model_layer_device(self.handle, il, buf, len(buf))), "layer_device")
            out.append(buf.value.decode())
        return out

    def devices(self) -> List[str]:
        """The offload devices the layers were split over (llama.cpp's order: RPC servers', then GPUs)."""
        buf = ctypes.create_string_buffer(4096)
        N.lib.plz_model_devices(self.handle, buf, len(buf))
        return [d for d in buf.value.decode().split(",") if d]

    @property
    def lost(self) -> bool:
        """True once an RPC connection of this model was lost (it cannot run any more)."""
        return bool(self._h) and bool(N.lib.plz_model_lost(self._h))

    def close(self) -> None:
        if getattr(self, "_h", None):
            for c in list(self._contexts):
                c.close()
            N.lib.plz_model_free(self._h)
        self._h = None


class Context(_Owned):
    """A conversation's state: KV cache and position. eval() appends tokens and returns logits.

    flash_attn: flash attention, else llama.cpp's default mul_mat + softmax attention (False, as
    llama-cpp-python). type_k / type_v: KV cache types (see kv_type; None: F16); a quantized V needs
    flash_attn, as in llama.cpp."""

    def __init__(self, model: Model, *, n_ctx: int = 0, n_ubatch: int = 512, n_threads: Optional[int] = None,
                 flash_attn: bool = False, type_k=None, type_v=None):
        if int(n_ctx) < 0:
            raise ValueError(f"n_ctx must be >= 0 (0 = the model's training context), got {n_ctx}")
        if int(n_ubatch) < 1:
            raise ValueError(f"n_ubatch must be >= 1, got {n_ubatch}")
        self.model = model
        self.n_vocab = model.info.n_vocab
        self.n_ctx = int(n_ctx) or model.info.n_ctx_train
        self.lazy_schedule: list = []
        self.lazy_pool = 0
        self.lazy_window = 1
        self.recycle_config = RecycleConfig()   # what set_recycle last set
        self.n_ubatch = int(n_ubatch)
        self.flash_attn = bool(flash_attn)
        self.type_k, self.type_v = kv_type(type_k, "type_k"), kv_type(type_v, "type_v")
        if self.type_v not in (KV_TYPES["f32"], KV_TYPES["f16"], KV_TYPES["bf16"]) and not self.flash_attn:
            raise ValueError(f"a quantized V cache (type_v={KV_TYPE_NAMES[self.type_v]}) needs flash_attn=True, "
                             "as in llama.cpp")
        self._h = ctypes.c_void_p()
        params = N.ContextParams(self.n_ctx, int(n_ubatch), int(n_threads or 0), int(self.flash_attn),
                                 self.type_k, self.type_v)
        _raise_for(N.lib.plz_context_new(model.handle, ctypes.byref(params), ctypes.byref(self._h)), "cannot create context")
        model._contexts.append(self)

    @property
    def handle(self) -> ctypes.c_void_p:
        if self._h is None or not self._h:
            raise PylazyError("context is closed")
        return self._h

    @property
    def n_past(self) -> int:
        return N.lib.plz_n_past(self.handle)

    def eval(self, tokens: Sequence[int], *, all_logits: bool = False) -> np.ndarray:
        """Computes tokens after the current position; returns logits [n or 1, n_vocab] (float32)."""
        toks = np.ascontiguousarray(np.asarray(tokens, dtype=np.int64))
        if toks.ndim != 1 or toks.size == 0:
            raise ValueError("tokens must be a non-empty 1-D sequence of ints")
        if toks.min() < 0 or toks.max() >= self.n_vocab:
            raise ValueError(f"token ids must be in [0, {self.n_vocab})")
        if self.n_past + toks.size > self.n_ctx:
            raise ContextOverflowError(
                f"{self.n_past + toks.size} tokens exceed the context window of {self.n_ctx}")
        toks32 = toks.astype(np.int32)
        out = np.empty((toks.size if all_logits else 1, self.n_vocab), dtype=np.float32)
        code = N.lib.plz_eval(self.handle, toks32.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), toks32.size,
                              int(bool(all_logits)), out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
        _raise_for(code, "eval", self.model._h)
        return out

    def reset(self) -> None:
        _raise_for(N.lib.plz_reset(self.handle), "reset")

    def truncate(self, n: int) -> None:
        """Forget the tokens at positions >= n (full attention only); the next eval continues at n."""
        _raise_for(N.lib.plz_truncate(self.handle, int(n)), "truncate")

    def set_lazy(self, schedule: Sequence[Tuple[int, float]], pool: int = 0, window: int = 1) -> None:
        """Pruning schedule [(layer, keep), ...] (see LazyPrefill.resolve); [] = full attention.
        pool: importance scores max-pooled over +-pool neighbouring tokens before the top-k.
        window: importance from the attention of the last `window` rows of the selecting batch.

        Only on an empty context (n_past == 0); reallocates the per-stage KV cache.
        """
        layers = (ctypes.c_int32 * len(schedule))(*[int(l) for l, _ in schedule])
        keep = (ctypes.c_float * len(schedule))(*[float(k) for _, k in schedule])
        _raise_for(N.lib.plz_set_lazy(self.handle, len(schedule), layers, keep, int(pool), int(window)), "set_lazy")
        self.lazy_schedule = [(int(l), float(k)) for l, k in schedule]
        self.lazy_pool = int(pool)
        self.lazy_window = int(window)

    def set_recycle(self, mode: RecycleMode = RecycleMode.OFF, k: int = 0, tail: int = 0, sinks: int = 0,
                    pool: int = 0, share: float = 0.0) -> None:
        """Recycled attention (see RecycleMode); k tokens kept per KV head (sinks included), tail =
        tokens decoded between refreshes (stride); pool: scores max-pooled over +-pool neighbouring
        cells before the top-k (TOPK); share: each (layer, KV head) score adds share x the cell's
        best score over all layers (TOPK). From a decode policy: pylazy.generate.configure_recycle."""
        _raise_for(N.lib.plz_set_recycle(self.handle, int(mode), int(k), int(tail), int(sinks), int(pool), float(share)),
                   "set_recycle")
        self.recycle_config = RecycleConfig(RecycleMode(mode), int(k), int(tail), int(sinks), int(pool),
                                            float(share))

    def decode(self, token: int, kind: StepKind = StepKind.FULL, similarity: bool = False):
        """One token as `kind` says (RECYCLED falls back to a full step when there is no valid
        recycled cache; SELECT, after a lazy prefill: re-select and revive at every stage boundary,
        where FULL lets each stage attend to its last selection plus the tokens since).
        Returns (logits [n_vocab], ran_recycled, sims or None), sims: per-layer cosine similarity
        of the query with the last refresh's (NaN where not computed)."""
        logits = np.empty(self.n_vocab, dtype=np.float32)
        sims = np.full(self.model.info.n_layer, np.nan, dtype=np.float32) if similarity else None
        ran = ctypes.c_int32()
        code = N.lib.plz_decode(self.handle, int(token), _STEP_CODES[StepKind(kind)],
                                _f32p(logits), _f32p(sims) if sims is not None else None, ctypes.byref(ran))
        _raise_for(code, "decode", self.model._h)
        return logits, ran.value == N.PLZ_STEP_RECYCLED, sims

    def recycle_stats(self) -> dict:
        full, rec = ctypes.c_int64(), ctypes.c_int64()
        _raise_for(N.lib.plz_recycle_stats(self.handle, ctypes.byref(full), ctypes.byref(rec)), "recycle_stats")
        return {"full_steps": full.value, "recycled_steps": rec.value}

    def recycle_positions(self, layer: int) -> np.ndarray:
        """Positions kept per KV head at `layer` by the last refresh, [n_head_kv, k] (-1: stage kept all)."""
        info = self.model.info
        out = np.zeros((info.n_head_kv, self.recycle_config.k), dtype=np.int32)
        _raise_for(N.lib.plz_recycle_positions(self.handle, int(layer), _i32p(out)), "recycle_positions")
        return out

    def recycle_query(self, layer: int) -> np.ndarray:
        """The last refresh's query at `layer` (after RoPE), [n_head, head_dim]."""
        info = self.model.info
        out = np.zeros((info.n_head, info.head_dim), dtype=np.float32)
        _raise_for(N.lib.plz_recycle_query(self.handle, int(layer), _f32p(out)), "recycle_query")
        return out

    def stages(self) -> list:
        """Per stage: layers [il0, il1), positions holding a cell, positions selected at the last step."""
        out = []
        for s in range(N.lib.plz_n_stages(self.handle)):
            vals = [ctypes.c_int32() for _ in range(4)]
            _raise_for(N.lib.plz_stage_info(self.handle, s, *[ctypes.byref(x) for x in vals]), "stage_info")
            il0, il1, n_cells, n_sel = (x.value for x in vals)
            cells = np.zeros(n_cells, dtype=np.int32)
            sel = np.zeros(n_sel, dtype=np.int32)
            _raise_for(N.lib.plz_stage_positions(self.handle, s, _i32p(cells), _i32p(sel)), "stage_positions")
            out.append({"layers": (il0, il1), "cell_pos": cells, "selected": sel})
        return out

    def read_kv(self, layer: int, positions: Sequence[int]):
        """K and V of tokens at `positions` in `layer`, each [n, n_head_kv * head_dim] float32."""
        pos = np.ascontiguousarray(positions, dtype=np.int32)
        row = self.model.info.head_dim * self.model.info.n_head_kv
        k = np.zeros((pos.size, row), dtype=np.float32)
        v = np.zeros((pos.size, row), dtype=np.float32)
        _raise_for(N.lib.plz_read_kv(self.handle, int(layer), pos.size, _i32p(pos), _f32p(k), _f32p(v)), "read_kv")
        return k, v

    def read_aux(self, stage: int, positions: Sequence[int]) -> np.ndarray:
        """Hidden states entering `stage` saved for revival, [n, n_embd] float32."""
        pos = np.ascontiguousarray(positions, dtype=np.int32)
        h = np.zeros((pos.size, self.model.info.n_embd), dtype=np.float32)
        _raise_for(N.lib.plz_read_aux(self.handle, int(stage), pos.size, _i32p(pos), _f32p(h)), "read_aux")
        return h

    def layer_stats(self) -> dict:
        """Per layer: tokens computed there (KV cells), tokens revived there, KV bytes allocated."""
        n = self.model.info.n_layer
        cells = np.zeros(n, dtype=np.int32)
        revived = np.zeros(n, dtype=np.int64)
        kv = np.zeros(n, dtype=np.uint64)
        _raise_for(N.lib.plz_layer_stats(
            self.handle, cells.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            revived.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)),
            kv.ctypes.data_as(ctypes.POINTER(ctypes.c_uint64))), "layer_stats")
        return {"cells": cells.tolist(), "revived": revived.tolist(), "kv_bytes": [int(x) for x in kv]}

    def close(self) -> None:
        if getattr(self, "_h", None):
            N.lib.plz_context_free(self._h)
            try:
                self.model._contexts.remove(self)
            except ValueError:
                pass
        self._h = None
