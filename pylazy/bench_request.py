"""The whole request a user waits for (`pylazy bench --request N:G`): one N-token prompt and G generated
tokens, greedy, through the public `Llama` objects of both libraries, timed by one clock around the
stream: TTFT (to the first streamed token), decode rate after it and total time.

llama-cpp-python runs as a user gets it (`llama_cpp.Llama`, its defaults: flash attention off, repacked
CPU weights; extra buffer types off only where AMX is offered, pylazy/llama_ref.py), pylazy.Llama with its
defaults, which are the same, and the bench's --flash-attn / --type-k / --type-v / --no-extra-bufts on
both. pylazy runs full attention, `LazyPrefill()`, `Recycle(k=N/8)` and both. EOS is masked on both sides so every run
generates exactly G tokens; each run starts from an empty cache.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np


def _no_eos(eos: int):
    def mask(input_ids, scores):
        scores[eos] = -np.inf
        return scores
    return mask


def _time_stream(chunks) -> Dict[str, object]:
    """Consume a completion stream: TTFT, total seconds and the text."""
    t0 = time.perf_counter()
    t_first, parts = None, []
    for chunk in chunks:
        text = chunk["choices"][0]["text"]
        if text and t_first is None:
            t_first = time.perf_counter()
        parts.append(text)
    total = time.perf_counter() - t0
    return {"ttft_s": (t_first or t0 + total) - t0, "total_s": total, "text": "".join(parts)}


def request_policies(n_prompt: int) -> List[tuple]:
    """(name, create_completion keywords) of the pylazy rows."""
    from .policy import LazyPrefill, Recycle
    rec = Recycle(k=max(64, n_prompt // 8))
    return [("pylazy full", {}), ("LazyPrefill()", {"lazy": LazyPrefill()}),
            (f"Recycle(k={rec.k})", {"recycle": rec}),
            ("both", {"lazy": LazyPrefill(), "recycle": rec})]


def _row(name: str, timed: Dict[str, object], n_gen: int, extra: Optional[dict] = None) -> dict:
    decode_s = timed["total_s"] - timed["ttft_s"]
    row = {"policy": name, "ttft_s": timed["ttft_s"], "total_s": timed["total_s"],
           "decode_tok_s": (n_gen - 1) / decode_s if n_gen > 1 and decode_s > 0 else None,
           "text": timed["text"]}
    row.update(extra or {})
    return row


def request_rows(model_path: str, tokens: Sequence[int], n_gen: int, threads: int, n_ctx: int,
                 tick: Callable[[str], None] = lambda label: None, llama_kwargs: Optional[dict] = None,
                 pylazy_kwargs: Optional[dict] = None) -> List[dict]:
    """The llama-cpp-python row first, then pylazy's; ratios are total-time speedups over llama-cpp-python.
    llama_kwargs / pylazy_kwargs: more constructor arguments (GPU: n_gpu_layers, flash_attn)."""
    from llama_cpp._utils import suppress_stdout_stderr

    from .llama import Llama
    from .llama_ref import reference_llama

    prompt = list(tokens)
    rows: List[dict] = []
    with suppress_stdout_stderr(disable=False):
        ref = reference_llama(model_path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False,
                              **(llama_kwargs or {}))
    try:
        mask = _no_eos(ref.token_eos())
        ref.create_completion(prompt[:64], max_tokens=4, temperature=0)   # warm-up
        ref.reset()
        tick("request llama-cpp-python")
        timed = _time_stream(ref.create_completion(prompt, max_tokens=n_gen, temperature=0, stream=True,
                                                   logits_processor=[mask]))
        rows.append(_row("llama-cpp-python", timed, n_gen))
    finally:
        ref.close()
    # explicit None: a `pylazy tune` profile of this file must not turn "full" into something else
    llm = Llama(model_path, n_ctx=n_ctx, n_threads=threads, verbose=False, lazy=None, recycle=None,
                **(pylazy_kwargs or {}))
    try:
        mask = _no_eos(llm.token_eos())
        llm.create_completion(prompt[:64], max_tokens=4, temperature=0)   # warm-up
        for name, policy in request_policies(len(prompt)):
            tick(f"request {name}")
            llm.reset()
            timed = _time_stream(llm.create_completion(prompt, max_tokens=n_gen, temperature=0, stream=True,
                                                       logits_processor=mask, **policy))
            st = llm.stats
            rows.append(_row(name, timed, n_gen, {"kv_bytes": st["kv_bytes"], "generated": st["generated_tokens"],
                                                  "revived_tokens": st["revived_tokens"],
                                                  "computed_fraction": st["computed_fraction"]}))
    finally:
        llm.close()
    base = rows[0]["total_s"]
    full_kv = rows[1]["kv_bytes"]
    for row in rows:
        row["speedup_total"] = base / row["total_s"]
        row["same_text_as_llama_cpp"] = row["text"] == rows[0]["text"]
        if "kv_bytes" in row:
            row["kv_vs_full"] = row["kv_bytes"] / full_kv
    return rows


def request_table(rows: List[dict], n_prompt: int, n_gen: int) -> str:
    out = [f"\n### Whole request: {n_prompt}-token prompt + {n_gen} tokens\n",
           "| policy | TTFT s | decode tok/s | total s | vs llama-cpp-python | KV vs full | same text |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        dec = f"{r['decode_tok_s']:.1f}" if r["decode_tok_s"] else "-"
        kv = f"{r['kv_vs_full'] * 100:.0f} %" if "kv_vs_full" in r else "-"
        out.append(f"| {r['policy']} | {r['ttft_s']:.2f} | {dec} | {r['total_s']:.2f} | "
                   f"{r['speedup_total']:.2f}x | {kv} | {'yes' if r['same_text_as_llama_cpp'] else 'no'} |")
    return "\n".join(out) + "\n"
