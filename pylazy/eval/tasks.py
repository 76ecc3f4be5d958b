"""RULER-style synthetic long-context tasks, sized in tokens of the model under test.

Families (RULER, arXiv 2404.06654): niah_single, niah_multikey, niah_multivalue, vt (variable
tracking: a chain of assignments whose hops are spread from the depth to the end, plus a
distractor chain), cwe (common-words extraction), fwe (frequent-words extraction, tasks_fwe.py),
qa (one question over generated documents about fictional towns, tasks_qa.py). A task spec is
"family" or "family:haystack" with haystack "noise" or "natural" (see haystack.py); cwe, fwe
and qa have no haystack option, cwe and fwe no depth (the answer is spread over the context).

Depth: the first answer's first token sits at cs + depth * (ce - cs), [cs, ce) the token span of
the haystack region (within 1-2 % of the prompt length). Where the needle is a block (multivalue's
needles, vt's chain) that cannot fit after that point, it is placed flush at the haystack's end.
Lengths count the plain prompt's tokens; a chat template adds its own few dozen tokens.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from .haystack import Insert, fit_prompt, haystack_words, natural_sentences, natural_vocabulary

Tokenize = Callable[[str], list]

FAMILIES = ("niah_single", "niah_multikey", "niah_multivalue", "vt", "cwe", "fwe", "qa")
DEFAULT_HAYSTACK = {"niah_single": "natural", "niah_multikey": "natural",
                    "niah_multivalue": "natural", "vt": "noise", "cwe": None, "fwe": None, "qa": None}
DEPTH_FREE = ("cwe", "fwe")
MAX_NEW_TOKENS = {"niah_single": 32, "niah_multikey": 32, "niah_multivalue": 64, "vt": 48, "cwe": 120,
                  "fwe": 50, "qa": 32}
N_DISTRACTORS = 3    # niah_multikey: keys besides the one asked (RULER multikey_1 uses 4 keys)
N_VALUES = 4         # niah_multivalue
N_HOPS = 4           # vt: VAR chain of N_HOPS + 1 names
N_VT_DISTRACTORS = 1 # vt: chains of other values, hops at random depths
N_COMMON = 10        # cwe


@dataclass
class Task:
    name: str                 # family
    context_len: int          # requested prompt length in tokens
    depth: Optional[float]    # None for depth-free families (cwe)
    seed: int
    prompt: str               # plain text: instruction, haystack, question, answer prefix
    answers: list[str]
    max_new_tokens: int
    haystack: Optional[str] = None
    chat_messages: list[dict] = field(default_factory=list)   # same task for chat templates
    n_tokens: int = 0         # measured prompt tokens
    answer_token: int = -1    # measured token index of the first answer (-1: no depth)

    @property
    def spec(self) -> str:
        return self.name if self.haystack is None else f"{self.name}:{self.haystack}"


def parse_spec(spec: str) -> tuple[str, Optional[str]]:
    family, _, hay = spec.partition(":")
    if family not in FAMILIES:
        raise ValueError(f"unknown task {family!r}; known: {', '.join(FAMILIES)}")
    if DEFAULT_HAYSTACK[family] is None and hay:
        raise ValueError(f"{family} has no haystack")
    hay = hay or DEFAULT_HAYSTACK[family]
    return family, hay


def _rng(*parts) -> random.Random:
    return random.Random("|".join(map(str, parts)))   # str seeds hash with sha512: stable


# Needle keys are "adjective-noun" as in RULER; small fixed lists keep noise tasks corpus-free.
_ADJECTIVES = ("amber ancient bitter brave bright calm clever cold crimson curious damp dark "
               "eager early fancy fierce gentle giant golden grumpy hollow humble icy jolly "
               "lazy little lively loud lucky mellow misty modern narrow nervous noble odd "
               "pale polite proud quiet rapid rough royal rusty shiny silent silver sleepy "
               "smooth solid sour steady stormy sunny swift tame tender tiny vivid wild").split()
_NOUNS = ("anchor badger basket beacon bicycle blanket bottle bridge camel candle canyon "
          "castle cherry cliff comet cotton crayon desert dolphin engine falcon feather "
          "forest garden glacier hammer harbor helmet island jacket kettle ladder lantern "
          "lemon magnet meadow mirror monkey needle orchard otter parrot pebble pencil "
          "pepper piano pillow planet pocket rabbit ribbon river saddle tunnel violin walnut").split()


def _keys(rng: random.Random, n: int) -> list[str]:
    keys: list[str] = []
    while len(keys) < n:
        k = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
        if k not in keys:
            keys.append(k)
    return keys


def _numbers(rng: random.Random, n: int, digits: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        v = str(rng.randrange(10 ** (digits - 1), 10 ** digits))
        if v not in out:
            out.append(v)
    return out


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


_NIAH_HEAD = ("Some special magic numbers are hidden within the following text. "
              "Make sure to memorize them. I will quiz you about the numbers afterwards.\n")


def _niah(family, rng, depth):
    """(head, question, answer prefix, inserts, answers) of a needle-in-a-haystack task."""
    if family == "niah_multivalue":
        key, = _keys(rng, 1)
        values = _numbers(rng, N_VALUES, 7)
        block = " ".join(_needle(key, v) for v in values)
        q = f"What are all the special magic numbers for {key} mentioned in the provided text?"
        prefix = f"The special magic numbers for {key} mentioned in the provided text are"
        return _NIAH_HEAD, q, prefix, [Insert(depth, block, values[0])], values
    n_keys = 1 + (N_DISTRACTORS if family == "niah_multikey" else 0)
    keys, values = _keys(rng, n_keys), _numbers(rng, n_keys, 7)
    inserts = [Insert(depth, _needle(keys[0], values[0]), values[0])]
    for i in range(1, n_keys):   # distractors spread over the haystack, away from the answer
        d = (i - 0.5) / (n_keys - 1)
        if abs(d - depth) < 0.1:
            d = d + 0.15 if d + 0.15 <= 1 else d - 0.15
        inserts.append(Insert(d, _needle(keys[i], values[i]), values[i], primary=False))
    q = f"What is the special magic number for {keys[0]} mentioned in the provided text?"
    prefix = f"The special magic number for {keys[0]} mentioned in the provided text is"
    return _NIAH_HEAD, q, prefix, inserts, [values[0]]


def _vt_chain(names: list[str], value: str) -> list[str]:
    return [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]


def _vt(rng, depth):
    """The asked chain's hops at depth, then spread evenly towards the end (each hop in its own
    place, as RULER scatters them: following the chain takes one lookup per hop); the
    distractor chains' hops at random depths, in order."""
    n_chains = 1 + N_VT_DISTRACTORS
    names: list[str] = []
    while len(names) < (N_HOPS + 1) * n_chains:
        v = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if v not in names:
            names.append(v)
    values = _numbers(rng, n_chains, 5)
    chains = [names[i * (N_HOPS + 1):(i + 1) * (N_HOPS + 1)] for i in range(n_chains)]
    asked = _vt_chain(chains[0], values[0])
    span = 1.0 - depth
    inserts = [Insert(depth + span * i / len(asked), hop, chains[0][i], primary=i == 0)
               for i, hop in enumerate(asked)]
    for names_i, value in zip(chains[1:], values[1:]):
        depths = sorted(rng.random() for _ in range(N_HOPS + 1))
        inserts += [Insert(d, hop, names_i[j], primary=False)
                    for j, (d, hop) in enumerate(zip(depths, _vt_chain(names_i, value)))]
    head = "Memorize and track the chain(s) of variable assignments hidden in the following text.\n\n"
    q = f"Find all variables that are assigned the value {values[0]} in the text above."
    prefix = (f"According to the chain(s) of variable assignments in the text above, {len(chains[0])} "
              f"variables are assigned the value {values[0]}, they are:")
    return head, q, prefix, inserts, chains[0]


