"""RULER-style task generators: length and needle depth measured with the default model's
tokenizer, determinism by seed, cwe frequencies, natural haystack text."""
import re
from collections import Counter

import pytest

from pylazy.eval.haystack import natural_sentences
from pylazy.eval.tasks import make_task, make_tasks

from pylazy.models import default_model_path  # noqa: E402

DEFAULT_MODEL = default_model_path()
BLOCKS = {"niah_multivalue", "vt"}   # needles that come as a block of several answers


@pytest.fixture(scope="module")
def tokenize():
    llama_cpp = pytest.importorskip("llama_cpp")
    vocab = llama_cpp.Llama(model_path=DEFAULT_MODEL, vocab_only=True, verbose=False)
    return lambda s: vocab.tokenize(s.encode(), add_bos=True)


def _token_index(tokenize, text, char):
    return len(tokenize(text[:char].rstrip(" ")))


def _check(task, tokenize):
    ids = tokenize(task.prompt)
    n = task.context_len
    assert 0.98 * n <= len(ids) <= n, (len(ids), n)
    assert task.n_tokens == len(ids)
    for a in task.answers:
        assert a in task.prompt
    if task.depth is None:
        return
    # haystack span: after the instruction line(s), before the question
    head_end = re.search(r"\n+", task.prompt).end()
    cs = len(tokenize(task.prompt[:head_end]))
    ce = len(tokenize(task.prompt[:task.prompt.rindex("\nQuestion:")]))
    first = _token_index(tokenize, task.prompt, task.prompt.index(task.answers[0]))
    want = cs + task.depth * (ce - cs)
    if abs(first - want) <= 0.02 * len(ids):
        return
    # a block that cannot start that late sits flush at the haystack's end
    assert task.name in BLOCKS and task.depth > 0.9, (task.name, task.depth, first, want)
    last = task.prompt.rindex(task.answers[-1]) + len(task.answers[-1])
    assert _token_index(tokenize, task.prompt, last) >= ce - 0.02 * len(ids)


@pytest.mark.parametrize("spec", ["niah_single", "niah_single:noise", "niah_multikey",
                                  "niah_multivalue", "vt", "vt:natural"])
@pytest.mark.parametrize("length", [1024, 3000])
def test_length_and_depth(spec, length, tokenize):
    for depth in (0.0, 0.3, 0.75, 1.0):
        task = make_task(spec, length, depth, seed=1, tokenize=tokenize)
        _check(task, tokenize)
        assert task.depth == depth and task.context_len == length


def test_niah_single_answer_once_and_question_names_key(tokenize):
    t = make_task("niah_single", 2048, 0.5, seed=4, tokenize=tokenize)
    value, = t.answers
    assert t.prompt.count(value) == 1 and re.fullmatch(r"\d{7}", value)
    key = re.search(r"special magic numbers? for (\S+) is: " + value, t.prompt).group(1)
    assert t.prompt.rstrip().endswith(f"for {key} mentioned in the provided text is")
    m = make_task("niah_multikey", 2048, 0.5, seed=4, tokenize=tokenize)
    assert len(re.findall(r"One of the special magic numbers for", m.prompt)) == 4
    assert m.prompt.count(m.answers[0]) == 1


def test_vt_chain_links_all_answers(tokenize):
    t = make_task("vt", 1024, 0.4, seed=2, tokenize=tokenize)
    assert len(t.answers) == 5
    value = re.search(rf"VAR {t.answers[0]} = (\d+)\.", t.prompt).group(1)
    for a, b in zip(t.answers, t.answers[1:]):
        assert f"VAR {b} = VAR {a}." in t.prompt
    assert f"assigned the value {value}" in t.prompt.splitlines()[-1]


@pytest.mark.parametrize("length", [1024, 4096])
def test_cwe_common_words_are_the_most_frequent(length, tokenize):
    t = make_task("cwe", length, None, seed=0, tokenize=tokenize)
    _check(t, tokenize)
    counts = Counter(re.findall(r"\d+\. ([a-z]+)", t.prompt))
    assert len(t.answers) == 10
    assert min(counts[a] for a in t.answers) > max(c for w, c in counts.items() if w not in t.answers)


def test_deterministic_by_seed(tokenize):
    a = make_task("niah_multikey", 1024, 0.5, seed=7, tokenize=tokenize)
    b = make_task("niah_multikey", 1024, 0.5, seed=7, tokenize=tokenize)
    c = make_task("niah_multikey", 1024, 0.5, seed=8, tokenize=tokenize)
    assert (a.prompt, a.answers) == (b.prompt, b.answers)
    assert a.answers != c.answers and a.prompt != c.prompt
    assert make_task("cwe", 1024, None, 7, tokenize).prompt == make_task("cwe", 1024, None, 7, tokenize).prompt


def test_make_tasks_grid_and_chat_messages(tokenize):
    ts = make_tasks(["niah_single:noise", "cwe"], [512], [0.0, 0.5, 1.0], seed=0, tokenize=tokenize)
    assert [(t.name, t.depth) for t in ts] == [("niah_single", 0.0), ("niah_single", 0.5),
                                               ("niah_single", 1.0), ("cwe", None)]
    msg, = ts[1].chat_messages
    assert msg["role"] == "user" and ts[1].answers[0] in msg["content"]
    assert msg["content"].rstrip().endswith("mentioned in the provided text?")
    assert "Answer:" not in msg["content"]


def test_natural_haystack_is_prose_in_fixed_order():
    s = natural_sentences()
    text = " ".join(s)
    assert len(text) > 300_000 and ">>>" not in text and "def " not in text
    assert natural_sentences() is s
    words = text.split()
    assert sum(w[0].isupper() for w in words) < 0.3 * len(words)


def test_bad_specs_are_refused(tokenize):
    with pytest.raises(ValueError):
        make_task("niah_double", 1024, 0.5, 0, tokenize)
    with pytest.raises(ValueError):
        make_task("niah_single", 1024, 1.5, 0, tokenize)
    with pytest.raises(ValueError):
        make_task("cwe:noise", 1024, None, 0, tokenize)
