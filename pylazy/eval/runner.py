"""Run the task suite under several attention policies: accuracy against speed in one command.

    python -m pylazy.eval.runner --backend llama_cpp --lengths 1024 --quick
    python -m pylazy.eval.runner --lengths 4096 8192 \
        --policy full='{}' --policy lazy='{"lazy": pylazy.LazyPrefill()}'

A policy is a dict of keyword arguments for the Llama-like runner (or a callable
context_len -> dict, e.g. `lambda L: {"recycle": Recycle(k=L // 8)}`): `{}` is full attention.
With backend "pylazy", policies made only of lazy=/recycle= share one pylazy.Llama and go to each
completion call; per prompt the full-attention-prefill ones run back to back and share one
prefill (its time is their TTFT, marked ttft_shared). Other keys open a pylazy.Llama of their
own. With backend "llama_cpp" (reference, full attention only) they must be llama_cpp.Llama
arguments. `pylazy eval` (pylazy/eval/cli.py) takes the same flags. The runner object needs the
llama-cpp-python calls `create_completion(prompt, max_tokens=, temperature=, stream=True)`
(or `create_chat_completion` with chat=True) and may have `reset()` and a `stats` dict (read after
each completion and recorded).

Perplexity: the first min(L, ppl_tokens) tokens of the natural text are the context, the next
ppl_decode tokens are teacher-forced one at a time and scored. A runner with
`perplexity(tokens, n_context, **call_kwargs) -> dict` (pylazy.Llama: forced through its decode
loop, so recycled/refresh steps and the stride policy run as in generation; LlamaCppRunner:
llama.cpp decoding token by token) is asked under every policy; one with only
`eval_logits(tokens) -> ndarray[n, vocab]` is scored from those rows (full attention); without
either perplexity is recorded as null.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
from collections import defaultdict
from typing import Callable, Optional, Sequence

import numpy as np

from .args import DEFAULT_DEPTHS, add_arguments
from .haystack import natural_prefix
from .scoring import score
from .tasks import FAMILIES, Task, make_tasks, parse_spec



def _open_llama_cpp(**kwargs):
    """llama_cpp.Llama with llama.cpp's defaults (extra buffer types off only where AMX is offered:
    pylazy/llama_ref.py)."""
    from ..llama_ref import reference_llama
    return reference_llama(**kwargs)


class LlamaCppRunner:
    """llama_cpp.Llama as a reference runner; perplexity uses a second instance with
    logits_all=True sized to the text, made on demand (logits of every token cost n*vocab*4 B)."""

    def __init__(self, model_path: str, n_ctx: int, **kwargs):
        import llama_cpp
        allowed = inspect.signature(llama_cpp.Llama.__init__).parameters
        unknown = [k for k in kwargs if k not in allowed or k == "kwargs"]
        if unknown:   # llama_cpp.Llama swallows unknown kwargs: refuse, or results are mislabeled
            raise ValueError(f"backend llama_cpp runs full attention only; cannot apply {unknown}")
        self.model_path, self.kwargs = model_path, kwargs
        self.llm = _open_llama_cpp(model_path=model_path, n_ctx=n_ctx, **kwargs)

    def __getattr__(self, name):   # create_completion, tokenize, reset, close, ...
        if name == "llm":   # not set: __init__ failed; avoid recursing
            raise AttributeError(name)
        return getattr(self.llm, name)

    def perplexity(self, tokens: Sequence[int], n_context: int) -> dict:
        """Teacher forcing as pylazy.Llama.perplexity: prefill the context, then decode one
        token at a time. (llama.cpp's one-batch logits of the whole text differ from this by
        its batched vs one-token kernels: ~0.2 % in perplexity on SmolLM2.)"""
        import llama_cpp
        tokens = list(tokens)
        ref = _open_llama_cpp(model_path=self.model_path, n_ctx=len(tokens) + 8,
                              **self.kwargs)

        def last_logits():   # without logits_all, llama-cpp-python keeps no scores
            ptr = llama_cpp.llama_get_logits_ith(ref.ctx, -1)
            return np.ctypeslib.as_array(ptr, shape=(ref.n_vocab(),)).copy()
        try:
            t0 = time.perf_counter()
            ref.eval(tokens[:n_context])
            rows = [last_logits()]
            t1 = time.perf_counter()
            for tok in tokens[n_context:-1]:
                ref.eval([tok])
                rows.append(last_logits())
            t2 = time.perf_counter()
        finally:
            ref.close()
        nlls = token_nlls(np.stack(rows), tokens[n_context:])
        n_steps = len(tokens) - 1 - n_context
        return {"ppl": math.exp(nlls.mean()), "nll": float(nlls.sum()), "n_tokens": len(nlls),
                "n_context": n_context, "nlls": nlls, "full_steps": n_steps, "recycled_steps": 0,
                "prefill_s": t1 - t0, "decode_s": t2 - t1,
                "decode_tok_s": n_steps / (t2 - t1) if n_steps and t2 > t1 else None}

    def eval_logits(self, tokens: Sequence[int]) -> np.ndarray:
        ref = _open_llama_cpp(model_path=self.model_path, n_ctx=len(tokens) + 8,
                              logits_all=True, **self.kwargs)
        try:
            ref.eval(list(tokens))
            return np.array(ref.scores[: len(tokens)], copy=True)
        finally:
            ref.close()


def open_runner(model_path: str, n_ctx: int, backend: str, policy: dict,
                n_threads: Optional[int] = None, n_gpu_layers: Optional[int] = None):
    extra = {} if n_threads is None else {"n_threads": n_threads}
    if n_gpu_layers is not None:
        extra["n_gpu_layers"] = n_gpu_layers
    if backend == "llama_cpp":
        return LlamaCppRunner(model_path, n_ctx, **extra, **policy)
    if backend == "pylazy":
        import pylazy
        # lazy/recycle explicit (None = full): a `pylazy tune` profile must not relabel a policy
        return pylazy.Llama(model_path=model_path, n_ctx=n_ctx, verbose=False, **extra,
                            **{"lazy": None, "recycle": None, **policy})
    raise ValueError(f"unknown backend {backend!r}")


CALL_POLICY_KEYS = ("lazy", "recycle")   # pylazy.Llama takes these per call as well


def policy_for(policy, length: int) -> dict:
    """A policy is a dict, or a callable context_len -> dict (e.g. Recycle k = L // 8)."""
    return dict(policy(length) if callable(policy) else policy)


def shares_prefill(kwargs: dict) -> bool:
    """Full-attention prefill: the KV cache of the same prompt serves all such policies."""
    return kwargs.get("lazy") is None


def vocab_tokenizer(model_path: str) -> Callable[[str], list]:
    """str -> token ids as the model sees a prompt (BOS included where the model adds one)."""
    vocab = _open_llama_cpp(model_path=model_path, vocab_only=True, verbose=False)
    return lambda s: vocab.tokenize(s.encode("utf-8"), add_bos=True)


def generate(runner, task: Task, chat: bool = False, reset: bool = True,
             call_kwargs: Optional[dict] = None) -> dict:
    """Greedy completion of one task: output text, TTFT, decode speed and the runner's stats.

    reset=False keeps the runner's KV cache (a prompt prefilled by the previous call is
    reused); call_kwargs go to the completion call (pylazy's per-call lazy=/recycle=)."""
    if reset and hasattr(runner, "reset"):
        runner.reset()   # no KV reuse between prompts: TTFT is a full prefill
    call_kwargs = call_kwargs or {}
    t0 = time.perf_counter()
    if chat:
        stream = runner.create_chat_completion(messages=task.chat_messages, stream=True,
                                               max_tokens=task.max_new_tokens, temperature=0.0,
                                               **call_kwargs)
    else:
        stream = runner.create_completion(task.prompt, stream=True,
                                          max_tokens=task.max_new_tokens, temperature=0.0,
                                          **call_kwargs)
    first, pieces, n_chunks = None, [], 0
    for chunk in stream:
        choice = chunk["choices"][0]
        text = (choice["delta"].get("content") if chat else choice.get("text")) or ""
        if text and first is None:
            first = time.perf_counter()
        if text:
            pieces.append(text)
            n_chunks += 1
    end = time.perf_counter()
    stats = dict(getattr(runner, "stats", None) or {})
    # streamed chunks are one per token except where a multi-byte character spans tokens
    n_gen = int(stats.get("completion_tokens", n_chunks))
    first = end if first is None else first
    decode = (n_gen - 1) / (end - first) if n_gen >= 2 and end > first else None
    return {"output": "".join(pieces), "ttft_s": first - t0, "decode_tok_s": decode,
            "completion_tokens": n_gen, "stats": stats}


def token_nlls(rows: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """-log softmax(rows[i])[targets[i]] in float64, in row blocks (the copies stay small)."""
    out = np.empty(len(targets), dtype=np.float64)
    for i in range(0, len(targets), 256):
        r = np.asarray(rows[i: i + 256], dtype=np.float64)
        m = r.max(axis=1)
        lse = m + np.log(np.exp(r - m[:, None]).sum(axis=1))
        out[i: i + len(r)] = lse - r[np.arange(len(r)), targets[i: i + len(r)]]
    return out


PPL_FIELDS = ("ppl", "nll", "n_tokens", "full_steps", "recycled_steps", "prefill_s",
              "decode_s", "decode_tok_s", "reused_tokens", "mean_query_similarity")


def perplexity(runner, tokens: Sequence[int], n_context: int,
               call_kwargs: Optional[dict] = None) -> Optional[dict]:
    """Perplexity of tokens[n_context:] given what precedes each (see the module doc): the
    runner's PPL_FIELDS, or None when it can neither teacher-force nor return logits.
    call_kwargs (pylazy's per-call lazy=/recycle=) go to runner.perplexity only; a runner
    that has only eval_logits runs full attention, so it refuses them."""
    tokens = list(tokens)
    if not 1 <= n_context < len(tokens):
        raise ValueError(f"n_context must be in [1, {len(tokens)}), got {n_context}")
    if hasattr(runner, "perplexity"):
        out = runner.perplexity(tokens, n_context, **(call_kwargs or {}))
        return {k: out.get(k) for k in PPL_FIELDS}
    if not hasattr(runner, "eval_logits") or any(v is not None for v in (call_kwargs or {}).values()):
        return None
    logits = np.asarray(runner.eval_logits(tokens))
    if logits.shape[0] < len(tokens):
        raise ValueError(f"eval_logits returned {logits.shape[0]} rows for {len(tokens)} tokens")
    nlls = token_nlls(logits[n_context - 1: len(tokens) - 1], tokens[n_context:])
    return {"ppl": math.exp(nlls.mean()), "nll": float(nlls.sum()), "n_tokens": len(nlls)}


def natural_text_tokens(tokenize, n: int) -> list[int]:
    """The first n tokens of the natural haystack text (same text for every policy)."""
    ids = tokenize(natural_prefix(6 * n))   # English prose: < 6 characters per token
    if len(ids) < n:
        raise ValueError("natural text too short for the perplexity length")
    return ids[:n]


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _aggregate(spec: str, policy: str, length: int, runs: list[dict]) -> dict:
    """One record per task x policy x length from its instances (depths, samples)."""
    by_depth = defaultdict(list)
    for r in runs:
        by_depth["none" if r["depth"] is None else f"{r['depth']:g}"].append(r["score"])
    stats = defaultdict(list)
    for r in runs:
        for k, v in r["stats"].items():
            stats[k].append(v)
    stats_mean = {k: (_mean(v) if all(isinstance(x, (int, float)) for x in v) else v[-1])
                  for k, v in stats.items()}
    return {"task": spec, "policy": policy, "context_len": length,
            "accuracy": _mean([r["score"] for r in runs]),
            "by_depth": {k: _mean(v) for k, v in by_depth.items()},
            "ttft_s": _mean([r["ttft_s"] for r in runs]),
            "decode_tok_s": _mean([r["decode_tok_s"] for r in runs]),
            "prompt_tokens": _mean([r["prompt_tokens"] for r in runs]),
            "n_instances": len(runs), "stats": stats_mean, "instances": runs}


def run_suite(model_path: Optional[str] = None, policies: Optional[dict] = None,
              lengths: Sequence[int] = (1024,), tasks: Sequence[str] = FAMILIES,
              depths: Sequence[float] = DEFAULT_DEPTHS, seed: int = 0, quick: bool = False,
              progress: bool = True, out_dir: str = "out/eval", backend: str = "pylazy",
              chat: bool = False, n_samples: int = 1, ppl_tokens: int = 2048,
              ppl_decode: int = 256, runner_factory: Optional[Callable] = None, tokenize: Optional[Callable] = None,
              make_plots: bool = True, n_threads: Optional[int] = None,
              share_runner: Optional[bool] = None, n_gpu_layers: Optional[int] = None,
              max_new_tokens: Optional[int] = None) -> dict:
    """Every task x length x depth under every policy; writes out_dir/results.json (+ PNGs), and
    out_dir/partial.jsonl as it goes (one finished instance a line: a run cut short keeps what it
    measured; scripts/eval_current.py reads it).

    A policy is a kwargs dict or a callable context_len -> dict. Loops run task-major,
    policy-minor. share_runner (default: backend pylazy without runner_factory): one runner
    for every policy made only of lazy=/recycle=, passed per call; the full-attention-prefill
    policies run back to back on each prompt so they share one prefill (llama.cpp-style
    prefix reuse), and their ttft_s is that shared prefill's time (marked ttft_shared).
    Perplexity (module doc): context min(L, ppl_tokens) per length, ppl_decode tokens
    teacher-forced after it; ppl_tokens=0 skips it; tasks=() runs perplexity only.
    quick: at most two depths (the first and last given), one sample, perplexity context
    <= 512 tokens and <= 64 forced. runner_factory(model_path, n_ctx, policy_kwargs) replaces open_runner.
    max_new_tokens caps every task's answer length (pylazy tune: the answers fit well within it).
    """
    from ..models import resolve_model_path
    model_path = resolve_model_path(model_path)   # None: the default model; registry names work too
    policies = {"full": {}} if policies is None else dict(policies)
    if quick:
        depths = sorted({depths[0], depths[-1]})
        n_samples, ppl_tokens, ppl_decode = 1, min(ppl_tokens, 512), min(ppl_decode, 64)
    if ppl_tokens and ppl_decode < 1:
        raise ValueError(f"ppl_decode must be >= 1 (tokens scored), got {ppl_decode}")
    for spec in tasks:
        parse_spec(spec)
    tokenize = tokenize or vocab_tokenizer(model_path)
    factory = runner_factory or (lambda p, n, kw: open_runner(p, n, backend, kw, n_threads, n_gpu_layers))
    if share_runner is None:
        share_runner = backend == "pylazy" and runner_factory is None
    suite = make_tasks(tasks, lengths, depths, seed, tokenize, n_samples)
    for t in suite if max_new_tokens else ():
        t.max_new_tokens = min(t.max_new_tokens, max_new_tokens)
    ppl_lens = sorted({min(n, ppl_tokens) for n in lengths}) if ppl_tokens > 0 else []
    ppl_ids = natural_text_tokens(tokenize, max(ppl_lens) + ppl_decode) if ppl_lens else []
    n_ctx = max([max(lengths) + max((t.max_new_tokens for t in suite), default=0)
                 + (256 if chat else 16)] + [n + ppl_decode for n in ppl_lens])

    runs = _PolicyRuns(policies, share_runner,
                       lambda kw: factory(model_path, n_ctx, kw), progress,
                       len(policies) * (len(suite) + len(ppl_lens) * bool(ppl_ids)))
    try:
        os.makedirs(out_dir, exist_ok=True)
        records = runs.tasks(suite, chat, os.path.join(out_dir, "partial.jsonl"))
        ppl_records = runs.perplexities(ppl_lens, ppl_ids, ppl_decode)
    finally:
        runs.close()
    results = {"config": {"model": model_path, "backend": backend, "policies": {
                   k: _describe_policy(v, lengths) for k, v in policies.items()},
                   "lengths": list(lengths), "tasks": list(tasks), "depths": list(depths),
                   "seed": seed, "quick": quick, "chat": chat, "n_samples": n_samples,
                   "max_new_tokens": max_new_tokens,
                   "ppl_tokens": ppl_tokens, "ppl_decode": ppl_decode,
                   "n_threads": n_threads, "n_gpu_layers": n_gpu_layers, "shared_prefill": bool(share_runner),
                   "ttft_note": "ttft_s = the engine's prefill_s where it reports one (else time to "
                                "the first streamed text); policies with ttft_shared reused the "
                                "named policy's full-attention prefill of the same prompt and "
                                "report its time"},
               "records": records, "perplexity": ppl_records}
    _write_results(results, out_dir, make_plots)
    return results


def _write_results(results: dict, out_dir: str, make_plots: bool) -> None:
    """results.json, the table on stdout and (make_plots) the PNGs."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=repr)
    print(format_table(results))
    if make_plots:
        from .plots import plot_all
        for path in plot_all(results, out_dir):
            print("wrote", path)


class _PolicyRuns:
    """The runners of one suite and the loops over prompts x policies.

    share_runner: one runner serves every policy made only of lazy=/recycle= (passed per
    call); the full-attention-prefill ones run back to back on each prompt so they share
    one prefill. Other policies get a runner each, made by open_runner(policy kwargs).
    """

    def __init__(self, policies: dict, share_runner: bool, open_runner: Callable, progress: bool,
                 total: int):
        self.policies, self.share_runner, self.open_runner = policies, share_runner, open_runner
        self.runners: dict = {}   # policy name (or "" for the shared runner) -> runner
        self.bar = None
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="run", file=sys.stderr)

    def is_shared(self, pname: str, length: int) -> bool:
        return self.share_runner and set(policy_for(self.policies[pname], length)) <= set(CALL_POLICY_KEYS)

    def runner_for(self, pname: str, length: int):
        key = "" if self.is_shared(pname, length) else pname
        if key not in self.runners:
            self.runners[key] = self.open_runner({} if key == "" else policy_for(self.policies[pname], length))
        return self.runners[key]

    def order(self, length: int) -> list:
        """Policy names, the full-attention-prefill ones sharing a runner first (back to back)."""
        return sorted(self.policies, key=lambda p: not (self.is_shared(p, length)
                                                        and shares_prefill(policy_for(self.policies[p], length))))

    def _tick(self, label: Optional[str] = None) -> None:
        if self.bar and label is not None:
            self.bar.set_description(label)
        elif self.bar:
            self.bar.update()

    def tasks(self, suite, chat: bool, partial_path: str) -> list:
        """Every task under every policy: the aggregated records. Each finished instance is also
        a line of partial_path at once (flushed), so a long CPU run cut short keeps its results."""
        runs = defaultdict(list)    # (policy, spec, length) -> instance records
        with open(partial_path, "w") as partial:
            for task in suite:
                self._task(task, chat, runs, partial)
        return [_aggregate(spec, pname, n, rs) for pname in self.policies
                for (pp, spec, n), rs in runs.items() if pp == pname]

    def _task(self, task, chat: bool, runs: dict, partial) -> None:
        """One prompt under every policy, the full-attention-prefill ones sharing one prefill."""
        L = task.context_len
        shared_prefill = None   # (policy name, prefill_s) of this prompt's full prefill
        for pname in self.order(L):
            kwargs = policy_for(self.policies[pname], L)
            shared = self.is_shared(pname, L)
            runner = self.runner_for(pname, L)
            reuse = shared and shares_prefill(kwargs) and shared_prefill is not None
            self._tick(f"{pname} {task.spec} {L}")
            g = generate(runner, task, chat, reset=not reuse,
                         call_kwargs={k: kwargs.get(k) for k in CALL_POLICY_KEYS} if shared else None)
            st = g["stats"]
            g["ttft_measured_s"] = g["ttft_s"]
            if "prefill_s" in st:   # the engine's own prefill time: no sampling, no streaming
                g["ttft_s"] = st["prefill_s"]
            if reuse:
                g["ttft_s"], g["ttft_shared"] = shared_prefill[1], shared_prefill[0]
            elif shared and shares_prefill(kwargs):
                shared_prefill = (pname, g["ttft_s"])
            runs[(pname, task.spec, L)].append({
                "depth": task.depth, "seed": task.seed, "score": score(task, g["output"]),
                "prompt_tokens": st.get("prompt_tokens", task.n_tokens),
                "answers": task.answers, **g})
            partial.write(json.dumps({"policy": pname, "task": task.spec, "context_len": L,
                                      **runs[(pname, task.spec, L)][-1]}, default=repr) + "\n")
            partial.flush()
            self._tick()

    def perplexities(self, ppl_lens, ppl_ids, ppl_decode: int) -> list:
        """Per context length and policy (full-attention-prefill policies back to back: pylazy
        reuses their context's cache)."""
        records = []
        for n in ppl_lens:
            for pname in self.order(n):
                self._tick(f"{pname} perplexity {n}+{ppl_decode}")
                t0 = time.perf_counter()
                kwargs = policy_for(self.policies[pname], n)
                call = {k: kwargs.get(k) for k in CALL_POLICY_KEYS} if self.is_shared(pname, n) else None
                out = perplexity(self.runner_for(pname, n), ppl_ids[:n + ppl_decode], n, call)
                records.append({"policy": pname, "context_len": n, "tokens": ppl_decode,
                                **(out or {"ppl": None}), "seconds": time.perf_counter() - t0})
                self._tick()
        records.sort(key=lambda r: (list(self.policies).index(r["policy"]), r["context_len"]))
        return records

    def close(self) -> None:
        for runner in self.runners.values():
            if hasattr(runner, "close"):
                runner.close()
        if self.bar:
            self.bar.close()


def _describe_policy(policy, lengths) -> dict:
    """kwargs reprs; a callable policy by length (not empty: plots take {} as the baseline)."""
    if callable(policy):
        return {"per_length": {str(n): {k: repr(v) for k, v in policy(n).items()} for n in lengths}}
    return {k: repr(v) for k, v in policy.items()}


def format_table(results: dict) -> str:
    """policy x length rows: accuracy per task, mean TTFT, decode speed, perplexity (at the
    largest perplexity context <= the length); then the perplexity runs' own table."""
    recs = results["records"]
    specs = list(dict.fromkeys(r["task"] for r in recs))
    ppls = results.get("perplexity", [])
    cols = ["policy", "len"] + specs + ["mean", "ttft_s", "dec_tok/s", "ppl"]
    rows = []
    for pol in dict.fromkeys(r["policy"] for r in recs):
        for n in sorted({r["context_len"] for r in recs if r["policy"] == pol}):
            sub = {r["task"]: r for r in recs if r["policy"] == pol and r["context_len"] == n}
            accs = [sub[s]["accuracy"] for s in specs if s in sub]
            p = sorted((q["context_len"], q["ppl"]) for q in ppls
                       if q["policy"] == pol and q["context_len"] <= n)
            rows.append([pol, str(n)] + [f"{sub[s]['accuracy']:.2f}" if s in sub else "-" for s in specs]
                        + [f"{_mean(accs):.2f}",
                           f"{_mean([r['ttft_s'] for r in sub.values()]):.3f}",
                           _fmt(_mean([r['decode_tok_s'] for r in sub.values()]), ".1f"),
                           _fmt(p[-1][1] if p else None, ".3f")])
    out = [_columns(cols, rows)] if rows else []
    if ppls:
        out.append(format_ppl_table(results))
    return "\n\n".join(out)


def format_ppl_table(results: dict) -> str:
    """One row per perplexity run: context, scored tokens, ppl and its change from the
    baseline (the first policy without arguments), decode steps, teacher-forced decode speed."""
    from .scoring import baseline_policy
    ppls = results.get("perplexity", [])
    base = {q["context_len"]: q for q in ppls if q["policy"] == baseline_policy(results)}
    cols = ["policy", "context", "scored", "ppl", "vs_full", "full/recycled", "dec_tok/s", "speedup"]
    rows = []
    for q in ppls:
        b = base.get(q["context_len"]) or {}
        rel = q["ppl"] / b["ppl"] - 1 if q.get("ppl") and b.get("ppl") else None
        sp = q["decode_tok_s"] / b["decode_tok_s"] if q.get("decode_tok_s") and b.get("decode_tok_s") else None
        steps = "-" if q.get("full_steps") is None else f"{q['full_steps']}/{q['recycled_steps']}"
        rows.append([q["policy"], str(q["context_len"]), str(q["tokens"]), _fmt(q.get("ppl"), ".3f"),
                     "-" if rel is None else f"{100 * rel:+.2f}%", steps,
                     _fmt(q.get("decode_tok_s"), ".1f"), _fmt(sp, ".2f")])
    return _columns(cols, rows)


def _columns(cols, rows) -> str:
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    line = lambda r: "  ".join(x.rjust(w) for x, w in zip(r, widths))
    return "\n".join([line(cols)] + [line(r) for r in rows])


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _parse_policies(items: Sequence[str]) -> dict:
    """NAME=EXPR, EXPR a Python dict expression (or `lambda L: {...}` of the context length)
    evaluated with pylazy's names imported (a dev tool: the command line is trusted)."""
    if not items:
        return {"full": {}}
    env = {}
    try:
        import pylazy
        env = {"pylazy": pylazy, **{k: getattr(pylazy, k) for k in dir(pylazy) if not k.startswith("_")}}
    except ImportError:
        pass
    out = {}
    for item in items:
        name, _, expr = item.partition("=")
        out[name] = eval(expr, env) if expr else {}
        if not (isinstance(out[name], dict) or callable(out[name])):
            raise SystemExit(f"policy {name}: {expr!r} is neither a dict nor a callable L -> dict")
    return out


def run_from_args(a: argparse.Namespace) -> dict:
    return run_suite(a.model, _parse_policies(a.policy), a.lengths, a.tasks, a.depths, a.seed,
                     quick=a.quick, progress=not a.no_progress, out_dir=a.out, backend=a.backend,
                     chat=a.chat, n_samples=a.samples, ppl_tokens=a.ppl_tokens,
                     ppl_decode=a.ppl_decode,
                     n_threads=a.threads, share_runner=False if a.no_share else None,
                     n_gpu_layers=a.n_gpu_layers, make_plots=not a.no_plots)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(ap)
    run_from_args(ap.parse_args(argv))


if __name__ == "__main__":
    main()
