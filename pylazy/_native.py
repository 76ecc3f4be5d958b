"""Thin ctypes binding of native/pylazy.h. Nothing here but types, signatures and library loading.

llama_cpp is imported first so that its libggml (in llama_cpp/lib) is the one in the process;
libpylazy's rpath points at that same folder, so exactly one libggml is ever loaded.
"""
import ctypes
import os
from pathlib import Path

import llama_cpp  # noqa: F401  (loads the one libggml/libllama pair the engine links against)

PLZ_OK = 0
PLZ_ERR_LOAD = -1
PLZ_ERR_ARG = -2
PLZ_ERR_CONTEXT = -3
PLZ_ERR_RUNTIME = -4

PLZ_STEP_FULL = 0
PLZ_STEP_RECYCLED = 1
PLZ_STEP_SELECT = 2

PLZ_RECYCLE_OFF = 0
PLZ_RECYCLE_TOPK = 1
PLZ_RECYCLE_WINDOW = 2


class ModelParams(ctypes.Structure):
    _fields_ = [("n_gpu_layers", ctypes.c_int32), ("n_threads", ctypes.c_int32), ("use_extra_bufts", ctypes.c_int32),
                ("split_mode", ctypes.c_int32), ("main_gpu", ctypes.c_int32),
                ("tensor_split", ctypes.POINTER(ctypes.c_float)), ("n_tensor_split", ctypes.c_int32),
                ("rpc_servers", ctypes.c_char_p), ("rpc_timeout_ms", ctypes.c_int32)]


class ModelInfo(ctypes.Structure):
    _fields_ = [
        ("arch", ctypes.c_char * 32),
        ("n_vocab", ctypes.c_int32), ("n_embd", ctypes.c_int32), ("n_layer", ctypes.c_int32),
        ("n_head", ctypes.c_int32), ("n_head_kv", ctypes.c_int32), ("head_dim", ctypes.c_int32),
        ("n_ff", ctypes.c_int32), ("n_ctx_train", ctypes.c_int32),
        ("rms_eps", ctypes.c_float), ("rope_base", ctypes.c_float), ("rope_freq_scale", ctypes.c_float),
        ("rope_dim", ctypes.c_int32),
        ("tied_output", ctypes.c_int32),
        ("on_gpu", ctypes.c_int32),
        ("weight_bytes", ctypes.c_uint64),
        ("backend", ctypes.c_char * 64),
        ("n_swa", ctypes.c_int32), ("n_swa_layers", ctypes.c_int32),
        ("n_extra_tensors", ctypes.c_int32), ("extra_bufts", ctypes.c_char * 64),
    ]


class ArchTensorInfo(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("per_layer", ctypes.c_int32), ("ne", ctypes.c_int32 * 2),
                ("present", ctypes.c_uint32), ("required", ctypes.c_uint32)]


# PLZ_DIM_* (a tensor dimension in hyper-parameters), in code order
PLZ_DIMS = ("1", "n_embd", "n_vocab", "n_ff", "head_dim", "q", "kv", "rope_half")


class ContextParams(ctypes.Structure):
    _fields_ = [("n_ctx", ctypes.c_int32), ("n_ubatch", ctypes.c_int32), ("n_threads", ctypes.c_int32),
                ("flash_attn", ctypes.c_int32), ("type_k", ctypes.c_int32), ("type_v", ctypes.c_int32)]


def _find_library() -> Path:
    env = os.environ.get("PYLAZY_LIB")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve().parent
    candidates += [here / "libpylazy.so", here / "libpylazy.dylib", here.parent / "build" / "libpylazy.so"]
    # Imported from a source checkout (tests put the repo root on sys.path): use the installed build.
    try:
        from importlib.metadata import PackageNotFoundError, distribution
        try:
            candidates.append(Path(distribution("pylazy").locate_file("pylazy/libpylazy.so")))
        except PackageNotFoundError:
            pass
    except ImportError:
        pass
    for p in candidates:
        if p.is_file():
            return p
    raise ImportError("libpylazy not found (looked in: %s); reinstall pylazy with pip" % ", ".join(map(str, candidates)))


lib = ctypes.CDLL(str(_find_library()))

