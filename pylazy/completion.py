"""A completion's response, shaped as llama-cpp-python's: text chunks, logprobs, usage, stats.

``run_completion(llm, job)`` is the generator behind ``Llama.create_completion``: it brings
the context to the prompt (``llm._sync_prompt``), runs pylazy.generate's token loop with the
job's sampler and decode policy, and yields stream chunks; its return value is the
non-streamed response dict. Tokens, logits and the cache stay the Llama's; this module only
turns them into llama-cpp-python's dicts.
"""
from __future__ import annotations

import codecs
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from .generate import RecyclePolicy, StepStats, generate_step
from .policy import LazyPrefill
from .sampling import Sampler, StopMatcher, log_softmax

# A logprobs entry: (token text, its logprob or None, {text: logprob} of the best tokens,
# characters before the token in the returned text).
Entry = Tuple[str, Optional[float], Optional[Dict[str, float]], int]


@dataclass
class Job:
    """One validated completion request."""

    prompt: Union[str, List[int]]
    prompt_tokens: List[int]
    max_tokens: int
    sampler: Sampler
    stop: List[str]
    stream: bool
    echo: bool
    suffix: Optional[str]
    logprobs: Optional[int]
    stopping_criteria: Optional[Callable[[np.ndarray, np.ndarray], bool]]
    model_name: str
    lazy: Optional[LazyPrefill]
    recycle: RecyclePolicy


def request_times(t0: float, t_first: Optional[float], t_end: float, n_generated: int) -> Dict[str, Any]:
    """TTFT (prompt to the first token drawn) and the decode rate after it: the first token comes
    from the prefill's logits, each later one from a decode step."""
    if t_first is None:
        return {"ttft_s": None, "decode_tok_s": None}
    steps = n_generated - 1
    return {"ttft_s": t_first - t0,
            "decode_tok_s": steps / (t_end - t_first) if steps > 0 and t_end > t_first else None}


def logprob_entry(llm: Any, token: int, logits: np.ndarray, n_top: int) -> tuple:
    """(token text, its logprob, {text: logprob} of the n_top best and the token)."""
    lp = log_softmax(logits)
    text = llm._piece(token).decode("utf-8", errors="ignore")
    top: Dict[str, float] = {}
    if n_top > 0:
        best = np.argpartition(-lp, min(n_top, lp.size - 1))[:n_top]
        for i in best[np.argsort(-lp[best], kind="stable")]:
            top[llm._piece(int(i)).decode("utf-8", errors="ignore")] = float(lp[i])
    top[text] = float(lp[token])
    return text, float(lp[token]), top


def logprobs_dict(entries: List[Entry]) -> Dict[str, list]:
    return {"tokens": [e[0] for e in entries], "text_offset": [e[3] for e in entries],
            "token_logprobs": [e[1] for e in entries], "top_logprobs": [e[2] for e in entries]}


def prompt_text(llm: Any, job: Job) -> str:
    if isinstance(job.prompt, str):
        return job.prompt
    return llm.detokenize(job.prompt_tokens).decode("utf-8", errors="ignore")


class _Response:
    """The chunks and logprobs of one completion as they accumulate."""

    def __init__(self, llm: Any, job: Job):
        self.llm, self.job = llm, job
        self.id, self.created = f"cmpl-{uuid.uuid4()}", int(time.time())
        self.entries: List[Entry] = []
        self.sent = 0   # entries already in a stream chunk
        # text offsets count the characters before a token in the returned text (after the
        # prompt when it is not echoed)
        self.n_chars = 0 if job.echo else len(prompt_text(llm, job)) if job.logprobs is not None else 0

    def chunk(self, text: str, logprobs=None, finish_reason=None) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.job.model_name,
                "choices": [{"text": text, "index": 0, "logprobs": logprobs,
                             "finish_reason": finish_reason}]}

    def add_prompt_logprobs(self, rows: np.ndarray) -> None:
        """Entries of the prompt tokens (echo + logprobs): each scored by the row before it."""
        tokens = self.job.prompt_tokens
        start = 1 if tokens[0] == self.llm.token_bos() else 0
        for pos in range(start, len(tokens)):
            text = self.llm._piece(tokens[pos]).decode("utf-8", errors="ignore")
            if pos == start:  # nothing predicted the first token (OpenAI: null)
                self.entries.append((text, None, None, self.n_chars))
            else:
                self.entries.append(logprob_entry(self.llm, tokens[pos], rows[pos - 1],
                                                  self.job.logprobs) + (self.n_chars,))
            self.n_chars += len(text)
        self.sent = len(self.entries)

    def add_token(self, token: int, logits: np.ndarray, text: str) -> None:
        if self.job.logprobs is not None:
            self.entries.append(logprob_entry(self.llm, token, logits, self.job.logprobs) + (self.n_chars,))
            self.n_chars += len(text)

    def stream_chunk(self, text: str) -> dict:
        """A chunk of `text` with the logprobs entries not sent yet."""
        lp = None
        if self.job.logprobs is not None:
            lp = logprobs_dict(self.entries[self.sent:])
            self.sent = len(self.entries)
        return self.chunk(text, lp)

    def final(self, parts: List[str], finish: str, n_completion: int) -> dict:
        lp = logprobs_dict(self.entries) if self.job.logprobs is not None else None
        out = self.chunk("".join(parts), lp, finish)
        n_prompt = len(self.job.prompt_tokens)
        out["usage"] = {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
                        "total_tokens": n_prompt + n_completion}
        return out


