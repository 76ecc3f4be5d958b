"""Streaming the header of a GGUF file with `struct`: key/values and tensor infos, every count,
length and offset checked against the file size before it is trusted (tensor data is never read).
What the parsed header must hold for pylazy is checked by the rest of pylazy.gguf_check.
"""
from __future__ import annotations

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


class Stream:
    """Sequential reads from a file handle through a bounded buffer; every read is checked
    against the bytes left in the file before anything is allocated."""

    CHUNK = 1 << 20

    def __init__(self, f, size: int):
        self.f, self.size = f, size
        self.buf, self.buf_start, self.pos = b"", 0, 0

    def left(self) -> int:
        return self.size - self.pos

    def _check_room(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise ModelLoadError(
                f"{what}: file truncated ({n} bytes needed at offset {self.pos}, "
                f"file ends at {self.size})")

    def _need(self, n: int, what: str) -> int:
        self._check_room(n, what)
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
        self._check_room(n, what)
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


class LazyArray(NamedTuple):
    """A long numeric array left in the file: decoded only if a check needs its values."""
    offset: int
    count: int
    fmt: str
    size: int

    def values(self, f) -> list:
        f.seek(self.offset)
        return list(struct.unpack(f"<{self.count}{self.fmt}", f.read(self.count * self.size)))


def read_kv_value(s: Stream, key: str, vtype: int):
    """One KV value; returns (value, type name). Arrays come back as lists of strings,
    short lists of numbers, or a LazyArray."""
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
            return LazyArray(start, count, fmt, size), f"arr[{ename}]"
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


def parse_header(s: Stream, info: GGUFInfo, full_arrays: dict[str, Any]) -> tuple[int, int]:
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
        value, tname = read_kv_value(s, key, vtype)
        info.types[key] = tname
        if isinstance(value, LazyArray) or (isinstance(value, list) and len(value) > KEEP_ARRAY_ITEMS):
            full_arrays[key] = value
            n = value.count if isinstance(value, LazyArray) else len(value)
            value = value if key == "tokenizer.ggml.tokens" else LongArray(tname[4:-1], n)
        info.metadata[key] = value
    return n_tensors, n_kv


def parse_tensor_infos(s: Stream, info: GGUFInfo, n_tensors: int, alignment: int) -> None:
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


def get_kv(info: GGUFInfo, key: str, tname: str, default=None, required=True):
    if key not in info.metadata:
        if required:
            raise ModelLoadError(f"{key}: missing")
        return default
    if info.types[key] != tname:
        raise ModelLoadError(f"{key}: type {info.types[key]}, expected {tname}")
    return info.metadata[key]


def array_length(info: GGUFInfo, key: str) -> int:
    v = info.metadata[key]
    return v.length if isinstance(v, LongArray) else len(v)