_p = ctypes.c_void_p
_sigs = {
    "pylazy_last_error": (ctypes.c_char_p, []),
    "plz_cpu_extra_bufts": (ctypes.c_int32, [ctypes.c_char_p, ctypes.c_int32]),
    "plz_model_load": (ctypes.c_int, [ctypes.c_char_p, ctypes.POINTER(ModelParams), ctypes.POINTER(_p)]),
    "plz_model_free": (None, [_p]),
    "plz_model_layer_device": (ctypes.c_int, [_p, ctypes.c_int32, ctypes.c_char_p, ctypes.c_int32]),
    "plz_model_devices": (ctypes.c_int, [_p, ctypes.c_char_p, ctypes.c_int32]),
    "plz_model_lost": (ctypes.c_int, [_p]),
    "plz_rpc_available": (ctypes.c_int, []),
    "plz_local_devices": (ctypes.c_int, [ctypes.c_char_p, ctypes.c_int32]),
    "plz_rpc_proto_version": (ctypes.c_int, []),
    "plz_rpc_probe": (ctypes.c_int, [ctypes.c_char_p, ctypes.c_int32]),
    "plz_rpc_serve": (ctypes.c_int, [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int32, ctypes.c_char_p]),
    "plz_model_get_info": (ctypes.c_int, [_p, ctypes.POINTER(ModelInfo)]),
    "plz_context_new": (ctypes.c_int, [_p, ctypes.POINTER(ContextParams), ctypes.POINTER(_p)]),
    "plz_context_free": (None, [_p]),
    "plz_context_set_threads": (ctypes.c_int, [_p, ctypes.c_int32]),
    "plz_eval": (ctypes.c_int, [_p, ctypes.POINTER(ctypes.c_int32), ctypes.c_int32, ctypes.c_int32,
                                ctypes.POINTER(ctypes.c_float)]),
    "plz_reset": (ctypes.c_int, [_p]),
    "plz_truncate": (ctypes.c_int, [_p, ctypes.c_int32]),
    "plz_n_past": (ctypes.c_int, [_p]),
    "plz_set_lazy": (ctypes.c_int, [_p, ctypes.c_int32, ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_float),
                                    ctypes.c_int32, ctypes.c_int32]),
    "plz_set_recycle": (ctypes.c_int, [_p] + [ctypes.c_int32] * 5 + [ctypes.c_float]),
    "plz_decode": (ctypes.c_int, [_p, ctypes.c_int32, ctypes.c_int32, ctypes.POINTER(ctypes.c_float),
                                  ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_int32)]),
    "plz_recycle_stats": (ctypes.c_int, [_p, ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int64)]),
    "plz_recycle_positions": (ctypes.c_int, [_p, ctypes.c_int32, ctypes.POINTER(ctypes.c_int32)]),
    "plz_recycle_query": (ctypes.c_int, [_p, ctypes.c_int32, ctypes.POINTER(ctypes.c_float)]),
    "plz_n_stages": (ctypes.c_int, [_p]),
    "plz_stage_info": (ctypes.c_int, [_p, ctypes.c_int32] + [ctypes.POINTER(ctypes.c_int32)] * 4),
    "plz_stage_positions": (ctypes.c_int, [_p, ctypes.c_int32] + [ctypes.POINTER(ctypes.c_int32)] * 2),
    "plz_read_kv": (ctypes.c_int, [_p, ctypes.c_int32, ctypes.c_int32, ctypes.POINTER(ctypes.c_int32),
                                   ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_float)]),
    "plz_read_aux": (ctypes.c_int, [_p, ctypes.c_int32, ctypes.c_int32, ctypes.POINTER(ctypes.c_int32),
                                    ctypes.POINTER(ctypes.c_float)]),
    "plz_layer_stats": (ctypes.c_int, [_p, ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_int64),
                                       ctypes.POINTER(ctypes.c_uint64)]),
    "plz_model_swa_layers": (ctypes.c_int, [_p, ctypes.POINTER(ctypes.c_int32)]),
    "plz_arch_count": (ctypes.c_int32, []),
    "plz_arch_name": (ctypes.c_char_p, [ctypes.c_int32]),
    "plz_arch_rope_neox": (ctypes.c_int32, [ctypes.c_int32]),
    "plz_arch_tensor_count": (ctypes.c_int32, []),
    "plz_arch_tensor": (ctypes.c_int, [ctypes.c_int32, ctypes.POINTER(ArchTensorInfo)]),
    "plz_keep_count": (ctypes.c_int32, [ctypes.c_float, ctypes.c_int32]),
    "plz_op_profile_reset": (None, []),
    "plz_context_take_profile": (ctypes.c_int, [_p, ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_int64)]),
    "plz_op_profile_report": (ctypes.c_int32, [ctypes.c_char_p, ctypes.c_int32]),
    "plz_op_report": (ctypes.c_int32, [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int32]),
}
for _name, (_res, _args) in _sigs.items():
    _fn = getattr(lib, _name)
    _fn.restype = _res
    _fn.argtypes = _args


def last_error() -> str:
    msg = lib.pylazy_last_error()
    return msg.decode("utf-8", "replace") if msg else ""
