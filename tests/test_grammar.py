"""Grammar-constrained sampling (pylazy.grammar): libllama's grammar sampler over pylazy's
logits, against stock llama-cpp-python under the same grammar (greedy, default model)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from pylazy import LazyPrefill, Llama, Recycle, StreamingWindow, default_model_path
from pylazy.grammar import GrammarMask, grammar_for_response_format
from pylazy.llama_ref import reference_llama

jsonschema = pytest.importorskip("jsonschema")
from llama_cpp import LlamaGrammar  # noqa: E402

N_CTX = 512
YES_NO = r'''root ::= answer "."
answer ::= ("yes" | "no") ", because " [a-z ]{1,40}'''
YES_NO_RE = re.compile(r"(yes|no), because [a-z ]{1,40}\.")
PROMPTS = ["Q: Is the sky blue?\nA:", "Q: Can fish fly?\nA:"]
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150}}}
ASK_PERSON = [{"role": "user", "content": "Give a JSON object with the name and age of a person."}]


# `ref` and `llm`: both libraries with their defaults (flash attention off), where pylazy's logits equal
# llama.cpp's (tests/conftest.py)


def text(resp):
    choice = resp["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def test_gbnf_greedy_equals_llama_cpp(ref, llm):
    for prompt in PROMPTS:
        ours = llm(prompt, max_tokens=40, temperature=0, grammar=LlamaGrammar.from_string(YES_NO))
        theirs = ref(prompt, max_tokens=40, temperature=0, grammar=LlamaGrammar.from_string(YES_NO))
        assert text(ours) == text(theirs)
        assert YES_NO_RE.fullmatch(text(ours)), text(ours)
        # the grammar ended the text (EOS allowed only once "." closed root), not max_tokens
        assert ours["choices"][0]["finish_reason"] == theirs["choices"][0]["finish_reason"] == "stop"
    unconstrained = text(llm(PROMPTS[0], max_tokens=12, temperature=0))
    assert not YES_NO_RE.fullmatch(unconstrained)   # so the grammar did change the output


def test_json_schema_output_parses_validates_and_equals_llama_cpp(ref, llm):
    fmt = {"type": "json_object", "schema": PERSON}   # llama-cpp-python's spelling
    ours = llm.create_chat_completion(ASK_PERSON, temperature=0, max_tokens=60, response_format=fmt)
    theirs = ref.create_chat_completion(ASK_PERSON, temperature=0, max_tokens=60, response_format=fmt)
    assert text(ours) == text(theirs)
    value = json.loads(text(ours))
    jsonschema.validate(value, PERSON)
    assert set(value) == {"name", "age"}
    # OpenAI's structured-output spelling builds the same grammar
    openai_fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    again = llm.create_chat_completion(ASK_PERSON, temperature=0, max_tokens=60, response_format=openai_fmt)
    assert text(again) == text(ours)


def test_json_object_mode_equals_llama_cpp(ref, llm):
    fmt = {"type": "json_object"}
    ours = llm.create_chat_completion(ASK_PERSON, temperature=0, max_tokens=40, response_format=fmt)
    theirs = ref.create_chat_completion(ASK_PERSON, temperature=0, max_tokens=40, response_format=fmt)
    assert text(ours) == text(theirs) and text(ours).startswith("{")


def test_grammar_in_completion_via_response_format(llm):
    out = llm("A person as JSON:", max_tokens=60, temperature=0,
              response_format={"type": "json_object", "schema": PERSON})
    jsonschema.validate(json.loads(text(out)), PERSON)


def test_stream_equals_non_stream_under_grammar(llm):
    g = LlamaGrammar.from_string(YES_NO)
    whole = text(llm(PROMPTS[1], max_tokens=40, temperature=0, grammar=g))
    chunks = list(llm(PROMPTS[1], max_tokens=40, temperature=0, grammar=g, stream=True))
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert len(chunks) > 3


@pytest.mark.parametrize("policy", [
    dict(lazy=LazyPrefill()),
    dict(recycle=Recycle(k=8, stride=4)),
    dict(recycle=StreamingWindow(sinks=2, window=6, stride=2)),
    dict(lazy=LazyPrefill(), recycle=Recycle(k=8, stride=4)),
], ids=["lazy", "recycle", "streaming", "lazy+recycle"])
def test_grammar_holds_under_every_policy(llm, policy):
    prompt = "Here is a story about the sea and the sky. " * 6 + PROMPTS[0]
    out = llm(prompt, max_tokens=40, temperature=0, grammar=LlamaGrammar.from_string(YES_NO), **policy)
    assert YES_NO_RE.fullmatch(text(out)), text(out)
    if "recycle" in policy:
        assert llm.stats["recycled_steps"] > 0   # the cheap steps did run under the grammar
    if "lazy" in policy:
        assert llm.stats["computed_fraction"] < 1.0


def test_sampled_outputs_stay_in_grammar(llm):
    seen = set()
    for seed in range(4):
        out = llm(PROMPTS[0], max_tokens=40, temperature=1.2, top_k=0, top_p=1.0, min_p=0.0,
                  seed=seed, grammar=LlamaGrammar.from_string(YES_NO))
        assert YES_NO_RE.fullmatch(text(out)), text(out)
        seen.add(text(out))
    assert len(seen) > 1   # sampling really sampled


def test_bad_grammar_arguments_raise_and_leave_llama_working(llm):
    greedy = text(llm(PROMPTS[0], max_tokens=8, temperature=0))
    with pytest.raises(ValueError, match="does not parse"):
        llm(PROMPTS[0], grammar=LlamaGrammar.from_string("root ::= undefined_rule"))
    with pytest.raises(ValueError, match="does not parse"):
        llm(PROMPTS[0], grammar=LlamaGrammar.from_string('root ::= root "a"'))   # left recursion
    with pytest.raises(ValueError, match="not both"):
        llm(PROMPTS[0], grammar=LlamaGrammar.from_string(YES_NO), response_format={"type": "json_object"})
    with pytest.raises(ValueError, match="type must be"):
        llm.create_chat_completion(ASK_PERSON, response_format={"type": "xml"})
    with pytest.raises(ValueError, match="json_schema"):
        grammar_for_response_format({"type": "json_schema", "json_schema": {"name": "x"}})
    with pytest.raises(TypeError):
        llm(PROMPTS[0], grammar=42)
    assert grammar_for_response_format({"type": "text"}) is None
    assert text(llm(PROMPTS[0], max_tokens=8, temperature=0)) == greedy


def test_mask_refuses_a_token_the_grammar_rejected(llm):
    """libllama's accept aborts the process on such a token: the mask must raise first."""
    mask = GrammarMask(llm._vocab._model.vocab, LlamaGrammar.from_string('root ::= "yes"'))
    prompt = np.array(llm.tokenize(b"Q:"), dtype=np.intc)
    out = mask(prompt, np.zeros(llm.n_vocab(), dtype=np.float32))
    allowed = np.flatnonzero(np.isfinite(out))
    assert 0 < allowed.size < 10
    assert all(b"yes".startswith(llm.detokenize([int(t)])) for t in allowed)
    rejected = int(np.flatnonzero(~np.isfinite(out))[0])
    with pytest.raises(ValueError, match="not allowed"):
        mask(np.append(prompt, rejected), np.zeros(llm.n_vocab(), dtype=np.float32))
    mask.close()


def test_generate_takes_a_grammar(llm):
    tokens = []
    for token in llm.generate(llm.tokenize(PROMPTS[0].encode()), temp=0,
                              grammar=LlamaGrammar.from_string(YES_NO)):
        if llm._is_eog(token) or len(tokens) == 40:
            break
        tokens.append(token)
    text = llm.detokenize(tokens).decode()
    greedy = llm(PROMPTS[0], max_tokens=40, temperature=0, grammar=LlamaGrammar.from_string(YES_NO))
    assert YES_NO_RE.fullmatch(text) and text == greedy["choices"][0]["text"]
