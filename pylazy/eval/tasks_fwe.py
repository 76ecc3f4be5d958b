"""Frequent-words extraction (RULER's fwe, arXiv 2404.06654): aggregation over the whole context.

A text of random "coded" words (6 lowercase letters, so the model has no prior about them)
whose counts follow Zipf's law with exponent 2: the word of rank r appears
floor(N * r^-2 / zeta(2)) times, all shuffled. As in RULER the rank-1 word is "...." (noise the
question says to ignore) and the answers are ranks 2-4. N is the largest that fits the token
budget. Counts at rank 2, 3, 4, 5 are N/6.6, N/14.8, N/26.3, N/41.1: distinct for any N that
fits the shortest useful prompt, so the top three are never tied (checked anyway).
"""
from __future__ import annotations

import math
import random
import string

from .haystack import largest_fit

VOCAB_SIZE = 2000    # RULER's
WORD_LEN = 6         # RULER's coded_wordlen
ALPHA = 2.0          # RULER's Zipf exponent
N_ANSWERS = 3
NOISE_WORD = "...."

_HEAD = ("Read the following coded text and track the frequency of each coded word. Find the three "
         "most frequently appeared coded words. ")
QUESTION = ("Do not provide any explanation. Please ignore the dots '....'. What are the three most "
            "frequently appeared words in the above coded text?")
PREFIX = "According to the coded text above, the three most frequently appeared words are:"
_ZETA2 = math.pi ** 2 / 6


def coded_vocabulary(rng: random.Random) -> list[str]:
    """VOCAB_SIZE distinct random words, the first replaced by the noise word (rank 1)."""
    words: set[str] = set()
    while len(words) < VOCAB_SIZE:
        words.add("".join(rng.choice(string.ascii_lowercase) for _ in range(WORD_LEN)))
    vocab = sorted(words)
    rng.shuffle(vocab)
    vocab[0] = NOISE_WORD
    return vocab


def zipf_counts(n_words: int, n_vocab: int = VOCAB_SIZE) -> list[int]:
    """Occurrences of each rank for a text of about n_words words (RULER's sampled_cnt)."""
    return [int(n_words * (r ** -ALPHA) / _ZETA2) for r in range(1, n_vocab + 1)]


def make_fwe(rng: random.Random, context_len: int, tokenize, tail: str):
    """(prompt, chat tail-less body, answers): the largest Zipf text under context_len tokens."""
    vocab = coded_vocabulary(rng)
    shuffle_seed = rng.random()

    def build(n_words: int) -> str:
        text = [w for w, c in zip(vocab, zipf_counts(n_words)) for _ in range(c)]
        random.Random(shuffle_seed).shuffle(text)
        return _HEAD + " ".join(text) + tail

    # a coded word is >= 1 token, so context_len words is an upper bound on what fits
    n_words = largest_fit(tokenize, context_len, build, 10, max(10, context_len))
    counts = zipf_counts(n_words)
    if not counts[N_ANSWERS] > counts[N_ANSWERS + 1] or counts[N_ANSWERS] == 0:
        raise ValueError(f"fwe: {context_len} tokens is too short for distinct top-{N_ANSWERS} counts")
    prompt = build(n_words)
    return prompt, prompt[: len(prompt) - len(tail)], vocab[1: 1 + N_ANSWERS]
