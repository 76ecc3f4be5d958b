"""Question answering over synthetic multi-document context (RULER's qa, without its data sets).

Every document describes one fictional town with the same five kinds of facts (founder and
year, mayor, river, main export, population), in shuffled order and mixed with a few sentences
of the natural haystack text. The question asks one fact about one town: the answer is in that
town's document only, and every other document (a distractor) states the same kind of fact
about its own town with a different value, so matching the fact's wording is not enough; the
town must be matched too. Names are made of syllables and checked to be unique, so no answer
is guessable from outside knowledge.

Depth places the gold document: index round(depth * (n_docs - 1)). The number of documents is
the most that fits; a filler paragraph of natural text at the end of one distractor document
takes up the remaining tokens so every length is within 1-2 % of the budget.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from .haystack import largest_fit, natural_sentences

_SYLLABLES = ("ba bel cor da dor el fa fen gar hal is ka kel lan lor ma mir nar nol or pel "
              "quin ra ros sa sel tam tor ul va ven wil yr zan").split()
# goods whose names are not inside common words ("tin" is in "continue"), so a match means the word
_GOODS = ("copper salt wool amber glass timber silk pepper marble honey cider linen saffron "
          "pottery cheese leather indigo walnuts barley olives").split()
_HEAD = ("Answer the question based on the given documents. Only give me the answer and do not "
         "output any other words.\n\nThe following are given documents.\n\n")
_QUESTION_HEAD = ("\n\nAnswer the question based on the given documents. Only give me the answer and "
                  "do not output any other words.")
FILLER_PER_DOC = 2   # natural sentences mixed into each document
TOKENS_PER_DOC = 40  # fewer than any document takes: sizes the pool of towns generated
MAX_ATTEMPTS = 20    # redraws when the answer also occurs elsewhere in the prompt (rare)


@dataclass
class Town:
    name: str
    founder: str
    year: str
    mayor: str
    river: str
    export: str
    population: str


# fact kind -> (sentence, question, answer prefix, the Town field that answers it)
FACTS = {
    "founder": ("{name} was founded by {founder} in the year {year}.", "Who founded {name}?",
                "{name} was founded by", "founder"),
    "year": ("{name} was founded by {founder} in the year {year}.", "In which year was {name} founded?",
             "{name} was founded in the year", "year"),
    "mayor": ("The current mayor of {name} is {mayor}.", "Who is the current mayor of {name}?",
              "The current mayor of {name} is", "mayor"),
    "river": ("{name} lies on the banks of the river {river}.", "On which river does {name} lie?",
              "{name} lies on the banks of the river", "river"),
    "export": ("The main export of {name} is {export}.", "What is the main export of {name}?",
               "The main export of {name} is", "export"),
    "population": ("About {population} people live in {name}.", "How many people live in {name}?",
                   "The number of people who live in {name} is about", "population"),
}
_SENTENCE_KINDS = ("founder", "mayor", "river", "export", "population")   # "year" shares founder's


def _word(rng: random.Random, n_syllables: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(n_syllables)).capitalize()


def _towns(rng: random.Random, n: int) -> list[Town]:
    """n towns; names of towns, people and rivers are all distinct, and no town or river name
    is inside another (case-insensitively: "Orel" in "Dorel" would match a wrong answer)."""
    used: set[str] = set()
    words: list[str] = []   # lowercase single-word names

    def fresh(make):
        while True:
            v = make()
            low = v.lower()
            if v in used or (" " not in v and any(low in w or w in low for w in words)):
                continue
            used.add(v)
            if " " not in v:
                words.append(low)
            return v

    out = []
    for _ in range(n):
        name = fresh(lambda: _word(rng, 3))
        person = lambda: f"{_word(rng, 2)} {_word(rng, 2)}"   # noqa: E731
        out.append(Town(name, fresh(person), str(rng.randrange(1200, 1900)), fresh(person),
                        fresh(lambda: _word(rng, 2)), rng.choice(_GOODS),
                        f"{rng.randrange(2, 99)},{rng.randrange(0, 1000):03d}"))
    return out


def _body(town: Town, rng: random.Random, filler: list[str]) -> str:
    facts = [FACTS[k][0].format(**vars(town)) for k in _SENTENCE_KINDS]
    rng.shuffle(facts)
    for s in filler:   # prose between facts, at stable random places
        facts.insert(rng.randrange(len(facts) + 1), s)
    return " ".join(facts)


def _distinct_values(towns: list[Town], field: str, rng: random.Random) -> None:
    """Give every distractor a value of `field` different from the gold town's (towns[0])."""
    gold = getattr(towns[0], field)
    for t in towns[1:]:
        while getattr(t, field) == gold:   # only exports (20 goods) and years can collide
            setattr(t, field, rng.choice(_GOODS) if field == "export" else str(rng.randrange(1200, 1900)))


