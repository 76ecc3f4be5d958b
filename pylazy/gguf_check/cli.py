"""`python -m pylazy.gguf_check FILE [--load]`: validate a GGUF file (exit 0 ok, 2 rejected);
with --load, then hand it to libllama's tokenizer and pylazy's engine (the fuzzer's worker).

Apart from the checks (pylazy.gguf_check) because loading needs pylazy.engine, which itself
imports the checks.
"""
from __future__ import annotations

import argparse
import sys

from ..errors import ModelLoadError
from . import check_gguf


def _load_and_run(path: str) -> str:
    """Hand a validated file to native code: today libllama's tokenizer (vocab only).
    The pylazy engine load goes here too. Returns a one-line summary; any Python-level
    refusal on the way (libllama's is a ValueError, llama_cpp's own checks vary) becomes
    a ModelLoadError, so the CLI's exit-code contract holds."""
    import llama_cpp
    text = "Hello, world! Ünïcödé 中文 \n\t<|im_start|>x"
    try:
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        try:
            ids = llm.tokenize(text.encode(), add_bos=True, special=True)
            back = llm.detokenize(ids, special=True)
        finally:
            llm.close()
    except Exception as e:
        raise ModelLoadError(f"llama_cpp rejected the file: {type(e).__name__}: {e}") from None
    # The engine: load the weights and run a few tokens through every layer.
    from ..engine import Context, Model
    with Model(str(path), n_gpu_layers=0, n_threads=1) as model, Context(model, n_ctx=64) as ctx:
        logits = ctx.eval([min(t, model.info.n_vocab - 1) for t in ids[:4]])
    return (f"libllama tokenized {len(text)} chars to {len(ids)} tokens, {len(back)} bytes back; "
            f"engine ran {min(4, len(ids))} tokens, logits {logits.shape}")


def run_cli(path: str, load: bool = False) -> tuple[int, str]:
    """What `python -m pylazy.gguf_check` does, as (exit code, message): 0 ok, 2 rejected."""
    try:
        info = check_gguf(path)
        hp = info.hparams
        msg = (f"ok: {info.arch}, {hp['n_layer']} layers, n_embd {hp['n_embd']}, heads "
               f"{hp['n_head']}/{hp['n_head_kv']}, vocab {hp['n_vocab']}, {len(info.tensors)} tensors")
        if load:
            msg += "; " + _load_and_run(path)
        return 0, msg
    except ModelLoadError as e:
        return 2, f"{path}: {e}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pylazy.gguf_check",
                                 description="Validate a GGUF model file (exit 0 ok, 2 rejected).")
    ap.add_argument("file")
    ap.add_argument("--load", action="store_true", help="then load it with libllama and tokenize")
    args = ap.parse_args(argv)
    code, msg = run_cli(args.file, args.load)
    print(msg, file=sys.stdout if code == 0 else sys.stderr)
    return code
