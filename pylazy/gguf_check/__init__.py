"""Pure-Python validation of a GGUF model file before any native code opens it.

ggml's gguf loader and libllama trust much of what a file says: a file edited or cut
short in the wrong place can end the process in a GGML_ASSERT/GGML_ABORT (or an
uncaught C++ exception through the C API), which Python cannot catch. `check_gguf`
streams the header with `struct` (tensor data is never read), checks everything the
native side relies on, and raises `ModelLoadError` naming the field on the first fault.
Here: the hyper-parameters and the tensors (names and shapes from the engine's architecture
table, pylazy.arch; reading that table is static data, no file is opened natively);
reader.py streams the header, tokenizer.py checks the vocabulary and chat templates,
cli.py is `python -m pylazy.gguf_check`.

Native abort paths reachable from file contents (llama.cpp as vendored by
llama-cpp-python 0.3.36) and the check here that keeps a file away from each:
  llama-vocab.cpp  GGML_ASSERT(id_to_token.size() == token_to_id.size()) in load():
                   two tokens equal once read as C strings (cut at a NUL, "" -> "[EMPTY_i]")
                   -> tokens unique after that mapping, and no NUL in any string
  llama-vocab.cpp  GGML_ASSERT(special_bos_id/eos_id != NULL) in tokenize() when
                   add_bos/add_eos is on but the id is missing or out of range
                   -> explicit special ids in range; add_bos/add_eos need a usable id
  llama-vocab.cpp  byte_to_token(): token_to_id.at("<0xXX>") throws out of
                   llama_tokenize (C API, no catch -> std::terminate) when an SPM vocab
                   lacks byte tokens -> SPM vocab must hold all 256 byte tokens
  llama-vocab.cpp  GGML_ABORT in token_to_byte/init_tokenizer/tokenize for vocab types
                   WPM/UGM/RWKV/NONE, find_bpe_rank's no-space asserts for
                   non-byte-encoded BPE sessions -> tokenizer.ggml.model in {llama, gpt2}
  llama-vocab.cpp  token_to_piece: GGML_ABORT for a piece >= 2^31 bytes -> string cap
  llama-model.cpp  load_hparams: GGML_ASSERT(0 < n_layer <= 512), expert-count asserts,
                   GGML_ASSERT(rope scaling type known), nextn layers <= n_layer
                   -> block_count range, no experts, rope.scaling.type in the known set
  models/gemma3.cpp (throws, no abort) sliding_window_pattern array of another type or > 512
                   entries -> u32 period or one bool/i32/u32 per layer (also what the engine reads)
  models/llama.cpp, qwen2.cpp, qwen3.cpp graphs: GGML_ASSERT(n_embd_head_v == n_embd_head_k == n_rot)
                   -> value_length (default n_embd / n_head) and rope.dimension_count equal
                   the head size (key_length, default n_embd / n_head)
  llama-model-loader.cpp load: GGML_ASSERT(ne[dim] >= 1) -> every dim >= 1
  gguf.cpp         (rejects, no abort) bad magic/version, counts, types, names >= 64
                   bytes, offsets not packed in order -> the same rules, with messages
  ggml.c           type_traits of removed types (block size 0) -> known-type table
"""
from __future__ import annotations

import math
from typing import Any

from ..arch import table as arch_table, tensor_shapes
from ..errors import ModelLoadError
from .reader import (DEFAULT_ALIGNMENT, GGML_F32, GGML_TYPES, MAX_CONTEXT, MAX_LAYERS, NOT_WEIGHT_TYPES,
                     GGUFInfo, LazyArray, LongArray, Stream, TensorInfo, get_kv, parse_header,
                     parse_tensor_infos)
from .tokenizer import check_chat_templates, check_tokenizer

__all__ = ["check_gguf", "GGUFInfo", "LongArray", "TensorInfo", "GGML_TYPES"]

ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")


def check_gguf(path, *, supported_archs=("llama",)) -> GGUFInfo:
    """Validate the GGUF file at `path`; return what it holds, or raise ModelLoadError."""
    unknown = [a for a in supported_archs if a not in arch_table().archs]
    if unknown:
        raise ValueError(f"check_gguf has no checks for architecture(s) {unknown}")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ModelLoadError(f"file: cannot open {path!r}: {e.strerror}") from None
    with f:
        size = f.seek(0, 2)
        s = Stream(f, size)
        info = GGUFInfo(metadata={}, tensors={}, data_offset=0, arch="", hparams={})
        full_arrays: dict[str, Any] = {}
        n_tensors, _ = parse_header(s, info, full_arrays)
        alignment = info.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if "general.alignment" in info.types and info.types["general.alignment"] != "u32":
            raise ModelLoadError("general.alignment: must be u32")
        if alignment < 1 or alignment & (alignment - 1):
            raise ModelLoadError(f"general.alignment: {alignment} is not a power of two")
        parse_tensor_infos(s, info, n_tensors, alignment)

        arch = info.metadata.get("general.architecture")
        if info.types.get("general.architecture") != "str":
            raise ModelLoadError("general.architecture: missing or not a string")
        if arch not in supported_archs:
            raise ModelLoadError(f"general.architecture: unsupported architecture '{arch}'")
        info.arch = arch

        def array(key):   # full values of an array KV (lazy ones read from the file now)
            v = full_arrays.get(key, info.metadata.get(key))
            return v.values(f) if isinstance(v, LazyArray) else v

        _check_llama(info, array)   # every arch of the table is llama-shaped
    return info



