"""Grammar-constrained sampling with libllama's own grammar sampler over pylazy's logits.

llama-cpp-python puts ``llama_sampler_init_grammar`` in its sampler chain right after the
penalties: every step the grammar sets the logits of tokens it cannot accept to -inf, then
the chosen token is accepted into the grammar. pylazy does the same with the same sampler,
built on the vocab of the vocab-only ``llama_cpp.Llama`` that pylazy already loads for
tokenizing: ``GrammarMask`` is a logits processor (it runs after the caller's processors,
and masking commutes with the penalties, which never lift a -inf), so greedy decoding under
a grammar picks the same tokens as stock llama-cpp-python. No grammar engine of our own.

``response_format`` (OpenAI's ``json_object`` / ``json_schema``, and llama-cpp-python's
``json_object`` with a ``schema``) becomes a grammar through llama-cpp-python's JSON
grammar and its JSON-schema-to-GBNF converter.
"""
from __future__ import annotations

import ctypes
import json
from typing import Any, Optional, Sequence

import numpy as np

_TOKEN_DATA = np.dtype([("id", np.intc), ("logit", np.float32), ("p", np.float32)], align=True)


def grammar_text(grammar: Any) -> str:
    """The GBNF text of a ``llama_cpp.LlamaGrammar`` (or of a plain GBNF string)."""
    if isinstance(grammar, str):
        return grammar
    text = getattr(grammar, "_grammar", None)
    if not isinstance(text, str):
        raise TypeError(f"grammar must be a llama_cpp.LlamaGrammar or a GBNF str, got {type(grammar).__name__}")
    return text


class GrammarMask:
    """One generation's grammar state: a logits processor that masks what the grammar rejects.

    Called as ``mask(input_ids, scores)`` at every step (the logits-processor signature).
    The first call takes ``input_ids`` as the prompt; each later call first accepts, in
    order, the tokens ``input_ids`` gained since (the tokens drawn from the previous masks),
    so it follows any token loop without a hook of its own. A token that the last mask
    rejected raises ValueError instead of reaching libllama, whose accept aborts the process
    on a token the grammar cannot take.
    """

    def __init__(self, llama_vocab: Any, grammar: Any, root: Optional[str] = None):
        import llama_cpp
        self._lib = llama_cpp
        text = grammar_text(grammar)
        if not text.strip():
            raise ValueError("grammar is empty")
        root = root or getattr(grammar, "_root", None) or "root"
        # libllama logs the parse error itself and returns NULL (never aborts on bad text)
        self._sampler = llama_cpp.llama_sampler_init_grammar(llama_vocab, text.encode("utf-8"),
                                                             root.encode("utf-8"))
        if not self._sampler:
            raise ValueError("grammar does not parse (GBNF syntax error, left recursion, "
                             f"or no {root!r} rule)")
        self._seen: Optional[int] = None     # len(input_ids) at the last call
        self._allowed: Optional[np.ndarray] = None   # bool [n_vocab] of the last mask
        self._data: Optional[np.ndarray] = None
        self._array = llama_cpp.llama_token_data_array()

    def _accept_new(self, input_ids: Sequence[int]) -> None:
        if self._seen is None:
            self._seen = len(input_ids)
            return
        new = [int(t) for t in input_ids[self._seen:]]
        for i, token in enumerate(new):
            if i > 0 or self._allowed is None or not self._allowed[token]:
                raise ValueError(f"token {token} was not allowed by the grammar")
            self._lib.llama_sampler_accept(self._sampler, token)
        self._seen = len(input_ids)

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        if self._sampler is None:
            raise ValueError("this grammar state is closed")
        self._accept_new(input_ids)
        n = scores.shape[-1]
        if self._data is None or self._data.size != n:
            self._data = np.zeros(n, dtype=_TOKEN_DATA)
            self._ids = np.arange(n, dtype=np.intc)
        data = self._data
        data["id"] = self._ids
        data["logit"] = scores
        arr = self._array
        arr.data = data.ctypes.data_as(ctypes.POINTER(self._lib.llama_token_data))
        arr.size = n
        arr.selected = -1
        arr.sorted = False
        self._lib.llama_sampler_apply(self._sampler, ctypes.byref(arr))
        out = np.full(n, -np.inf, dtype=np.float32)
        out[data["id"][:arr.size]] = data["logit"][:arr.size]
        self._allowed = out > -np.inf
        return out

    def close(self) -> None:
        if self._sampler is not None:
            self._lib.llama_sampler_free(self._sampler)
            self._sampler = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def grammar_for_response_format(response_format: Any) -> Optional[Any]:
    """A ``llama_cpp.LlamaGrammar`` for an OpenAI ``response_format``; None for plain text.

    ``{"type": "text"}`` -> None; ``{"type": "json_object"}`` -> any JSON object
    (llama-cpp-python's JSON grammar), with a ``"schema"`` key -> that schema (as
    llama-cpp-python's chat handlers read it); ``{"type": "json_schema", "json_schema":
    {"name": ..., "schema": {...}}}`` (OpenAI's structured outputs) -> that schema.
    Anything else raises ValueError.
    """
    from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise ValueError(f"response_format must be an object, got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = response_format.get("schema")
        return LlamaGrammar.from_string(JSON_GBNF) if schema is None else schema_grammar(schema)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ValueError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}")
        return schema_grammar(spec["schema"])
    raise ValueError(f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}")


def schema_grammar(schema: Any) -> Any:
    """LlamaGrammar for a JSON schema (dict or JSON text), by llama-cpp-python's converter."""
    from llama_cpp.llama_grammar import LlamaGrammar, json_schema_to_gbnf
    text = schema if isinstance(schema, str) else json.dumps(schema)
    try:
        return LlamaGrammar.from_string(json_schema_to_gbnf(text))
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise ValueError(f"JSON schema not supported by the grammar converter: {exc}") from None
