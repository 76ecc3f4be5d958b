"""Real text as a model's tokens, for tests that compare a registry model with llama.cpp."""
import importlib.util
from pathlib import Path

import pytest

from pylazy.llama_ref import reference_llama


def readme_tokens(path, n):
    """n tokens of real text (this repository's README, BOS first), by llama.cpp's tokenizer."""
    ref = reference_llama(str(path), vocab_only=True)
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text() * 4
    toks = ref.tokenize(text.encode(), add_bos=True)[:n]
    ref.close()
    assert len(toks) == n
    return toks


def registry_path_or_skip(name, module, install_hint):
    """The registry model's file, or a skip naming what to install when its package is absent."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} not installed ({install_hint})")
    from pylazy.models import registry_model_path
    return registry_model_path(name)