# ---------------------------------------------------------------- llama-shaped models

def _check_hparams(info: GGUFInfo) -> dict[str, Any]:
    a = info.arch
    n_layer = get_kv(info, f"{a}.block_count", "u32")
    n_embd = get_kv(info, f"{a}.embedding_length", "u32")
    n_ff = get_kv(info, f"{a}.feed_forward_length", "u32")
    n_head = get_kv(info, f"{a}.attention.head_count", "u32")
    n_head_kv = get_kv(info, f"{a}.attention.head_count_kv", "u32", n_head, required=False)
    n_ctx = get_kv(info, f"{a}.context_length", "u32")
    eps = get_kv(info, f"{a}.attention.layer_norm_rms_epsilon", "f32")
    freq_base = get_kv(info, f"{a}.rope.freq_base", "f32", 10000.0, required=False)
    if not 1 <= n_layer <= MAX_LAYERS:
        raise ModelLoadError(f"{a}.block_count: {n_layer} not in [1, {MAX_LAYERS}]")
    if n_embd < 1 or n_ff < 1:
        raise ModelLoadError(f"{a}.embedding_length / feed_forward_length: must be >= 1 ({n_embd}, {n_ff})")
    # head size: attention.key_length when present (qwen3 may have n_head * head_dim != n_embd)
    key_length = get_kv(info, f"{a}.attention.key_length", "u32", None, required=False)
    if n_head < 1 or (key_length is None and n_embd % n_head):
        raise ModelLoadError(f"{a}.attention.head_count: {n_head} does not divide embedding_length {n_embd}")
    if n_head_kv < 1 or n_head % n_head_kv:
        raise ModelLoadError(f"{a}.attention.head_count_kv: {n_head_kv} does not divide head_count {n_head}")
    head_dim = n_embd // n_head if key_length is None else key_length
    if not 2 <= head_dim <= 4096:
        raise ModelLoadError(f"{a}.attention.key_length: head size {head_dim} not in [2, 4096]")
    if head_dim % 2:
        raise ModelLoadError(f"{a}.attention.head_count: head dim {head_dim} is odd (RoPE needs pairs)")
    if not (math.isfinite(eps) and eps > 0):
        raise ModelLoadError(f"{a}.attention.layer_norm_rms_epsilon: {eps} must be finite and > 0")
    if not (math.isfinite(freq_base) and freq_base > 0):
        raise ModelLoadError(f"{a}.rope.freq_base: {freq_base} must be finite and > 0")
    if not 1 <= n_ctx <= MAX_CONTEXT:
        raise ModelLoadError(f"{a}.context_length: {n_ctx} not in [1, {MAX_CONTEXT}]")
    # libllama's llama/qwen2/qwen3 graphs assert value head size == key head size == rotary dims;
    # its value_length defaults to n_embd / n_head (not to key_length), n_rot to key_length
    for k, default in (("rope.dimension_count", head_dim),
                       ("attention.value_length", n_embd // n_head if n_embd % n_head == 0 else None)):
        v = get_kv(info, f"{a}.{k}", "u32", default, required=False)
        if v != head_dim:
            raise ModelLoadError(f"{a}.{k}: {v}, must equal the head size {head_dim} "
                                 "(attention.key_length, else embedding_length / head_count)")
    scaling = get_kv(info, f"{a}.rope.scaling.type", "str", "linear", required=False)
    if scaling not in ROPE_SCALING_TYPES:
        raise ModelLoadError(f"{a}.rope.scaling.type: unknown '{scaling}'")
    factor = get_kv(info, f"{a}.rope.scaling.factor", "f32", 0.0, required=False)
    if not (math.isfinite(factor) and factor >= 0):
        raise ModelLoadError(f"{a}.rope.scaling.factor: {factor} must be finite and >= 0")
    for k in ("expert_count", "expert_used_count", "expert_group_count"):
        if get_kv(info, f"{a}.{k}", "u32", 0, required=False):
            raise ModelLoadError(f"{a}.{k}: mixture-of-experts models are not supported")
    nextn = get_kv(info, f"{a}.nextn_predict_layers", "u32", 0, required=False)
    if nextn > n_layer:
        raise ModelLoadError(f"{a}.nextn_predict_layers: {nextn} > block_count {n_layer}")
    return dict(arch=a, n_layer=n_layer, n_embd=n_embd, n_ff=n_ff, n_head=n_head, n_head_kv=n_head_kv,
                head_dim=head_dim, n_ctx_train=n_ctx, rms_eps=eps, rope_freq_base=freq_base,
                n_rot=head_dim)


def _check_llama_tensors(info: GGUFInfo, hp: dict[str, Any]) -> int:
    emb = info.tensors.get("token_embd.weight")
    if emb is None:
        raise ModelLoadError("tensor 'token_embd.weight': missing")
    if len(emb.shape) != 2:
        raise ModelLoadError(f"tensor 'token_embd.weight': shape {emb.shape}, expected [n_embd, n_vocab]")
    n_vocab = emb.shape[1]
    expected = tensor_shapes(info.arch, hp, n_vocab)
    for name, t in info.tensors.items():
        if name not in expected:
            raise ModelLoadError(f"tensor '{name}': not part of a {info.arch} model with "
                                 f"{hp['n_layer']} layers (fused attn_qkv and experts are unsupported)")
        shape = expected[name][0]
        if t.shape != shape:
            raise ModelLoadError(f"tensor '{name}': shape {list(t.shape)}, expected {list(shape)} from hparams")
        if len(shape) == 1 and t.ggml_type != GGML_F32:
            raise ModelLoadError(f"tensor '{name}': type {GGML_TYPES[t.ggml_type][0]}, 1-D tensors must be F32")
        if t.ggml_type in NOT_WEIGHT_TYPES:
            raise ModelLoadError(f"tensor '{name}': type {GGML_TYPES[t.ggml_type][0]} cannot hold weights")
    for name, (_, required) in expected.items():
        if required and name not in info.tensors:
            raise ModelLoadError(f"tensor '{name}': missing")
    return n_vocab


def _check_gemma3_hparams(info: GGUFInfo, hp: dict[str, Any], array) -> None:
    """gemma3's sliding-window keys, read as llama.cpp reads them (src/models/gemma3.cpp): window
    (u32, absent or 0: no SWA layers), pattern (u32 period, default 6: layer il is SWA unless
    il % period == period - 1; or one bool/i32/u32 flag per layer), SWA RoPE base (default 10000)."""
    a, n_layer = info.arch, hp["n_layer"]
    n_swa = get_kv(info, f"{a}.attention.sliding_window", "u32", 0, required=False)
    if n_swa > MAX_CONTEXT:
        raise ModelLoadError(f"{a}.attention.sliding_window: {n_swa} > {MAX_CONTEXT}")
    cap = get_kv(info, f"{a}.final_logit_softcapping", "f32", 0.0, required=False)
    if not (math.isfinite(cap) and cap >= 0):
        raise ModelLoadError(f"{a}.final_logit_softcapping: {cap} must be finite and >= 0")
    swa = [False] * n_layer
    key = f"{a}.attention.sliding_window_pattern"
    if n_swa and key in info.metadata:
        if info.types[key] in ("arr[bool]", "arr[i32]", "arr[u32]"):
            flags = array(key)
            if len(flags) != n_layer:
                raise ModelLoadError(f"{key}: {len(flags)} entries, block_count is {n_layer}")
            swa = [bool(x) for x in flags]
        else:
            period = get_kv(info, key, "u32")
            if period > 4096:
                raise ModelLoadError(f"{key}: period {period} > 4096")
            swa = [period == 0 or il % period < period - 1 for il in range(n_layer)]
    elif n_swa:
        swa = [il % 6 < 5 for il in range(n_layer)]
    base_swa = get_kv(info, f"{a}.rope.freq_base_swa", "f32", 10000.0, required=False)
    if not (math.isfinite(base_swa) and base_swa > 0):
        raise ModelLoadError(f"{a}.rope.freq_base_swa: {base_swa} must be finite and > 0")
    hp.update(n_swa=n_swa, swa_layers=[il for il in range(n_layer) if swa[il]] if n_swa else [])


def _check_llama(info: GGUFInfo, array) -> None:
    hp = _check_hparams(info)
    if info.arch == "gemma3":
        _check_gemma3_hparams(info, hp, array)
    n_vocab = _check_llama_tensors(info, hp)
    hp["n_vocab"] = n_vocab
    hp["tied_output"] = "output.weight" not in info.tensors
    check_tokenizer(info, array, n_vocab)
    check_chat_templates(info)
    info.hparams = hp
