"""The task families added for issue 22: variable tracking with scattered hops and a distractor
chain, frequent-words extraction (Zipf counts), QA over generated documents. Each: the prompt's
measured length and answer position, the facts the answer rests on, determinism by seed, and the
scorer on known outputs."""
import re
from collections import Counter

import pytest

from pylazy.eval import tasks_fwe
from pylazy.eval.scoring import score
from pylazy.eval.tasks import make_task, make_tasks
from pylazy.models import default_model_path


@pytest.fixture(scope="module")
def tokenize():
    llama_cpp = pytest.importorskip("llama_cpp")
    vocab = llama_cpp.Llama(model_path=default_model_path(), vocab_only=True, verbose=False)
    return lambda s: vocab.tokenize(s.encode(), add_bos=True)


def _token_at(tokenize, text, char):
    return len(tokenize(text[:char].rstrip(" ")))


# ---------------------------------------------------------------- variable tracking

def test_vt_hops_are_scattered_in_order_and_a_distractor_chain_differs(tokenize):
    t = make_task("vt", 2048, 0.2, seed=3, tokenize=tokenize)
    assert 0.98 * 2048 <= t.n_tokens == len(tokenize(t.prompt)) <= 2048
    names, value = t.answers, re.search(r"assigned the value (\d{5})", t.prompt.splitlines()[-2]).group(1)
    hops = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    at = [t.prompt.index(h) for h in hops]
    assert at == sorted(at) and all(t.prompt.count(h) == 1 for h in hops)
    tok = [_token_at(tokenize, t.prompt, c) for c in at]
    # the first hop at 20 % of the haystack, the others spread out: no two hops within 8 % of the prompt
    assert abs(tok[0] - 0.2 * t.n_tokens) < 0.04 * t.n_tokens
    assert min(b - a for a, b in zip(tok, tok[1:])) > 0.08 * t.n_tokens
    assert _token_at(tokenize, t.prompt, t.prompt.index(names[0])) == t.answer_token
    # one more chain of 5 variables from another 5-digit value, none of its names answers
    starts = re.findall(r"VAR ([A-Z]{5}) = (\d{5})\.", t.prompt)
    assert len(starts) == 2 and (names[0], value) in starts
    other = [s for s in starts if s[1] != value]
    assert len(other) == 1 and other[0][0] not in names
    assert len(re.findall(r"VAR [A-Z]{5} = VAR [A-Z]{5}\.", t.prompt)) == 8
    assert score(t, "they are: " + ", ".join(names)) == 1.0
    assert score(t, f"{names[0]}, {names[2]}, {other[0][0]}") == pytest.approx(0.4)


# ---------------------------------------------------------------- frequent words

def test_zipf_counts_follow_rulers_formula():
    c = tasks_fwe.zipf_counts(1000, 6)
    assert c == [607, 151, 67, 37, 24, 16]   # int(1000 / r^2 / (pi^2 / 6))


@pytest.mark.parametrize("length", [1024, 4096])
def test_fwe_answers_are_the_three_most_frequent_coded_words(length, tokenize):
    t = make_task("fwe", length, None, seed=5, tokenize=tokenize)
    assert t.depth is None and t.answer_token == -1
    assert 0.98 * length <= t.n_tokens == len(tokenize(t.prompt)) <= length
    body = t.prompt[t.prompt.index("coded words. ") + 13: t.prompt.index("\nQuestion:")]
    counts = Counter(body.split())
    ranked = [w for w, _ in counts.most_common()]
    assert ranked[0] == "...." and ranked[1:4] == t.answers
    assert all(re.fullmatch(r"[a-z]{6}", w) for w in ranked[1:])
    assert counts[t.answers[2]] > counts[ranked[4]]                      # no tie at the cut
    # the whole count profile is Zipf's for one text size N (rank 1: int(N / zeta(2)))
    profile = [c for _, c in counts.most_common()]
    n_words = [n for n in range(int(profile[0] * 1.6449) - 2, int(profile[0] * 1.6449) + 3)
               if [c for c in tasks_fwe.zipf_counts(n, len(profile) + 1) if c] == profile]
    assert n_words, profile[:8]
    assert score(t, " ".join(t.answers)) == 1.0
    assert score(t, f"{t.answers[0]}, {ranked[5]}, {t.answers[2]}") == pytest.approx(2 / 3)
    assert score(t, "....") == 0.0


