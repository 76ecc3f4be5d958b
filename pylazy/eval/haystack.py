"""Haystack text for the synthetic long-context tasks, and fitting a prompt to a token budget.

Two haystacks:
- "noise": RULER's repeated filler sentences;
- "natural": English prose cleaned from the docstrings of the Python standard library that is
  installed with this interpreter (read with `ast`, never imported, never downloaded), walked
  in sorted file order so the text is the same on every machine with the same Python version.

`fit_prompt` builds head + haystack words (+ inserted needles) + tail whose token length is
within a small margin under the budget and whose needle anchors sit at the requested depths.
"""
from __future__ import annotations

import ast
import bisect
import functools
import os
import re
import sysconfig
from dataclasses import dataclass
from typing import Callable, Sequence

Tokenize = Callable[[str], list]

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

# Parts of the stdlib that are tests, tools or mostly code listings, not prose.
_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages",
              "ensurepip", "turtledemo", "__pycache__", "pydoc_data", "config-3"}
_ALLOWED = re.compile(r"^[A-Za-z0-9 ,.;:'\"()\-?!]+$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _stdlib_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in _SKIP_DIRS and not d.startswith(("config-", "lib-")))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return sorted(out, key=lambda p: os.path.relpath(p, root))


def _docstrings(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


def _prose_paragraphs(doc: str):
    """Keep paragraphs that read as sentences: unindented, no code, no markup, >= 8 words."""
    for para in re.split(r"\n\s*\n", doc):
        lines = para.split("\n")
        if any(l.startswith((" ", "\t", ">>>", "-", "*", "+", "..", "|")) for l in lines):
            continue
        text = " ".join(l.strip() for l in lines)
        text = re.sub(r":[a-z]+:`([^`]*)`", r"\1", text)   # reST roles -> their text
        text = text.replace("``", "").replace("`", "")
        text = re.sub(r"\s+", " ", text).strip()
        if len(text.split()) < 8 or not text.endswith(".") or not _ALLOWED.match(text):
            continue
        if "()" in text or "::" in text or re.search(r"\w\.\w+\(|_\w|\w_", text):
            continue   # identifiers and calls: code talk, not prose
        yield text


class _Corpus:
    """Prose sentences read file by file on demand: a short text needs only the first files."""

    def __init__(self):
        self.files = iter(_stdlib_files())
        self.sentences: list[str] = []
        self.chars = 0
        self.seen: set[str] = set()
        self.done = False

    def grow(self, min_chars: float) -> None:
        while self.chars < min_chars and not self.done:
            path = next(self.files, None)
            if path is None:
                self.done = True
                break
            for doc in _docstrings(path):
                for para in _prose_paragraphs(doc):
                    if para in self.seen:
                        continue
                    self.seen.add(para)
                    for sent in _SENTENCE_END.split(para):
                        if len(sent.split()) >= 3:
                            self.sentences.append(sent)
                            self.chars += len(sent) + 1


_CORPUS = _Corpus()


def natural_prefix(min_chars: int) -> str:
    """The start of the natural text, at least min_chars long (or all of it)."""
    _CORPUS.grow(min_chars)
    out, n = [], 0
    for sent in _CORPUS.sentences:
        if n >= min_chars:
            break
        out.append(sent)
        n += len(sent) + 1
    return " ".join(out)


@functools.lru_cache(maxsize=1)
def natural_sentences() -> tuple[str, ...]:
    """All prose sentences of the stdlib docstrings, de-duplicated, in deterministic order."""
    _CORPUS.grow(float("inf"))
    return tuple(_CORPUS.sentences)


@functools.lru_cache(maxsize=1)
def natural_vocabulary() -> tuple[str, ...]:
    """Distinct lowercase words (4-10 letters) of the natural text, in order of first use."""
    seen, out = set(), []
    for s in natural_sentences():
        for w in re.findall(r"(?<![\w'])[a-z]{4,10}(?![\w'])", s):
            if w not in seen:
                seen.add(w)
                out.append(w)
    return tuple(out)


def haystack_words(kind: str, n_tokens_hint: int, start: int = 0) -> list[str]:
    """Words of the haystack, enough for about n_tokens_hint tokens (generous: 1 word >= 1 token).

    `start` picks where in the natural text to begin (wrapping around), so seeds vary the text.
    """
    need = n_tokens_hint + 64
    if kind == "noise":
        unit = NOISE.split()
        return (unit * (need // len(unit) + 1))[:need]
    if kind != "natural":
        raise ValueError(f"unknown haystack {kind!r} (use 'noise' or 'natural')")
    sents = natural_sentences()
    words: list[str] = []
    i = start % len(sents)
    while len(words) < need:
        words.extend(sents[i].split())
        i = (i + 1) % len(sents)
    return words


@dataclass
class Insert:
    """Text spliced into the haystack; `anchor` (a substring of text) is what sits at `depth`."""
    depth: float
    text: str
    anchor: str
    primary: bool = True   # primary inserts are placed by measurement, others by estimate


@dataclass
class Fitted:
    prompt: str
    n_tokens: int
    anchor_tokens: list[int]   # token index of each insert's anchor (measured; -1 if not primary)
    context_span: tuple[int, int]   # token range of the haystack region (inserts included)


class _WordCounter:
    """Token counts of single words with a leading space, cached: cumulative sums of these
    estimate token positions in the joined text (exact for BPE tokenizers that split on spaces;
    the fitting loop corrects the rest by measuring)."""

    def __init__(self, tokenize: Tokenize):
        self.tokenize = tokenize
        self.base = len(tokenize(""))   # BOS, if the tokenizer adds one
        self.cache: dict[str, int] = {}

    def __call__(self, w: str) -> int:
        n = self.cache.get(w)
        if n is None:
            n = self.cache[w] = max(1, len(self.tokenize(" " + w)) - self.base)
        return n


def _token_at(tokenize: Tokenize, text: str, char: int) -> int:
    """Index of the token that starts at `char` (the length of the tokenized prefix)."""
    return len(tokenize(text[:char].rstrip(" ")))


def _compose(head: str, tail: str, words: Sequence[str], inserts: Sequence[Insert], order: Sequence[int],
             pos: Sequence[int]):
    """head + words with insert k before word pos[k] + tail; (prompt, the character where each
    insert's anchor starts, the character where the tail starts)."""
    parts, chars, anchor_char = [head], len(head), [0] * len(inserts)
    by_pos = sorted(order, key=lambda k: pos[k])   # stable: keeps depth order on ties
    w0, sep = 0, ""
    for k in by_pos + [None]:
        upto = len(words) if k is None else pos[k]
        if upto > w0:
            chunk = sep + " ".join(words[w0:upto])
            parts.append(chunk)
            chars += len(chunk)
            sep, w0 = " ", upto
        if k is not None:
            chunk = sep + inserts[k].text
            anchor_char[k] = chars + len(sep) + inserts[k].text.index(inserts[k].anchor)
            parts.append(chunk)
            chars += len(chunk)
            sep = " "
    return "".join(parts) + tail, anchor_char, chars


def fit_prompt(tokenize: Tokenize, target: int, head: str, tail: str, words: Sequence[str],
               inserts: Sequence[Insert], margin: float = 0.01, max_iter: int = 10) -> Fitted:
    """head + words[:n] with inserts spliced in + tail, as long as possible but <= target tokens.

    Depth d of an insert means: its anchor's first token sits at cs + d * (ce - cs), where
    [cs, ce) is the token span of the haystack region. Converges in a few tokenizations.
    """
    count = _WordCounter(tokenize)
    cum = [0]
    for w in words:
        cum.append(cum[-1] + count(w))
    order = sorted(range(len(inserts)), key=lambda k: inserts[k].depth)   # stable
    ins_len = [len(tokenize(" " + x.text)) - count.base for x in inserts]
    anchor_off = [len(tokenize(" " + x.text[:x.text.index(x.anchor)].rstrip(" "))) - count.base
                  for x in inserts]
    sentence_starts = [a for a in range(len(words) + 1) if a == 0 or words[a - 1][-1] in ".!?"]
    cs = len(tokenize(head))
    fixed = len(tokenize(head + tail)) + sum(ins_len)
    slack = max(2, int(margin * target / 2))
    tol = max(2, int(margin * target))
    goal = target - slack
    n = max(0, bisect.bisect_right(cum, goal - fixed) - 1)
    if n >= len(words):
        raise ValueError("haystack word pool too short for the target length")
    shift = [0.0] * len(inserts)
    best = None

    def nearest(cum_target: float, lo: int, hi: int) -> int:
        a = min(max(bisect.bisect_left(cum, cum_target, lo, hi + 1), lo), hi)
        if a > lo and abs(cum[a - 1] - cum_target) < abs(cum[a] - cum_target):
            a -= 1
        j = bisect.bisect_left(sentence_starts, a)   # prefer a sentence boundary nearby
        for s in sentence_starts[max(0, j - 1):j + 1]:
            if lo <= s <= hi and abs(cum[s] - cum_target) <= tol / 2:
                return s
        return a

    for _ in range(max_iter):
        hay_est = cum[n] + sum(ins_len)
        pos = [0] * len(inserts)
        before, lo = 0, 0
        for k in order:
            want = inserts[k].depth * hay_est + shift[k] - before - anchor_off[k]
            pos[k] = lo = nearest(want, lo, n)
            before += ins_len[k]
        prompt, anchor_char, tail_char = _compose(head, tail, words[:n], inserts, order, pos)
        L = len(tokenize(prompt))
        ce = _token_at(tokenize, prompt, tail_char)
        anchors, pos_ok = [-1] * len(inserts), True
        for k in range(len(inserts)):
            if not inserts[k].primary:
                continue
            anchors[k] = _token_at(tokenize, prompt, anchor_char[k])
            err = cs + inserts[k].depth * (ce - cs) - anchors[k]
            clamped = (pos[k] == 0 and err < 0) or (pos[k] == n and err > 0)
            if abs(err) > tol / 2 and not clamped:
                shift[k] += err
                pos_ok = False
        fitted = Fitted(prompt, L, anchors, (cs, ce))
        if L <= target:
            best = fitted
        if L <= target and L >= target - tol and pos_ok:
            return fitted
        # move n by the length error, in words, using the cumulative estimate
        n = max(0, min(len(words) - 1, bisect.bisect_right(cum, cum[n] + goal - L) - 1))
    if best is None:
        raise RuntimeError(f"could not fit a prompt under {target} tokens")
    return best


def largest_fit(tokenize: Tokenize, target: int, build: Callable[[int], str], lo: int, hi: int) -> int:
    """The largest m in [lo, hi] whose build(m) tokenizes to <= target tokens (length grows with
    m); ValueError when even build(lo) is too long. A binary search: ~log2(hi - lo) tokenizations."""
    if len(tokenize(build(lo))) > target:
        raise ValueError(f"{target} tokens is too short for this task")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tokenize(build(mid))) <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo
