"""Pure-Python validation of a GGUF model file before any native code opens it.

ggml's gguf loader and libllama trust much of what a file says: a file edited or cut
short in the wrong place can end the process in a GGML_ASSERT/GGML_ABORT (or an
uncaught C++ exception through the C API), which Python cannot catch. `check_gguf`
streams the header with `struct` (tensor data is never read), checks everything the
native side relies on, and raises `ModelLoadError` naming the field on the first fault.

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
import struct
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..errors import ModelLoadError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_STRING_BYTES = 64 << 20    # far above any real value (chat templates are ~10 KB)
MAX_TENSOR_NAME = 63           # GGML_MAX_NAME 64 including the NUL
MAX_DIMS = 4
MAX_LAYERS = 512               # LLAMA_MAX_LAYERS
MAX_CONTEXT = 1 << 24
INT64_MAX = (1 << 63) - 1
KEEP_ARRAY_ITEMS = 64          # longer arrays are stored in GGUFInfo.metadata as LongArray
MAX_STRING_ARRAY = 1 << 24     # vocabularies and merge lists are ~10^5; bounds a list of ""
MAX_ENTRIES = 1 << 20          # KVs / tensors per file (a 512-layer llama has ~10^4 tensors)

# GGUF value types: id -> (name, struct format, size); string and array have no fixed size
T_STRING, T_ARRAY = 8, 9
VALUE_TYPES = {
    0: ("u8", "B", 1), 1: ("i8", "b", 1), 2: ("u16", "H", 2), 3: ("i16", "h", 2),
    4: ("u32", "I", 4), 5: ("i32", "i", 4), 6: ("f32", "f", 4), 7: ("bool", "B", 1),
    8: ("str", None, 0), 9: ("arr", None, 0),
    10: ("u64", "Q", 8), 11: ("i64", "q", 8), 12: ("f64", "d", 8),
}

# ggml tensor types of this ggml version: id -> (name, block size, bytes per block).
# Ids 4, 5, 31-33, 36-38 were removed (block size 0 in ggml.c), so they are absent.
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18), 42: ("Q2_0", 64, 18),
}
GGML_F32 = 0
# Types ggml has but no weight matrix may use: activation-side quant types and integers.
NOT_WEIGHT_TYPES = {9, 15, 24, 25, 26, 27, 28}

SUPPORTED_TOKENIZERS = ("llama", "gpt2")   # libllama SPM and byte-level BPE
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")
SPECIAL_TOKEN_KEYS = (
    "bos", "eos", "eot", "eom", "unknown", "seperator", "padding", "cls", "mask",
    "fim_pre", "fim_suf", "fim_mid", "fim_pad", "fim_rep", "fim_sep",
    "prefix", "suffix", "middle",
)
TOKEN_TYPE_BYTE = 6


@dataclass(frozen=True)
class LongArray:
    """Stand-in in GGUFInfo.metadata for an array longer than KEEP_ARRAY_ITEMS."""
    elem_type: str
    length: int


class TensorInfo(NamedTuple):
    ggml_type: int
    shape: tuple[int, ...]   # ggml order: shape[0] is the contiguous row length
    offset: int              # from GGUFInfo.data_offset
    nbytes: int


@dataclass
class GGUFInfo:
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    data_offset: int
    arch: str
    hparams: dict[str, Any]
    version: int = 3
    types: dict[str, str] = field(default_factory=dict)      # key -> "u32", "arr[str]", ...
    # (section name, file offset) in file order: magic, version, n_tensors, n_kv,
    # "kv:<key>", "tensor:<name>", data. Lets the fuzzer cut and poke at exact fields.
    layout: list[tuple[str, int]] = field(default_factory=list)


class _Stream:
    """Sequential reads from a file handle through a bounded buffer; every read is checked
    against the bytes left in the file before anything is allocated."""

    CHUNK = 1 << 20

    def __init__(self, f, size: int):
        self.f, self.size = f, size
        self.buf, self.buf_start, self.pos = b"", 0, 0

    def left(self) -> int:
        return self.size - self.pos

    def _need(self, n: int, what: str) -> int:
        if n > self.size - self.pos:
            raise ModelLoadError(
                f"{what}: file truncated ({n} bytes needed at offset {self.pos}, "
                f"file ends at {self.size})")
        off = self.pos - self.buf_start
        if off + n > len(self.buf):
            self.f.seek(self.pos)
            self.buf = self.f.read(max(n, self.CHUNK))
            self.buf_start, off = self.pos, 0
            if len(self.buf) < n:
                raise ModelLoadError(f"{what}: file shrank while reading at offset {self.pos}")
        self.pos += n
        return off

    def skip(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise ModelLoadError(
                f"{what}: file truncated ({n} bytes needed at offset {self.pos}, "
                f"file ends at {self.size})")
        self.pos += n   # the next read refills the buffer if this left it

    def bytes(self, n: int, what: str) -> bytes:
        off = self._need(n, what)
        return self.buf[off:off + n]

    def scalar(self, fmt: str, size: int, what: str):
        off = self._need(size, what)
        return struct.unpack_from("<" + fmt, self.buf, off)[0]

    def u32(self, what: str) -> int:
        return self.scalar("I", 4, what)

    def u64(self, what: str) -> int:
        return self.scalar("Q", 8, what)

    def i64(self, what: str) -> int:
        return self.scalar("q", 8, what)

    def string(self, what: str) -> str:
        n = self.u64(f"{what}: string length")
        if n > MAX_STRING_BYTES or n > self.left():
            raise ModelLoadError(
                f"{what}: string length {n} exceeds the {self.left()} bytes left in the file"
                if n > self.left() else f"{what}: string length {n} over the {MAX_STRING_BYTES} limit")
        raw = self.bytes(n, what)
        try:
            s = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ModelLoadError(f"{what}: string is not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if "\x00" in s:
            # native code reads these as C strings: a NUL silently shortens them
            raise ModelLoadError(f"{what}: string contains a NUL byte")
        return s

    def strings(self, count: int, what: str) -> list[str]:
        """`count` strings; a fast path for those already in the buffer (a vocab holds
        ~10^5), falling back to `string` (which also words the errors) for the rest."""
        out, unpack, size = [], struct.unpack_from, self.size
        for i in range(count):
            buf, off = self.buf, self.pos - self.buf_start
            if off + 8 <= len(buf):
                n = unpack("<Q", buf, off)[0]
                end = off + 8 + n
                if end <= len(buf) and n <= MAX_STRING_BYTES and self.pos + 8 + n <= size:
                    try:
                        text = buf[off + 8:end].decode("utf-8")
                    except UnicodeDecodeError:
                        text = None
                    if text is not None and "\x00" not in text:
                        out.append(text)
                        self.pos += 8 + n
                        continue
            out.append(self.string(f"{what}[{i}]"))
        return out


class _LazyArray(NamedTuple):
    """A long numeric array left in the file: decoded only if a check needs its values."""
    offset: int
    count: int
    fmt: str
    size: int

    def values(self, f) -> list:
        f.seek(self.offset)
        return list(struct.unpack(f"<{self.count}{self.fmt}", f.read(self.count * self.size)))


def _read_kv_value(s: _Stream, key: str, vtype: int):
    """One KV value; returns (value, type name). Arrays come back as lists of strings,
    short lists of numbers, or a _LazyArray."""
    if vtype == T_STRING:
        return s.string(key), "str"
    if vtype == T_ARRAY:
        etype = s.u32(f"{key}: array element type")
        if etype not in VALUE_TYPES or etype == T_ARRAY:
            raise ModelLoadError(f"{key}: invalid array element type {etype}")
        ename, fmt, size = VALUE_TYPES[etype]
        count = s.u64(f"{key}: array length")
        min_bytes = count * (8 if etype == T_STRING else size)
        if min_bytes > s.left():
            raise ModelLoadError(
                f"{key}: array of {count} {ename} needs at least {min_bytes} bytes, "
                f"only {s.left()} left in the file")
        if etype == T_STRING:
            if count > MAX_STRING_ARRAY:
                raise ModelLoadError(f"{key}: array of {count} strings over the {MAX_STRING_ARRAY} limit")
            return s.strings(count, key), "arr[str]"
        if count > KEEP_ARRAY_ITEMS:
            # skipped, not decoded: a lying count must not become a list of 10^8 ints
            start = s.pos
            if etype == 7:
                for done in range(0, count, s.CHUNK):
                    if max(s.bytes(min(s.CHUNK, count - done), key)) > 1:
                        raise ModelLoadError(f"{key}: bool array holds a value other than 0/1")
            else:
                s.skip(count * size, key)
            return _LazyArray(start, count, fmt, size), f"arr[{ename}]"
        off = s._need(count * size, key)
        values = list(struct.unpack_from(f"<{count}{fmt}", s.buf, off))
        if etype == 7 and any(v > 1 for v in values):
            raise ModelLoadError(f"{key}: bool array holds a value other than 0/1")
        return values, f"arr[{ename}]"
    if vtype not in VALUE_TYPES:
        raise ModelLoadError(f"{key}: invalid value type {vtype}")
    name, fmt, size = VALUE_TYPES[vtype]
    v = s.scalar(fmt, size, key)
    if vtype == 7:
        if v > 1:
            raise ModelLoadError(f"{key}: bool value {v} is not 0/1")
        v = bool(v)
    return v, name


def _parse_header(s: _Stream, info: GGUFInfo, full_arrays: dict[str, Any]) -> tuple[int, int]:
    info.layout.append(("magic", 0))
    magic = s.bytes(4, "magic")
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"magic: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    info.layout.append(("version", s.pos))
    version = s.u32("version")
    if version & 0xFFFF == 0 and version:
        raise ModelLoadError(f"version: {version:#x} looks byte-swapped (big-endian GGUF is not supported)")
    if version not in SUPPORTED_VERSIONS:
        raise ModelLoadError(f"version: GGUF version {version} is not supported (only 2 and 3)")
    info.version = version
    info.layout.append(("n_tensors", s.pos))
    n_tensors = s.i64("tensor count")
    info.layout.append(("n_kv", s.pos))
    n_kv = s.i64("KV count")
    # smallest possible entries: KV = key len + 1-byte key + type + 1-byte value;
    # tensor info = name len + 1-byte name + n_dims + one dim + type + offset
    if n_kv < 0 or n_kv > MAX_ENTRIES or n_kv * 14 > s.left():
        raise ModelLoadError(f"KV count: {n_kv} key/value pairs cannot fit in the {s.left()} bytes left")
    if n_tensors < 0 or n_tensors > MAX_ENTRIES or n_tensors * 33 > s.left():
        raise ModelLoadError(f"tensor count: {n_tensors} tensors cannot fit in the {s.left()} bytes left")

    for i in range(n_kv):
        info.layout.append((f"kv#{i}", s.pos))
        key = s.string(f"KV #{i} key")
        if not key:
            raise ModelLoadError(f"KV #{i} key: empty key")
        if key in info.metadata:
            raise ModelLoadError(f"{key}: duplicate key")
        info.layout[-1] = (f"kv:{key}", info.layout[-1][1])
        vtype = s.u32(f"{key}: value type")
        value, tname = _read_kv_value(s, key, vtype)
        info.types[key] = tname
        if isinstance(value, _LazyArray) or (isinstance(value, list) and len(value) > KEEP_ARRAY_ITEMS):
            full_arrays[key] = value
            n = value.count if isinstance(value, _LazyArray) else len(value)
            value = value if key == "tokenizer.ggml.tokens" else LongArray(tname[4:-1], n)
        info.metadata[key] = value
    return n_tensors, n_kv


def _parse_tensor_infos(s: _Stream, info: GGUFInfo, n_tensors: int, alignment: int) -> None:
    for i in range(n_tensors):
        info.layout.append((f"tensor#{i}", s.pos))
        name = s.string(f"tensor #{i} name")
        if not name or len(name.encode()) > MAX_TENSOR_NAME:
            raise ModelLoadError(f"tensor #{i} name: length {len(name.encode())} not in [1, {MAX_TENSOR_NAME}]")
        if name in info.tensors:
            raise ModelLoadError(f"tensor '{name}': duplicate tensor name")
        info.layout[-1] = (f"tensor:{name}", info.layout[-1][1])
        n_dims = s.u32(f"tensor '{name}': n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            raise ModelLoadError(f"tensor '{name}': n_dims {n_dims} not in [1, {MAX_DIMS}]")
        shape = tuple(s.i64(f"tensor '{name}': dim {d}") for d in range(n_dims))
        n_elem = 1
        for d, ne in enumerate(shape):
            if ne < 1:
                raise ModelLoadError(f"tensor '{name}': dim {d} is {ne} (must be >= 1)")
            n_elem *= ne
            if n_elem > INT64_MAX:
                raise ModelLoadError(f"tensor '{name}': element count of shape {shape} overflows int64")
        gtype = s.u32(f"tensor '{name}': ggml type")
        if gtype not in GGML_TYPES:
            raise ModelLoadError(f"tensor '{name}': unknown ggml type {gtype}")
        tname, blck, tsize = GGML_TYPES[gtype]
        if shape[0] % blck:
            raise ModelLoadError(
                f"tensor '{name}': row length {shape[0]} is not a multiple of the {tname} block size {blck}")
        nbytes = n_elem // blck * tsize
        if nbytes > INT64_MAX - alignment:
            raise ModelLoadError(f"tensor '{name}': byte size of shape {shape} overflows int64")
        offset = s.u64(f"tensor '{name}': data offset")
        info.tensors[name] = TensorInfo(gtype, shape, offset, nbytes)

    pad = (-s.pos) % alignment
    info.data_offset = s.pos + pad
    info.layout.append(("data", info.data_offset))
    if n_tensors and info.data_offset > s.size:
        raise ModelLoadError(
            f"tensor data: section would start at {info.data_offset}, past the end of the file ({s.size})")
    # ggml's gguf reader demands tensors packed in file order, each at the running
    # aligned offset: that also rules out overlaps.
    expected = 0
    for name, t in info.tensors.items():
        if t.offset % alignment:
            raise ModelLoadError(f"tensor '{name}': data offset {t.offset} not aligned to {alignment}")
        if t.offset != expected:
            raise ModelLoadError(
                f"tensor '{name}': data offset {t.offset}, expected {expected} "
                "(tensors must be packed in order without overlap)")
        end = info.data_offset + t.offset + t.nbytes
        if end > s.size:
            raise ModelLoadError(
                f"tensor '{name}': data [{info.data_offset + t.offset}, {end}) runs past the end "
                f"of the file ({s.size} bytes): file truncated")
        expected += t.nbytes + (-t.nbytes) % alignment


def check_gguf(path, *, supported_archs=("llama",)) -> GGUFInfo:
    """Validate the GGUF file at `path`; return what it holds, or raise ModelLoadError."""
    unknown = [a for a in supported_archs if a not in _ARCH_CHECKS]
    if unknown:
        raise ValueError(f"check_gguf has no checks for architecture(s) {unknown}")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ModelLoadError(f"file: cannot open {path!r}: {e.strerror}") from None
    with f:
        size = f.seek(0, 2)
        s = _Stream(f, size)
        info = GGUFInfo(metadata={}, tensors={}, data_offset=0, arch="", hparams={})
        full_arrays: dict[str, Any] = {}
        n_tensors, _ = _parse_header(s, info, full_arrays)
        alignment = info.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if "general.alignment" in info.types and info.types["general.alignment"] != "u32":
            raise ModelLoadError("general.alignment: must be u32")
        if alignment < 1 or alignment & (alignment - 1):
            raise ModelLoadError(f"general.alignment: {alignment} is not a power of two")
        _parse_tensor_infos(s, info, n_tensors, alignment)

        arch = info.metadata.get("general.architecture")
        if info.types.get("general.architecture") != "str":
            raise ModelLoadError("general.architecture: missing or not a string")
        if arch not in supported_archs:
            raise ModelLoadError(f"general.architecture: unsupported architecture '{arch}'")
        info.arch = arch

        def array(key):   # full values of an array KV (lazy ones read from the file now)
            v = full_arrays.get(key, info.metadata.get(key))
            return v.values(f) if isinstance(v, _LazyArray) else v

        _ARCH_CHECKS[arch](info, array)
    return info


# ---------------------------------------------------------------- llama checks

def _get(info: GGUFInfo, key: str, tname: str, default=None, required=True):
    if key not in info.metadata:
        if required:
            raise ModelLoadError(f"{key}: missing")
        return default
    if info.types[key] != tname:
        raise ModelLoadError(f"{key}: type {info.types[key]}, expected {tname}")
    return info.metadata[key]


def _check_hparams(info: GGUFInfo) -> dict[str, Any]:
    a = info.arch
    n_layer = _get(info, f"{a}.block_count", "u32")
    n_embd = _get(info, f"{a}.embedding_length", "u32")
    n_ff = _get(info, f"{a}.feed_forward_length", "u32")
    n_head = _get(info, f"{a}.attention.head_count", "u32")
    n_head_kv = _get(info, f"{a}.attention.head_count_kv", "u32", n_head, required=False)
    n_ctx = _get(info, f"{a}.context_length", "u32")
    eps = _get(info, f"{a}.attention.layer_norm_rms_epsilon", "f32")
    freq_base = _get(info, f"{a}.rope.freq_base", "f32", 10000.0, required=False)
    if not 1 <= n_layer <= MAX_LAYERS:
        raise ModelLoadError(f"{a}.block_count: {n_layer} not in [1, {MAX_LAYERS}]")
    if n_embd < 1 or n_ff < 1:
        raise ModelLoadError(f"{a}.embedding_length / feed_forward_length: must be >= 1 ({n_embd}, {n_ff})")
    # head size: attention.key_length when present (qwen3 may have n_head * head_dim != n_embd)
    key_length = _get(info, f"{a}.attention.key_length", "u32", None, required=False)
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
        v = _get(info, f"{a}.{k}", "u32", default, required=False)
        if v != head_dim:
            raise ModelLoadError(f"{a}.{k}: {v}, must equal the head size {head_dim} "
                                 "(attention.key_length, else embedding_length / head_count)")
    scaling = _get(info, f"{a}.rope.scaling.type", "str", "linear", required=False)
    if scaling not in ROPE_SCALING_TYPES:
        raise ModelLoadError(f"{a}.rope.scaling.type: unknown '{scaling}'")
    factor = _get(info, f"{a}.rope.scaling.factor", "f32", 0.0, required=False)
    if not (math.isfinite(factor) and factor >= 0):
        raise ModelLoadError(f"{a}.rope.scaling.factor: {factor} must be finite and >= 0")
    for k in ("expert_count", "expert_used_count", "expert_group_count"):
        if _get(info, f"{a}.{k}", "u32", 0, required=False):
            raise ModelLoadError(f"{a}.{k}: mixture-of-experts models are not supported")
    nextn = _get(info, f"{a}.nextn_predict_layers", "u32", 0, required=False)
    if nextn > n_layer:
        raise ModelLoadError(f"{a}.nextn_predict_layers: {nextn} > block_count {n_layer}")
    return dict(arch=a, n_layer=n_layer, n_embd=n_embd, n_ff=n_ff, n_head=n_head, n_head_kv=n_head_kv,
                head_dim=head_dim, n_ctx_train=n_ctx, rms_eps=eps, rope_freq_base=freq_base,
                n_rot=head_dim)


def _llama_tensor_shapes(hp: dict[str, Any], n_vocab: int) -> dict[str, tuple[tuple[int, ...], bool]]:
    """name -> (shape, required) for every tensor libllama's llama/qwen2/qwen3/gemma3 graph may use
    (hp["arch"] picks the extras: per-head q/k norms of qwen3 and gemma3, gemma3's post-norms)."""
    e, f, hd = hp["n_embd"], hp["n_ff"], hp["head_dim"]
    kv, q = hd * hp["n_head_kv"], hd * hp["n_head"]
    shapes = {
        "token_embd.weight": ((e, n_vocab), True),
        "output_norm.weight": ((e,), True),
        "output.weight": ((e, n_vocab), False),      # absent: tied to token_embd
    }
    if hp["arch"] == "gemma3":
        # llama.cpp's gemma3 graph: no biases, no rope_freqs; q/k norms and both post-norms required
        for i in range(hp["n_layer"]):
            p = f"blk.{i}."
            shapes.update({
                p + "attn_norm.weight": ((e,), True), p + "attn_q.weight": ((e, q), True),
                p + "attn_k.weight": ((e, kv), True), p + "attn_v.weight": ((e, kv), True),
                p + "attn_q_norm.weight": ((hd,), True), p + "attn_k_norm.weight": ((hd,), True),
                p + "attn_output.weight": ((q, e), True), p + "post_attention_norm.weight": ((e,), True),
                p + "ffn_norm.weight": ((e,), True), p + "ffn_gate.weight": ((e, f), True),
                p + "ffn_up.weight": ((e, f), True), p + "ffn_down.weight": ((f, e), True),
                p + "post_ffw_norm.weight": ((e,), True),
            })
        return shapes
    shapes["rope_freqs.weight"] = ((hd // 2,), False)
    for i in range(hp["n_layer"]):
        p = f"blk.{i}."
        shapes.update({
            p + "attn_norm.weight": ((e,), True), p + "attn_q.weight": ((e, q), True),
            p + "attn_k.weight": ((e, kv), True), p + "attn_v.weight": ((e, kv), True),
            p + "attn_output.weight": ((q, e), True), p + "ffn_norm.weight": ((e,), True),
            p + "ffn_gate.weight": ((e, f), True), p + "ffn_down.weight": ((f, e), True),
            p + "ffn_up.weight": ((e, f), True),
            p + "attn_q.bias": ((q,), False), p + "attn_k.bias": ((kv,), False),
            p + "attn_v.bias": ((kv,), False), p + "attn_output.bias": ((e,), False),
            p + "ffn_gate.bias": ((f,), False), p + "ffn_up.bias": ((f,), False),
            p + "ffn_down.bias": ((e,), False),
        })
        if hp["arch"] == "qwen3":
            shapes[p + "attn_q_norm.weight"] = ((hd,), True)
            shapes[p + "attn_k_norm.weight"] = ((hd,), True)
    return shapes


def _check_llama_tensors(info: GGUFInfo, hp: dict[str, Any]) -> int:
    emb = info.tensors.get("token_embd.weight")
    if emb is None:
        raise ModelLoadError("tensor 'token_embd.weight': missing")
    if len(emb.shape) != 2:
        raise ModelLoadError(f"tensor 'token_embd.weight': shape {emb.shape}, expected [n_embd, n_vocab]")
    n_vocab = emb.shape[1]
    expected = _llama_tensor_shapes(hp, n_vocab)
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


def _check_tokenizer(info: GGUFInfo, array, n_vocab: int) -> None:
    model = _get(info, "tokenizer.ggml.model", "str")
    if model not in SUPPORTED_TOKENIZERS:
        raise ModelLoadError(f"tokenizer.ggml.model: '{model}' not supported (need one of {SUPPORTED_TOKENIZERS})")
    _get(info, "tokenizer.ggml.pre", "str", required=False)
    tokens = _get(info, "tokenizer.ggml.tokens", "arr[str]")
    if len(tokens) != n_vocab:
        raise ModelLoadError(f"tokenizer.ggml.tokens: {len(tokens)} tokens, token_embd has {n_vocab} rows")
    if (vs := _get(info, f"{info.arch}.vocab_size", "u32", n_vocab, required=False)) != n_vocab:
        raise ModelLoadError(f"{info.arch}.vocab_size: {vs}, token_embd has {n_vocab} rows")
    # libllama maps text -> id and asserts the map is as large as the list; it renames
    # an empty token to "[EMPTY_<id>]" first, so compare what it compares
    seen: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        word = tok or f"[EMPTY_{i}]"
        if word in seen:
            raise ModelLoadError(f"tokenizer.ggml.tokens: token {i} {word!r} duplicates token {seen[word]}")
        seen[word] = i
    if "tokenizer.ggml.scores" in info.metadata:
        if info.types["tokenizer.ggml.scores"] not in ("arr[f32]", "arr[i32]"):
            raise ModelLoadError("tokenizer.ggml.scores: must be an array of f32 or i32")
        if _arr_len(info, "tokenizer.ggml.scores") != n_vocab:
            raise ModelLoadError(f"tokenizer.ggml.scores: length {_arr_len(info, 'tokenizer.ggml.scores')} != {n_vocab} tokens")
    if "tokenizer.ggml.token_type" in info.metadata:
        _get(info, "tokenizer.ggml.token_type", "arr[i32]")
        if _arr_len(info, "tokenizer.ggml.token_type") != n_vocab:
            raise ModelLoadError(f"tokenizer.ggml.token_type: length "
                                 f"{_arr_len(info, 'tokenizer.ggml.token_type')} != {n_vocab} tokens")
        ttypes = array("tokenizer.ggml.token_type")
        for i, tt in enumerate(ttypes):
            if tt == TOKEN_TYPE_BYTE and not _is_byte_token(tokens[i]):
                raise ModelLoadError(f"tokenizer.ggml.token_type: byte token {i} {tokens[i]!r} is not '<0xXX>'")
    if model == "gpt2":
        _get(info, "tokenizer.ggml.merges", "arr[str]")
        merges = array("tokenizer.ggml.merges")
        for i, m in enumerate(merges):
            if m.find(" ", 1) < 0:
                raise ModelLoadError(f"tokenizer.ggml.merges: merge {i} {m!r} is not 'left right'")
    else:
        # SPM falls back to <0xXX> byte tokens for text it cannot match; a missing one
        # makes libllama throw out of llama_tokenize, which ends the process
        for b in range(256):
            if f"<0x{b:02X}>" not in seen and not (b < 0x80 and chr(b) in seen):
                raise ModelLoadError(f"tokenizer.ggml.tokens: SPM vocab lacks byte token <0x{b:02X}>")
    _check_special_tokens(info, model, n_vocab)


def _arr_len(info: GGUFInfo, key: str) -> int:
    v = info.metadata[key]
    return v.length if isinstance(v, LongArray) else len(v)


def _is_byte_token(tok: str) -> bool:
    return len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">") and \
        all(c in "0123456789abcdefABCDEF" for c in tok[3:5])


def _check_special_tokens(info: GGUFInfo, model: str, n_vocab: int) -> None:
    ids = {}
    for name in SPECIAL_TOKEN_KEYS:
        key = f"tokenizer.ggml.{name}_token_id"
        tid = _get(info, key, "u32", required=False)
        if tid is not None and tid >= n_vocab:
            raise ModelLoadError(f"{key}: {tid} out of range for {n_vocab} tokens")
        ids[name] = tid
    flags = {}
    for k in ("add_bos_token", "add_eos_token", "add_sep_token", "add_space_prefix",
              "remove_extra_whitespaces"):
        flags[k] = _get(info, f"tokenizer.ggml.{k}", "bool", required=False)
    # libllama's defaults when a key is absent: SPM bos 1 / eos 2, BPE bos = eos = 11
    # (dropped when out of range); SPM adds BOS by default and some BPE pre-tokenizers do
    default_bos, default_eos = (1, 2) if model == "llama" else (11, 11)
    for which, default, add in (("bos", default_bos, flags["add_bos_token"]),
                                ("eos", default_eos, flags["add_eos_token"])):
        tid = ids[which] if ids[which] is not None else (default if default < n_vocab else None)
        may_add = add if add is not None else which == "bos"
        if may_add and tid is None:
            raise ModelLoadError(f"tokenizer.ggml.{which}_token_id: missing, but the tokenizer adds {which.upper()}")


def _check_chat_templates(info: GGUFInfo) -> None:
    """llama-cpp-python compiles every tokenizer.chat_template* string with Jinja2 when
    it opens a model and raises on a syntax error; check them the same way here."""
    keys = [k for k in info.metadata if k == "tokenizer.chat_template" or k.startswith("tokenizer.chat_template.")]
    if not keys:
        return
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:   # no Jinja2, no one to compile the template either
        return

    class GenerationTag(jinja2.ext.Extension):
        # HF templates may wrap assistant text in {% generation %}...{% endgeneration %}
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    for key in keys:
        if info.types[key] != "str":
            continue   # llama-cpp-python only sees string values
        try:
            env.parse(info.metadata[key])
        except jinja2.TemplateError as e:
            raise ModelLoadError(f"{key}: invalid Jinja2 template ({e})") from None


def _check_gemma3_hparams(info: GGUFInfo, hp: dict[str, Any], array) -> None:
    """gemma3's sliding-window keys, read as llama.cpp reads them (src/models/gemma3.cpp): window
    (u32, absent or 0: no SWA layers), pattern (u32 period, default 6: layer il is SWA unless
    il % period == period - 1; or one bool/i32/u32 flag per layer), SWA RoPE base (default 10000)."""
    a, n_layer = info.arch, hp["n_layer"]
    n_swa = _get(info, f"{a}.attention.sliding_window", "u32", 0, required=False)
    if n_swa > MAX_CONTEXT:
        raise ModelLoadError(f"{a}.attention.sliding_window: {n_swa} > {MAX_CONTEXT}")
    cap = _get(info, f"{a}.final_logit_softcapping", "f32", 0.0, required=False)
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
            period = _get(info, key, "u32")
            if period > 4096:
                raise ModelLoadError(f"{key}: period {period} > 4096")
            swa = [period == 0 or il % period < period - 1 for il in range(n_layer)]
    elif n_swa:
        swa = [il % 6 < 5 for il in range(n_layer)]
    base_swa = _get(info, f"{a}.rope.freq_base_swa", "f32", 10000.0, required=False)
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
    _check_tokenizer(info, array, n_vocab)
    _check_chat_templates(info)
    info.hparams = hp


# qwen2 (optional q/k/v biases, NEOX RoPE), qwen3 (per-head q/k norms) and gemma3 (q/k norms,
# post-norms, sliding-window layers) are llama-shaped
_ARCH_CHECKS = {"llama": _check_llama, "qwen2": _check_llama, "qwen3": _check_llama, "gemma3": _check_llama}
