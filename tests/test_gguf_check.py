"""pylazy.gguf_check: the default model passes with the right hparams; hand-edited bad
files are each rejected with a ModelLoadError that names the field."""
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from pylazy.errors import ModelLoadError
from models.tiny import finish as finish_gguf
from pylazy.gguf_check import LongArray, check_gguf

from pylazy.models import default_model_path  # noqa: E402

DEFAULT_MODEL = default_model_path()
REPO = Path(__file__).resolve().parents[1]

N_EMBD, N_HEAD, N_HEAD_KV, N_FF, N_LAYER = 64, 4, 2, 96, 2
GPT2_TOKENS = ["<|endoftext|>", "a", "b", "ab", "tokA1", "tokA2", "x", "y"] + [f"t{i:02d}" for i in range(24)]


def write_small_gguf(path, *, arch="llama", spm=False, spm_drop_byte=None, extra_kv=(), skip_tensors=(),
                     n_head=N_HEAD):
    """A valid ~50 KB llama GGUF with a toy vocab: gpt2-style, or SPM with 256 byte tokens."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(256)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(n_head)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(N_EMBD // n_head)
    if spm:
        tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁a", "▁b"]
        types = [2, 3, 3] + [6] * 256 + [1, 1]
        if spm_drop_byte is not None:   # keep the slot, as a normal token of other text
            tokens[3 + spm_drop_byte], types[3 + spm_drop_byte] = "▁c", 1
        w.add_tokenizer_model("llama")
        w.add_token_types(types)
    else:
        tokens = GPT2_TOKENS
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_merges(["a b", "tok A1"])
        w.add_token_types([3] + [1] * (len(tokens) - 1))
    w.add_token_list(tokens)
    w.add_bos_token_id(1 if spm else 0)
    w.add_eos_token_id(2 if spm else 0)
    for key, value, vtype in extra_kv:
        w.add_key_value(key, value, vtype)
    rng = np.random.default_rng(0)
    kv_dim = N_EMBD // n_head * N_HEAD_KV

    def mat(n_out, n_in):
        return rng.standard_normal((n_out, n_in)).astype(np.float32)

    tensors = {"token_embd.weight": mat(len(tokens), N_EMBD),
               "output_norm.weight": np.ones(N_EMBD, np.float32)}
    for i in range(N_LAYER):
        p = f"blk.{i}."
        tensors.update({
            p + "attn_norm.weight": np.ones(N_EMBD, np.float32), p + "attn_q.weight": mat(N_EMBD, N_EMBD),
            p + "attn_k.weight": mat(kv_dim, N_EMBD), p + "attn_v.weight": mat(kv_dim, N_EMBD),
            p + "attn_output.weight": mat(N_EMBD, N_EMBD), p + "ffn_norm.weight": np.ones(N_EMBD, np.float32),
            p + "ffn_gate.weight": mat(N_FF, N_EMBD), p + "ffn_up.weight": mat(N_FF, N_EMBD),
            p + "ffn_down.weight": mat(N_EMBD, N_FF),
        })
    for name, arr in tensors.items():
        if name not in skip_tensors:
            w.add_tensor(name, arr)
    return finish_gguf(w, path)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = write_small_gguf(tmp_path_factory.mktemp("gguf") / "small.gguf")
    return path, check_gguf(path)


# --- byte offsets of fields inside a valid file, from check_gguf's layout ---

def kv_value_at(info, key):
    """Offset of the value of KV `key` (for an array: of its element type)."""
    return dict(info.layout)["kv:" + key] + 8 + len(key.encode()) + 4


def tensor_field_at(info, name, field):
    start = dict(info.layout)["tensor:" + name] + 8 + len(name.encode())
    n_dims = len(info.tensors[name].shape)
    return {"n_dims": start, "dim0": start + 4, "type": start + 4 + 8 * n_dims,
            "offset": start + 8 + 8 * n_dims}[field]


def patched(src, dst, edits=(), truncate=None):
    data = bytearray(Path(src).read_bytes())
    for off, new in edits:
        data[off:off + len(new)] = new
    if truncate is not None:
        data = data[:truncate]
    Path(dst).write_bytes(bytes(data))
    return str(dst)


def rejected(path, *needles):
    with pytest.raises(ModelLoadError) as exc:
        check_gguf(path)
    msg = str(exc.value)
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


def test_default_model_passes_with_right_hparams():
    info = check_gguf(DEFAULT_MODEL)
    hp = info.hparams
    assert (hp["n_layer"], hp["n_embd"], hp["n_head"], hp["n_head_kv"]) == (30, 576, 9, 3)
    assert (hp["head_dim"], hp["n_ff"], hp["n_vocab"], hp["n_ctx_train"]) == (64, 1536, 49152, 8192)
    assert hp["rope_freq_base"] == 100000.0 and abs(hp["rms_eps"] - 1e-5) < 1e-9
    assert hp["tied_output"] is True
    assert info.arch == "llama" and info.data_offset == 1785664
    assert len(info.tensors) == 272
    assert info.tensors["token_embd.weight"].shape == (576, 49152)
    assert info.tensors["blk.29.attn_k.weight"].shape == (576, 192)
    assert info.metadata["tokenizer.ggml.merges"] == LongArray("str", 48900)
    assert info.metadata["tokenizer.ggml.token_type"] == LongArray("i32", 49152)
    assert len(info.metadata["tokenizer.ggml.tokens"]) == 49152
    assert info.metadata["general.languages"] == ["en"]
    last = max(info.tensors.values(), key=lambda t: t.offset)
    assert info.data_offset + last.offset + last.nbytes == Path(DEFAULT_MODEL).stat().st_size


def test_small_file_passes(small):
    _, info = small
    assert info.hparams["n_vocab"] == len(GPT2_TOKENS) and info.hparams["n_layer"] == N_LAYER
    assert info.types["tokenizer.ggml.tokens"] == "arr[str]"


def test_not_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"\x7fELF" + bytes(100))
    rejected(p, "magic")
    p.write_bytes(b"GG")
    rejected(p, "magic", "truncated")


@pytest.mark.parametrize("version, needle", [(1, "version 1"), (4, "version 4"), (3 << 24, "byte-swapped")])
def test_bad_version(small, tmp_path, version, needle):
    rejected(patched(small[0], tmp_path / "v.gguf", [(4, struct.pack("<I", version))]), "version", needle)


def test_truncated_header(small, tmp_path):
    src, info = small
    cut = dict(info.layout)["kv:tokenizer.ggml.tokens"] + 40
    rejected(patched(src, tmp_path / "t.gguf", truncate=cut), "tokenizer.ggml.tokens", "truncated")
    rejected(patched(src, tmp_path / "t2.gguf", truncate=10), "tensor count", "truncated")


def test_truncated_tensor_data(small, tmp_path):
    src, info = small
    size = Path(src).stat().st_size
    rejected(patched(src, tmp_path / "t.gguf", truncate=size - 7), "truncated", "runs past the end")
    # cut right where the data section starts
    rejected(patched(src, tmp_path / "t2.gguf", truncate=info.data_offset), "tensor 'token_embd.weight'")


def test_lying_string_length(small, tmp_path):
    src, info = small
    off = kv_value_at(small[1], "general.architecture")
    rejected(patched(src, tmp_path / "s.gguf", [(off, struct.pack("<Q", 1 << 40))]),
             "general.architecture", "string length 1099511627776")


def test_huge_array_count(small, tmp_path):
    src, info = small
    off = kv_value_at(info, "tokenizer.ggml.tokens") + 4
    rejected(patched(src, tmp_path / "a.gguf", [(off, struct.pack("<Q", 1 << 60))]),
             "tokenizer.ggml.tokens", "array of 1152921504606846976 str")


def test_huge_counts_in_header(small, tmp_path):
    src, _ = small
    rejected(patched(src, tmp_path / "n.gguf", [(16, struct.pack("<q", 1 << 50))]), "KV count")
    rejected(patched(src, tmp_path / "m.gguf", [(8, struct.pack("<q", -1))]), "tensor count")


def _token_offset(info, index):
    """Offset of the bytes of token `index` (after its u64 length)."""
    off = kv_value_at(info, "tokenizer.ggml.tokens") + 12
    for tok in info.metadata["tokenizer.ggml.tokens"][:index]:
        off += 8 + len(tok.encode())
    return off + 8


def test_duplicate_token_string(small, tmp_path):
    src, info = small
    i = GPT2_TOKENS.index("tokA2")
    bad = patched(src, tmp_path / "d.gguf", [(_token_offset(info, i), b"tokA1")])
    rejected(bad, "tokenizer.ggml.tokens", "token 5 'tokA1' duplicates token 4")


def test_nul_in_token_is_rejected(small, tmp_path):
    # "ab" -> "a\0": libllama would read it as "a", a duplicate of token 1
    src, info = small
    bad = patched(src, tmp_path / "d.gguf", [(_token_offset(info, GPT2_TOKENS.index("ab")), b"a\x00")])
    rejected(bad, "tokenizer.ggml.tokens[3]", "NUL")


def test_invalid_utf8(small, tmp_path):
    src, info = small
    bad = patched(src, tmp_path / "u.gguf", [(_token_offset(info, 1), b"\xff")])
    rejected(bad, "tokenizer.ggml.tokens[1]", "UTF-8")


def test_head_count_not_dividing_embedding(small, tmp_path):
    src, info = small
    off = kv_value_at(info, "llama.attention.head_count")
    rejected(patched(src, tmp_path / "h.gguf", [(off, struct.pack("<I", 5))]),
             "llama.attention.head_count", "does not divide embedding_length 64")


def test_unknown_tensor_type(small, tmp_path):
    src, info = small
    off = tensor_field_at(info, "blk.0.attn_q.weight", "type")
    rejected(patched(src, tmp_path / "t.gguf", [(off, struct.pack("<I", 4))]),
             "tensor 'blk.0.attn_q.weight'", "unknown ggml type 4")


def test_unsupported_arch(small, tmp_path):
    src, info = small
    off = kv_value_at(info, "general.architecture") + 8
    rejected(patched(src, tmp_path / "a.gguf", [(off, b"gemma")]), "unsupported architecture 'gemma'")


@pytest.mark.parametrize("name, field, value, needle", [
    ("blk.0.attn_q.weight", "n_dims", struct.pack("<I", 5), "n_dims 5"),
    ("blk.0.attn_q.weight", "dim0", struct.pack("<q", 0), "dim 0 is 0"),
    ("blk.0.attn_q.weight", "dim0", struct.pack("<q", 1 << 62), "overflows int64"),
    ("blk.0.attn_q.weight", "offset", struct.pack("<Q", 8), "not aligned"),
    ("blk.1.ffn_up.weight", "offset", struct.pack("<Q", 0), "expected"),
    ("blk.0.attn_norm.weight", "type", struct.pack("<I", 12), "Q4_K block size 256"),
    ("blk.1.ffn_down.weight", "dim0", struct.pack("<q", 32), "expected [96, 64]"),
])
def test_bad_tensor_info(small, tmp_path, name, field, value, needle):
    src, info = small
    rejected(patched(src, tmp_path / "t.gguf", [(tensor_field_at(info, name, field), value)]), f"'{name}'", needle)


@pytest.mark.parametrize("key, value, needles", [
    ("llama.attention.head_count_kv", struct.pack("<I", 3), ("head_count_kv", "does not divide head_count")),
    ("llama.attention.head_count_kv", struct.pack("<I", 0), ("head_count_kv", "does not divide head_count")),
    ("llama.block_count", struct.pack("<I", 0), ("block_count", "not in [1, 512]")),
    ("llama.block_count", struct.pack("<I", 3), ("'blk.2.attn_norm.weight': missing",)),
    ("llama.block_count", struct.pack("<I", 1), ("'blk.1.attn_norm.weight'", "model with 1 layers")),
    ("llama.attention.layer_norm_rms_epsilon", struct.pack("<f", float("nan")), ("epsilon", "finite")),
    ("llama.rope.freq_base", struct.pack("<f", -1.0), ("freq_base", "finite and > 0")),
    ("llama.context_length", struct.pack("<I", 0), ("context_length", "not in [1, 16777216]")),
    ("llama.rope.dimension_count", struct.pack("<I", 8), ("dimension_count", "must equal")),
    ("llama.feed_forward_length", struct.pack("<I", 128), ("'blk.0.ffn_gate.weight'", "expected [64, 128]")),
    ("tokenizer.ggml.bos_token_id", struct.pack("<I", 32), ("bos_token_id", "out of range for 32 tokens")),
    ("tokenizer.ggml.model", struct.pack("<Q", 4) + b"bert", ("tokenizer.ggml.model", "'bert' not supported")),
])
def test_bad_metadata_value(small, tmp_path, key, value, needles):
    src, info = small
    rejected(patched(src, tmp_path / "m.gguf", [(kv_value_at(info, key), value)]), *needles)


def test_bad_kv_type_and_alignment(small, tmp_path):
    src, info = small
    type_off = kv_value_at(info, "llama.block_count") - 4
    rejected(patched(src, tmp_path / "a.gguf", [(type_off, struct.pack("<I", 13))]), "llama.block_count", "invalid value type 13")
    rejected(patched(src, tmp_path / "b.gguf", [(type_off, struct.pack("<I", 5))]), "llama.block_count", "type i32, expected u32")
    p = write_small_gguf(tmp_path / "al.gguf", extra_kv=[("general.alignment", 24, gguf.GGUFValueType.UINT32)])
    rejected(p, "general.alignment", "power of two")


def test_missing_tensor_and_moe(tmp_path):
    rejected(write_small_gguf(tmp_path / "a.gguf", skip_tensors={"blk.1.ffn_down.weight"}), "'blk.1.ffn_down.weight': missing")
    moe = write_small_gguf(tmp_path / "b.gguf", extra_kv=[("llama.expert_count", 8, gguf.GGUFValueType.UINT32)])
    rejected(moe, "llama.expert_count", "mixture-of-experts")


def test_broken_chat_template(tmp_path):
    # llama-cpp-python compiles it with Jinja2 on open and raises on a syntax error
    ok = write_small_gguf(tmp_path / "ok.gguf", extra_kv=[
        ("tokenizer.chat_template", "{% for m in messages %}{% generation %}{{ m }}{% endgeneration %}"
         "{% if loop.last %}{% break %}{% endif %}{% endfor %}", gguf.GGUFValueType.STRING)])
    assert check_gguf(ok).metadata["tokenizer.chat_template"].startswith("{% for")
    bad = write_small_gguf(tmp_path / "bad.gguf", extra_kv=[
        ("tokenizer.chat_template", "{% for m in messages %}{{ m }", gguf.GGUFValueType.STRING)])
    rejected(bad, "tokenizer.chat_template", "invalid Jinja2 template")


def test_spm_vocab_needs_byte_tokens(tmp_path):
    good = write_small_gguf(tmp_path / "spm.gguf", spm=True)
    info = check_gguf(good)
    assert info.metadata["tokenizer.ggml.model"] == "llama" and info.hparams["n_vocab"] == 261
    # libllama falls back to <0xXX> tokens for unknown text; one missing ends the process
    rejected(write_small_gguf(tmp_path / "nb.gguf", spm=True, spm_drop_byte=0xE4), "lacks byte token <0xE4>")
    # a token typed BYTE must look like one (libllama parses its hex digits)
    off = _token_offset(info, 3 + 0x41)
    rejected(patched(good, tmp_path / "b.gguf", [(off, b"<0xZZ>")]), "token_type", "'<0xZZ>'")


def test_cli_exit_codes(small, tmp_path):
    ok = subprocess.run([sys.executable, "-m", "pylazy.gguf_check", DEFAULT_MODEL, "--load"],
                        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "30 layers" in ok.stdout and "libllama tokenized" in ok.stdout
    bad = patched(small[0], tmp_path / "bad.gguf", [(4, struct.pack("<I", 9))])
    r = subprocess.run([sys.executable, "-m", "pylazy.gguf_check", bad, "--load"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "version 9" in r.stderr
    r = subprocess.run([sys.executable, "-m", "pylazy.gguf_check", str(tmp_path / "missing.gguf")],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cannot open" in r.stderr