def make_qa(rng: random.Random, context_len: int, depth: float, tokenize, assemble):
    """(prompt, chat message, answers, answer char offset, gold doc index, n_docs) of one qa
    task; assemble(question, prefix) -> (plain tail, chat tail) as for the other families."""
    for _ in range(MAX_ATTEMPTS):
        out = _qa_attempt(rng, context_len, depth, tokenize, assemble)
        prompt, _, (answer,), *_ = out
        if prompt.lower().count(answer.lower()) == 1:   # else a match could be something else
            return out
    raise RuntimeError(f"qa: no prompt with a unique answer in {MAX_ATTEMPTS} draws")


def _qa_attempt(rng, context_len, depth, tokenize, assemble):
    kind = rng.choice(sorted(FACTS))
    towns = _towns(rng, context_len // TOKENS_PER_DOC + 8)
    _distinct_values(towns, FACTS[kind][3], rng)
    sents = natural_sentences()
    start = rng.randrange(len(sents))
    fillers = [[sents[(start + FILLER_PER_DOC * i + j) % len(sents)] for j in range(FILLER_PER_DOC)]
               for i in range(len(towns))]
    bodies = [_body(t, random.Random(rng.random()), f) for t, f in zip(towns, fillers)]
    gold = towns[0]
    _, question, prefix, field = FACTS[kind]
    tail, chat_tail = assemble(question.format(name=gold.name), prefix.format(name=gold.name))
    tail = _QUESTION_HEAD + tail
    pad_words = " ".join(sents[(start + FILLER_PER_DOC * len(towns) + j) % len(sents)]
                         for j in range(40)).split()

    def compose(n_docs: int, n_pad: int = 0):
        order = list(range(1, n_docs))          # distractors; the gold document goes in at depth
        at = round(depth * (n_docs - 1))
        order.insert(at, 0)
        # the filler paragraph closes the last distractor document (the one before, if gold is last)
        pad_doc = order[-2] if at == n_docs - 1 and n_docs > 1 else order[-1]
        docs = []
        for i, t in enumerate(order):
            text = bodies[t] + (" " + " ".join(pad_words[:n_pad]) if t == pad_doc and n_pad else "")
            docs.append(f"Document {i + 1}:\n{text}")
        return _HEAD + "\n\n".join(docs) + tail, at

    n_docs = largest_fit(tokenize, context_len, lambda n: compose(n)[0], 1, len(towns))
    if n_docs == len(towns):
        raise ValueError(f"qa: {context_len} tokens needs more than {len(towns)} documents")
    n_pad = largest_fit(tokenize, context_len, lambda m: compose(n_docs, m)[0], 0, len(pad_words))
    prompt, at = compose(n_docs, n_pad)
    answer = getattr(gold, field)
    answer_char = prompt.index(answer, prompt.index(f"Document {at + 1}:\n"))
    chat = prompt[: len(prompt) - len(tail)] + _QUESTION_HEAD + chat_tail
    return prompt, chat, [answer], answer_char, at, n_docs
