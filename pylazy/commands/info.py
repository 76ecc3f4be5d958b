"""`pylazy info`: a GGUF model file's architecture, sizes and tensor types."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
from typing import Any, Dict, Optional

from ..cli_args import add_command


def register(subparsers) -> None:
    add_command(subparsers, "info", "describe a GGUF model file",
                "Architecture, sizes and tensor quantization of a model file.", add_arguments, main)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None, help="GGUF file or registry name (default: the default model)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--engine", action="store_true",
                   help="read the header with pylazy's engine instead of the gguf package")
    p.add_argument("--backends", action="store_true",
                   help="run each kind of engine step on the model and print, per backend device, the graph "
                        "nodes that device cannot run (they fall back to the CPU)")
    p.add_argument("--rows", default="32,1024", help="prompt lengths for --backends (default 32,1024)")
    p.add_argument("--n-gpu-layers", type=int, default=-1,
                   help="layers offloaded while --backends runs the steps (default -1: all). Every device is "
                        "asked about every node wherever the model runs, so 0 gives the same table from "
                        "CPU-run graphs, for a device whose driver cannot run them")


def _gguf_info(path: str) -> Dict[str, Any]:
    from gguf import GGUFReader
    reader = GGUFReader(path)

    def get(key: str, default=None):
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    arch = get("general.architecture")
    heads = get(f"{arch}.attention.head_count")
    heads_kv = get(f"{arch}.attention.head_count_kv", heads)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    types: Dict[str, int] = {}
    n_params = 0
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        n_params += int(t.n_elements)
    return {"name": get("general.name"), "arch": arch, "n_layer": get(f"{arch}.block_count"),
            "n_head": max(heads) if isinstance(heads, list) else heads,
            "n_head_kv": max(heads_kv) if isinstance(heads_kv, list) else heads_kv,
            "n_embd": get(f"{arch}.embedding_length"), "n_ctx_train": get(f"{arch}.context_length"),
            "n_vocab": len(tokens.data) if tokens is not None else get(f"{arch}.vocab_size"),
            "n_tensors": len(reader.tensors), "n_params": n_params,
            "tensor_types": dict(sorted(types.items(), key=lambda kv: -kv[1]))}


def _engine_info(path: str) -> Dict[str, Any]:
    from ..engine import Model
    with Model(path, n_gpu_layers=0) as model:
        i = model.info
    return {"name": None, "arch": i.arch, "n_layer": i.n_layer, "n_head": i.n_head, "n_head_kv": i.n_head_kv,
            "n_embd": i.n_embd, "n_ctx_train": i.n_ctx_train, "n_vocab": i.n_vocab,
            "n_tensors": None, "n_params": None, "tensor_types": None, "weight_bytes": i.weight_bytes}


def model_info(path: str, use_gguf: Optional[bool] = None) -> Dict[str, Any]:
    """A model file's facts; from the gguf package when installed (or use_gguf=True), else
    from pylazy's engine (no tensor types then)."""
    if use_gguf is None:
        use_gguf = importlib.util.find_spec("gguf") is not None
    info = {"path": path, "file_bytes": os.path.getsize(path), "source": "gguf" if use_gguf else "engine"}
    info.update(_gguf_info(path) if use_gguf else _engine_info(path))
    return info


def _backends(path: str, args: argparse.Namespace) -> int:
    from ..op_report import format_report, op_report
    report = op_report(path, n_gpu_layers=args.n_gpu_layers, rows=[int(x) for x in args.rows.split(",") if x])
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


def main(args: argparse.Namespace) -> int:
    from ..models import resolve_model_path
    if args.backends:
        return _backends(resolve_model_path(args.model), args)
    from ..profiles import profile_summary
    info = model_info(resolve_model_path(args.model), use_gguf=False if args.engine else None)
    info["profile"] = profile_summary(info["path"])   # `pylazy tune`'s defaults for this file
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key == "tensor_types" and value:
            value = ", ".join(f"{k} x{v}" for k, v in value.items())
        elif key == "file_bytes":
            value = f"{value} ({value / 2 ** 20:.1f} MiB)"
        if value is not None:
            print(f"{key:>12}: {value}")
    return 0