def test_fwe_is_deterministic_by_seed(tokenize):
    a, b, c = (make_task("fwe", 1024, None, s, tokenize) for s in (1, 1, 2))
    assert (a.prompt, a.answers) == (b.prompt, b.answers) and a.answers != c.answers
    with pytest.raises(ValueError, match="no haystack"):
        make_task("fwe:noise", 1024, None, 1, tokenize)


# ---------------------------------------------------------------- QA over documents

def _documents(prompt):
    return re.findall(r"Document (\d+):\n(.*?)(?=\n\nDocument|\n\nAnswer the question)", prompt, re.S)


@pytest.mark.parametrize("depth", [0.0, 0.4, 1.0])
def test_qa_gold_document_at_depth_and_distractors_differ(depth, tokenize):
    t = make_task("qa", 2048, depth, seed=2, tokenize=tokenize)
    assert 0.98 * 2048 <= t.n_tokens == len(tokenize(t.prompt)) <= 2048
    docs = _documents(t.prompt)
    assert [int(i) for i, _ in docs] == list(range(1, len(docs) + 1)) and len(docs) >= 8
    answer, = t.answers
    question = t.prompt.splitlines()[-2]
    town = re.findall(r" ([A-Z][a-z]+)", question)[-1]   # the only name in the question
    gold = [k for k, (_, text) in enumerate(docs) if town in text]
    assert len(gold) == 1 and gold[0] == round(depth * (len(docs) - 1))   # the town's only document
    assert answer in docs[gold[0]][1] and t.prompt.lower().count(answer.lower()) == 1
    assert abs(_token_at(tokenize, t.prompt, t.prompt.index(answer)) - t.answer_token) <= 1
    # every distractor states the same kind of fact about its own town
    pattern = {"Who founded": r"founded by ([A-Z]\w+ [A-Z]\w+)", "In which year": r"in the year (\d{4})",
               "Who is the current mayor": r"mayor of \w+ is ([A-Z]\w+ [A-Z]\w+)",
               "On which river": r"river ([A-Z]\w+)", "What is the main export": r"export of \w+ is (\w+)",
               "How many people": r"About ([\d,]+) people"}
    regex = next(v for k, v in pattern.items() if question.startswith("Question: " + k))
    values = [re.search(regex, text).group(1) for _, text in docs]
    assert values[gold[0]] == answer and answer not in values[:gold[0]] + values[gold[0] + 1:]
    # RULER's qa metric: any reference answer found
    assert score(t, f" {answer}.") == 1.0
    assert score(t, values[(gold[0] + 1) % len(docs)]) == 0.0


def test_qa_deterministic_and_chat_message_ends_with_the_question(tokenize):
    a, b = (make_task("qa", 1024, 0.5, 9, tokenize) for _ in range(2))
    c = make_task("qa", 1024, 0.5, 10, tokenize)
    assert (a.prompt, a.answers) == (b.prompt, b.answers) and a.prompt != c.prompt
    msg, = a.chat_messages
    question = a.prompt.splitlines()[-2][len("Question: "):]
    assert msg["content"].endswith("\n" + question) and "Answer:" not in msg["content"][-200:]
    assert msg["content"].startswith(a.prompt[:200])


def test_new_families_in_the_suite_grid(tokenize):
    ts = make_tasks(["fwe", "qa", "vt"], [1024], [0.25, 0.75], seed=0, tokenize=tokenize)
    assert [(t.name, t.depth) for t in ts] == [("fwe", None), ("qa", 0.25), ("qa", 0.75),
                                               ("vt", 0.25), ("vt", 0.75)]
    with pytest.raises(ValueError, match="no haystack"):
        make_task("qa:natural", 1024, 0.5, 0, tokenize)
    with pytest.raises(ValueError, match="depth"):
        make_task("qa", 1024, None, 0, tokenize)
