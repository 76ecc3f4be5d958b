"""Real text as a model's tokens, for tests that compare a registry model with llama.cpp."""
from pathlib import Path

from pylazy.llama_ref import reference_llama


def readme_tokens(path, n):
    """n tokens of real text (this repository's README, BOS first), by llama.cpp's tokenizer."""
    ref = reference_llama(str(path), vocab_only=True)
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text() * 4
    toks = ref.tokenize(text.encode(), add_bos=True)[:n]
    ref.close()
    assert len(toks) == n
    return toks