def _decode_tokens(llm: Any, job: Job, response: _Response, tokens: Iterator[Tuple[int, np.ndarray]],
                   parts: List[str], completion: List[int], t_first: List[float]) -> Iterator[dict]:
    """Turn generated tokens into text until EOG, a stop string or max_tokens; yields stream
    chunks, returns the finish reason. t_first gets the time the first token was drawn."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
    matcher = StopMatcher(job.stop)
    finish = "stop"   # also when stopping_criteria ends the token stream
    for token, logits in tokens:
        if not t_first:
            t_first.append(time.perf_counter())
        if llm._is_eog(token):
            break
        completion.append(token)
        text = decoder.decode(llm._piece(token))
        response.add_token(token, logits, text)
        safe, hit = matcher.feed(text)
        if safe:
            parts.append(safe)
            if job.stream:
                yield response.stream_chunk(safe)
        if hit:
            break
        if len(completion) >= job.max_tokens:
            finish = "length"
            break
    tail = ""
    if not matcher.stopped:
        tail, _ = matcher.feed(decoder.decode(b"", final=True))
        tail += matcher.flush()
    tail += job.suffix or ""
    if tail:
        parts.append(tail)
        if job.stream:
            yield response.stream_chunk(tail)
    return finish


def run_completion(llm: Any, job: Job) -> Iterator[dict]:
    """The generation loop of one completion; yields stream chunks (job.stream) and returns
    the non-streamed response dict. ``llm.stats`` holds the call's counters (updated at the end)."""
    stats: Dict[str, Any] = {"prompt_tokens": len(job.prompt_tokens), "reused_tokens": 0,
                             "prefill_s": 0.0, "decode_s": 0.0, "generated_tokens": 0,
                             "finish_reason": None}
    llm.stats = stats
    response = _Response(llm, job)
    want_prompt_logprobs = job.echo and job.logprobs is not None
    t0 = time.perf_counter()
    rows, stats["reused_tokens"] = llm._sync_prompt(job.prompt_tokens, job.lazy, want_prompt_logprobs)
    t1 = time.perf_counter()
    stats["prefill_s"] = t1 - t0
    if want_prompt_logprobs:
        response.add_prompt_logprobs(rows)
    echoed = prompt_text(llm, job) if job.echo else ""
    parts: List[str] = [echoed] if job.echo else []
    completion: List[int] = []
    finish = "stop"
    if job.stream and echoed:
        yield response.chunk(echoed)
    step_stats = StepStats()
    tokens = generate_step(llm._cache, rows[-1], job.sampler, recycle=job.recycle,
                           stopping_criteria=job.stopping_criteria, stats=step_stats)
    t_first: List[float] = []
    try:
        finish = yield from _decode_tokens(llm, job, response, tokens, parts, completion, t_first)
    finally:
        tokens.close()
        t2 = time.perf_counter()
        stats.update(decode_s=t2 - t1, generated_tokens=len(completion), finish_reason=finish,
                     total_s=t2 - t0,
                     **request_times(t0, t_first[0] if t_first else None, t2, len(completion)))
        stats.update(llm._engine_stats(step_stats))
        if llm.verbose:
            print(f"pylazy: prompt {stats['prompt_tokens']} tok ({stats['reused_tokens']} reused) "
                  f"{stats['prefill_s']:.3f} s, {len(completion)} tok in {stats['decode_s']:.3f} s",
                  file=sys.stderr)
    if job.stream:
        yield response.chunk("", None, finish)
        return None
    return response.final(parts, finish, len(completion))