def _assemble(question: str, prefix: str) -> tuple[str, str]:
    """The tail of the plain prompt, and the user message's tail for chat use."""
    return f"\nQuestion: {question}\nAnswer: {prefix}", f"\n{question}"


def _cwe(rng: random.Random, context_len: int, tokenize: Tokenize):
    head = ("Below is a numbered list of words. In these words, some appear more often than "
            "others. Memorize the ones that appear most often.\n")
    q = f"What are the {N_COMMON} most common words in the above list?"
    prefix = f"The top {N_COMMON} words that appear most often in the list are:"
    tail, chat_tail = _assemble(q, prefix)
    words = list(natural_vocabulary())
    rng.shuffle(words)
    common, rare_pool = words[:N_COMMON], words[N_COMMON:]
    fixed = len(tokenize(head + tail))
    est_entries = max(N_COMMON * 4, (context_len - fixed) // 4)   # "123. word " ~ 4 tokens
    # RULER: common words 30x, others 3x; short lists scale both down so both kinds fit
    freq_cw = int(min(30, max(3, round(0.3 * est_entries / N_COMMON))))
    freq_rare = 1 if freq_cw < 10 else 3
    freq_rare = max(freq_rare, math.ceil((est_entries - freq_cw * N_COMMON) / len(rare_pool)))
    if freq_rare >= freq_cw - 1:
        raise ValueError(f"cwe: vocabulary too small for {context_len} tokens")
    shuffle_seed = rng.random()

    def build(m: int) -> str:
        items = [w for w in common for _ in range(freq_cw)]
        items += [w for w in rare_pool[:m] for _ in range(freq_rare)]
        random.Random(shuffle_seed).shuffle(items)
        return head + " ".join(f"{i + 1}. {w}" for i, w in enumerate(items)) + tail

    lo, hi = 0, len(rare_pool)
    if len(tokenize(build(0))) > context_len:
        raise ValueError(f"cwe: {context_len} tokens is too short")
    while lo < hi:   # largest m whose prompt fits: length grows with m
        mid = (lo + hi + 1) // 2
        if len(tokenize(build(mid))) <= context_len:
            lo = mid
        else:
            hi = mid - 1
    prompt = build(lo)
    chat = [{"role": "user", "content": prompt[: len(prompt) - len(tail)] + chat_tail}]
    return prompt, chat, common


def _fwe(rng: random.Random, context_len: int, tokenize: Tokenize):
    from .tasks_fwe import PREFIX, QUESTION, make_fwe
    tail, chat_tail = _assemble(QUESTION, PREFIX)
    prompt, body, answers = make_fwe(rng, context_len, tokenize, tail)
    return prompt, [{"role": "user", "content": body + chat_tail}], answers


def make_task(spec: str, context_len: int, depth: Optional[float], seed: int,
              tokenize: Tokenize) -> Task:
    """One task instance; the same arguments always give the same task."""
    family, hay = parse_spec(spec)
    rng = _rng(family, hay, context_len, depth, seed)
    if family in DEPTH_FREE:
        prompt, chat, answers = (_cwe(rng, context_len, tokenize) if family == "cwe"
                                 else _fwe(rng, context_len, tokenize))
        return Task(family, context_len, None, seed, prompt, answers, MAX_NEW_TOKENS[family],
                    None, chat, len(tokenize(prompt)), -1)
    if depth is None or not 0.0 <= depth <= 1.0:
        raise ValueError(f"{family} needs a depth in [0, 1], got {depth}")
    if family == "qa":
        from .tasks_qa import make_qa
        prompt, chat, answers, answer_char, _, _ = make_qa(rng, context_len, depth, tokenize, _assemble)
        return Task(family, context_len, depth, seed, prompt, answers, MAX_NEW_TOKENS[family], None,
                    [{"role": "user", "content": chat}], len(tokenize(prompt)),
                    len(tokenize(prompt[:answer_char].rstrip(" "))))
    head, q, prefix, inserts, answers = (_vt(rng, depth) if family == "vt"
                                         else _niah(family, rng, depth))
    tail, chat_tail = _assemble(q, prefix)
    start = rng.randrange(len(natural_sentences())) if hay == "natural" else 0
    words = haystack_words(hay, context_len, start)
    fit = fit_prompt(tokenize, context_len, head, tail, words, inserts)
    body = fit.prompt[: len(fit.prompt) - len(tail)]
    chat = [{"role": "user", "content": body + chat_tail}]
    return Task(family, context_len, depth, seed, fit.prompt, answers, MAX_NEW_TOKENS[family],
                hay, chat, fit.n_tokens, fit.anchor_tokens[0])


def make_tasks(specs: Sequence[str], lengths: Sequence[int], depths: Sequence[float], seed: int,
               tokenize: Tokenize, n_samples: int = 1) -> list[Task]:
    """All instances: spec x length x depth (depth-free families once per length) x sample."""
    out = []
    for spec in specs:
        family, _ = parse_spec(spec)
        for n in lengths:
            for d in ([None] if family in DEPTH_FREE else depths):
                for s in range(n_samples):
                    out.append(make_task(spec, n, d, seed + s, tokenize))
    return out
