"""``Llama.perplexity``: a text's continuation teacher-forced through the token loop.

Every forced token goes through pylazy.generate.generate_step, the loop generation runs, so a
decode policy's refresh and recycled steps (and its fixed or dynamic stride) are exactly what
generating would do; each token is scored by the logits before it.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from .generate import ContextCache, Forced, RecyclePolicy, StepStats, generate_step
from .validate import check_int


def forced_nlls(cache: ContextCache, logits: np.ndarray, forced: List[int], recycle: RecyclePolicy,
                stats: StepStats) -> np.ndarray:
    """-log p of each forced token (nats, float64) under the logits before it: the first by
    `logits` (after the cache), token i by the decode step of token i - 1. The last forced
    token is scored, never evaluated (as the last generated token)."""
    nlls = np.empty(len(forced), dtype=np.float64)
    # generation's own loop, with a "sampler" that draws the text's next token
    steps = generate_step(cache, logits, Forced(forced), recycle=recycle, stats=stats)
    try:
        for i, (token, row) in enumerate(steps):
            x = row.astype(np.float64)
            top = x.max()
            nlls[i] = top + np.log(np.exp(x - top).sum()) - x[token]
            if i == len(forced) - 1:
                break   # before the loop evaluates it
    finally:
        steps.close()
    return nlls


def perplexity(llm: Any, text: Union[str, Sequence[int]], n_context: Optional[int],
               lazy: Any, recycle: Any) -> Dict[str, Any]:
    """Llama.perplexity (see there) on `llm`; lazy/recycle as given to it (... = the default)."""
    if isinstance(text, (bytes, bytearray)):
        raise TypeError("perplexity() takes a str or token ids, not bytes (decode it first)")
    if not isinstance(text, str) and not isinstance(text, Sequence) \
            and not isinstance(text, np.ndarray):
        raise TypeError(f"perplexity() takes a str or a sequence of token ids, got "
                        f"{type(text).__name__}")
    lazy, recycle = llm._policies(lazy, recycle)
    tokens = llm._prompt_tokens(text if isinstance(text, str) else list(text))
    if len(tokens) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {len(tokens)}")
    n_context = len(tokens) // 2 if n_context is None else check_int("n_context", n_context, 1)
    if n_context >= len(tokens):
        raise ValueError(f"n_context ({n_context}) must leave tokens to score "
                         f"(the text has {len(tokens)})")
    if len(tokens) - 1 > llm.n_ctx():   # the last token is scored, never evaluated
        raise ValueError(f"perplexity of {len(tokens)} tokens evaluates {len(tokens) - 1}; "
                         f"they exceed the context window of {llm.n_ctx()}")
    context, forced = tokens[:n_context], tokens[n_context:]
    t0 = time.perf_counter()
    row, reused = llm._perplexity_context(context, lazy)
    t1 = time.perf_counter()
    step_stats = StepStats()
    nlls = forced_nlls(llm._cache, row, forced, recycle, step_stats)
    t2 = time.perf_counter()
    llm.stats = {"prompt_tokens": n_context, "reused_tokens": reused, "prefill_s": t1 - t0,
                 "decode_s": t2 - t1, "forced_tokens": len(forced), "total_s": t2 - t0,
                 **llm._engine_stats(step_stats)}
    nll = float(nlls.sum())
    n_steps = len(forced) - 1
    return {"ppl": float(np.exp(nll / len(forced))), "nll": nll, "n_tokens": len(forced),
            "n_context": n_context, "nlls": nlls,
            "full_steps": llm.stats["full_steps"], "recycled_steps": llm.stats["recycled_steps"],
            "prefill_s": t1 - t0, "decode_s": t2 - t1,
            "decode_tok_s": n_steps / (t2 - t1) if n_steps and t2 > t1 else None,
            "reused_tokens": reused,
            "mean_query_similarity": llm.stats["mean_query_similarity"]}

