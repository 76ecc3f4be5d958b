"""Plain numpy forward pass of llama.cpp's llama arch (and qwen2/qwen3), float64 math.

This is the engine tests' independent reference: it shares no computation with the engine
and is checked against llama.cpp itself in tests/test_reference.py. It takes two facts from
the engine rather than restating them: each architecture's RoPE layout (the architecture
table, pylazy.arch) and how many tokens a lazy stage keeps (pylazy.policy.keep_count). Weights come from
models.tiny.load_tiny_weights (numpy (n_out, n_in) matrices, so a layer is x @ W.T).

Shapes used throughout:
  h      [n_tokens, n_embd]                hidden states (residual stream)
  q      [n_tokens, n_head, head_dim]      after RoPE
  k, v   [n_tokens, n_head_kv, head_dim]   k after RoPE
  probs  [n_head, n_q, n_k]                softmax(q k^T / sqrt(head_dim)) with causal mask

GQA: query head h reads KV head h // (n_head // n_head_kv), as ggml's broadcasting does.

ggml_rounding=True (forward / layer_forward) additionally rounds where llama.cpp's CPU
backend rounds, so its output can be compared tightly: activations entering a matmul
are quantized to the weight's vec_dot type (q8_0 blocks for Q4_0/Q5_0/Q8_0 weights, f16
for F16; not done for Q4_1/Q5_1 or K-quants), K and V are stored as f16 (the default KV
cache type), and Q and the attention probabilities are rounded to f16 on their way into
the f16 K/V matmuls. Without it the math is exact float64 on the dequantized weights.
It models llama.cpp without flash attention; with flash attention (CPU) the tiny f32
model differs by max 0.03 / mean 0.0024 in the logits either way.
"""
from __future__ import annotations

import math

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from pylazy.arch import table as arch_table
from pylazy.policy import keep_count

# RoPE layout per arch, as llama.cpp's llama_model_rope_type() gives it (the architecture table).
ROPE_MODE = {a: "neox" if neox else "normal" for a, neox in arch_table().rope_neox.items()}


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last axis, then elementwise scale (ggml_rms_norm + mul)."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope(x: np.ndarray, positions, n_rot: int, base: float, mode: str = "normal") -> np.ndarray:
    """Rotate the first n_rot dims of each head of x [n, n_heads, head_dim] by position.

    Pair i (0 <= i < n_rot/2) turns by angle pos * base^(-2i/n_rot).
    mode "normal" (ggml mode 0, llama): the pair is dims (2i, 2i+1).
    mode "neox"   (ggml mode 2, qwen):  the pair is dims (i, i + n_rot/2).
    """
    x = np.array(x, dtype=np.float64)  # copy: rotated in place below
    pos = np.asarray(positions, dtype=np.float64)
    half = n_rot // 2
    inv_freq = base ** (-2.0 * np.arange(half) / n_rot)           # [half]
    angle = pos[:, None] * inv_freq[None, :]                        # [n, half]
    cos = np.cos(angle)[:, None, :]                                 # [n, 1, half]
    sin = np.sin(angle)[:, None, :]
    if mode == "normal":
        a, b = x[..., 0:n_rot:2].copy(), x[..., 1:n_rot:2].copy()
        x[..., 0:n_rot:2] = a * cos - b * sin
        x[..., 1:n_rot:2] = a * sin + b * cos
    elif mode == "neox":
        a, b = x[..., :half].copy(), x[..., half:n_rot].copy()
        x[..., :half] = a * cos - b * sin
        x[..., half:n_rot] = a * sin + b * cos
    else:
        raise ValueError(f"unknown rope mode {mode!r}")
    return x


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)  # a fully masked row gives zeros, not NaN
    e = np.exp(x - m)
    s = np.sum(e, axis=axis, keepdims=True)
    return e / np.where(s > 0, s, 1.0)


# Weight types whose ggml CPU dot product first quantizes the activations to q8_0 blocks.
# Q4_1/Q5_1 use q8_1, whose dot adds m * fp16(d * sum(q)), a rounded block-sum term
# this does not mimic; mimicking only the q8 part made SmolLM2 (Q4_1) agree worse with
# llama.cpp than no rounding at all (mean |logit diff| 0.24 vs 0.18), so they stay exact.
_Q8_BLOCK_INPUT = {"Q4_0", "Q5_0", "Q8_0", "IQ4_NL"}


def _f16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).astype(np.float16).astype(np.float64)


def _q8_blocks(x: np.ndarray) -> np.ndarray:
    """Round-trip rows of x through q8_0 (scale amax/127 per 32 values, stored as f16)."""
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    q = quantize(x32, GGMLQuantizationType.Q8_0)
    return dequantize(q, GGMLQuantizationType.Q8_0).reshape(x.shape).astype(np.float64)


def _matmul_input(x: np.ndarray, wtype: str | None) -> np.ndarray:
    """What ggml's CPU matmul turns the activations into for a weight of type wtype
    (None: no rounding). K-quants (q8_K input) are not mimicked: left exact."""
    if wtype in _Q8_BLOCK_INPUT:
        return _q8_blocks(x)
    if wtype == "F16":
        return _f16(x)
    return x


def _linear(x: np.ndarray, hp: dict, w: dict, name: str, ggml_rounding: bool) -> np.ndarray:
    """x @ W.T (+ bias when the file has one: qwen2's q/k/v, llama's optional ones)."""
    if ggml_rounding:
        x = _matmul_input(x, hp.get("weight_types", {}).get(name + ".weight"))
    y = x @ w[name + ".weight"].T.astype(np.float64)
    bias = w.get(name + ".bias")
    return y if bias is None else y + bias


def attention(q, k, v, q_pos, k_pos, *, ggml_rounding: bool = False, visible=None):
    """Causal GQA attention: query row i sees key j iff k_pos[j] <= q_pos[i] (and visible[i, j]
    when given: a lazy stage's rows see only the tokens selected into it).

    q [n_q, n_head, d], k/v [n_k, n_head_kv, d]. Returns (out [n_q, n_head*d],
    probs [n_head, n_q, n_k]; probs unrounded even with ggml_rounding)."""
    if ggml_rounding:  # f16 KV cache: K, V stored as f16; Q enters the f16 matmul as f16
        q, k, v = _f16(q), _f16(k), _f16(v)
    n_q, n_head, d = q.shape
    n_head_kv = k.shape[1]
    group = n_head // n_head_kv
    kh = np.repeat(np.transpose(k, (1, 0, 2)), group, axis=0)   # [n_head, n_k, d]
    vh = np.repeat(np.transpose(v, (1, 0, 2)), group, axis=0)
    qh = np.transpose(q, (1, 0, 2))                               # [n_head, n_q, d]
    scores = qh @ np.transpose(kh, (0, 2, 1)) / math.sqrt(d)      # [n_head, n_q, n_k]
    causal = np.asarray(k_pos)[None, :] <= np.asarray(q_pos)[:, None]
    if visible is not None:
        causal = causal & np.asarray(visible, dtype=bool)
    scores = np.where(causal[None], scores, -np.inf)
    probs = softmax(scores, axis=-1)
    out = (_f16(probs) if ggml_rounding else probs) @ vh          # [n_head, n_q, d]
    return np.transpose(out, (1, 0, 2)).reshape(n_q, n_head * d), probs


def qkv(hp: dict, w: dict, il: int, h_in: np.ndarray, positions, *, ggml_rounding: bool = False):
    """Q, K (both after RoPE) and V of layer il for hidden states h_in entering it."""
    p = f"blk.{il}."
    n = h_in.shape[0]
    d = hp["head_dim"]
    x = rms_norm(h_in, w[p + "attn_norm.weight"], hp["rms_eps"])
    q = _linear(x, hp, w, p + "attn_q", ggml_rounding).reshape(n, hp["n_head"], d)
    k = _linear(x, hp, w, p + "attn_k", ggml_rounding).reshape(n, hp["n_head_kv"], d)
    v = _linear(x, hp, w, p + "attn_v", ggml_rounding).reshape(n, hp["n_head_kv"], d)
    if p + "attn_q_norm.weight" in w:  # qwen3: per-head RMSNorm before RoPE
        q = rms_norm(q, w[p + "attn_q_norm.weight"], hp["rms_eps"])
        k = rms_norm(k, w[p + "attn_k_norm.weight"], hp["rms_eps"])
    mode = ROPE_MODE[hp["arch"]]
    q = rope(q, positions, hp["n_rot"], hp["rope_theta"], mode)
    k = rope(k, positions, hp["n_rot"], hp["rope_theta"], mode)
    return q, k, v


def layer_forward(hp, w, il, h_in, positions, k_cache=None, v_cache=None, cache_positions=None,
                  *, return_internals=False, ggml_rounding=False, visible=None):
    """Run layer il for query rows h_in [n_q, n_embd] at `positions`.

    The rows attend (causally, by position) to the given K/V cache — the other tokens they
    may see, K after RoPE, [n_c, n_head_kv, head_dim] at `cache_positions` — plus their own
    K/V, which this computes and appends after the cache. The cache must not already hold
    the query rows' positions (that would count a token twice); this raises if it does.
    Cache entries at positions beyond a row are masked for it, as in llama.cpp. visible
    [n_q, n_c + n_q] (optional) masks more: row i sees key j only where it is true.

    Returns (h_out [n_q, n_embd], k_new, v_new) — k_new/v_new [n_q, n_head_kv, head_dim]
    are the rows' own K (after RoPE) and V at this layer, i.e. what an engine must store
    when it computes (or revives) these tokens from their hidden states. With
    return_internals also a dict: q, probs [n_head, n_q, n_c + n_q], key_positions.
    """
    positions = np.asarray(positions, dtype=np.int64)
    h_in = np.asarray(h_in, dtype=np.float64)
    q, k_new, v_new = qkv(hp, w, il, h_in, positions, ggml_rounding=ggml_rounding)
    if k_cache is None:
        k_all, v_all, key_pos = k_new, v_new, positions
    else:
        cache_positions = np.asarray(cache_positions, dtype=np.int64)
        if np.intersect1d(cache_positions, positions).size:
            raise ValueError("k_cache already holds a query row's position")
        k_all = np.concatenate([np.asarray(k_cache, dtype=np.float64), k_new], axis=0)
        v_all = np.concatenate([np.asarray(v_cache, dtype=np.float64), v_new], axis=0)
        key_pos = np.concatenate([cache_positions, positions])
    attn, probs = attention(q, k_all, v_all, positions, key_pos, ggml_rounding=ggml_rounding, visible=visible)

    p = f"blk.{il}."
    h = h_in + _linear(attn, hp, w, p + "attn_output", ggml_rounding)
    x = rms_norm(h, w[p + "ffn_norm.weight"], hp["rms_eps"])
    gate = _linear(x, hp, w, p + "ffn_gate", ggml_rounding)
    up = _linear(x, hp, w, p + "ffn_up", ggml_rounding)
    silu = gate * 0.5 * (1.0 + np.tanh(0.5 * gate))  # = gate * sigmoid(gate), no exp overflow
    h_out = h + _linear(silu * up, hp, w, p + "ffn_down", ggml_rounding)  # SwiGLU
    if return_internals:
        return h_out, k_new, v_new, {"q": q, "probs": probs, "key_positions": key_pos}
    return h_out, k_new, v_new


def embed(w: dict, tokens) -> np.ndarray:
    return w["token_embd.weight"][np.asarray(tokens, dtype=np.int64)].astype(np.float64)


def output_logits(hp: dict, w: dict, h: np.ndarray, *, ggml_rounding: bool = False) -> np.ndarray:
    """Final RMSNorm and the output matrix (the embedding when tied)."""
    x = rms_norm(h, w["output_norm.weight"], hp["rms_eps"])
    name = "output.weight" if "output.weight" in w else "token_embd.weight"
    if ggml_rounding:
        x = _matmul_input(x, hp.get("weight_types", {}).get(name))
    logits = x @ w[name].T.astype(np.float64)
    if "output.bias" in w:
        logits = logits + w["output.bias"]
    return logits


def forward(hp: dict, w: dict, tokens, *, return_internals: bool = False,
            ggml_rounding: bool = False):
    """Logits [n_tokens, n_vocab] (float64) of tokens at positions 0..n-1, full causal attention.

    With return_internals returns (logits, layers) where layers[il] is a dict:
      h_in  [n, n_embd]              hidden state entering layer il (layers[0]: the embeddings)
      q     [n, n_head, head_dim]    after RoPE
      k, v  [n, n_head_kv, head_dim] k after RoPE
      probs [n_head, n, n]           attention probabilities (row i = query token i)
    plus a final entry {"h_in": hidden state after the last layer}, so len = n_layer + 1.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    positions = np.arange(len(tokens))
    h = embed(w, tokens)
    layers = []
    for il in range(hp["n_layer"]):
        h_out, k, v, inner = layer_forward(hp, w, il, h, positions, return_internals=True,
                                           ggml_rounding=ggml_rounding)
        if return_internals:
            layers.append({"h_in": h, "q": inner["q"], "k": k, "v": v, "probs": inner["probs"]})
        h = h_out
    logits = output_logits(hp, w, h, ggml_rounding=ggml_rounding)
    if return_internals:
        layers.append({"h_in": h})
        return logits, layers
    return logits


def _n_keep(keep_ratio: float, n: int) -> int:
    """ceil(keep_ratio * n) in [1, n], the product rounded to 6 decimals first so float noise
    (0.7 * 10 = 7.000000000000001) does not add a token: the engine's rule, called."""
    return keep_count(keep_ratio, n)


def _top_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, ties to the lower index; returned sorted ascending."""
    order = np.argsort(-scores, kind="stable")  # stable: equal scores keep index order
    return np.sort(order[:k])


def lazy_select(attn_probs_last_row, keep_ratio: float) -> np.ndarray:
    """Which candidate tokens a LazyLLM pruning layer keeps.

    attn_probs_last_row [n_head, n_cand]: the last token's attention probabilities over the
    candidates (the last candidate is the last token itself). Importance = mean over heads.
    n_keep = ceil(keep_ratio * n_cand), clamped to [1, n_cand] (see _n_keep for rounding),
    and it counts the last token, which is always kept; the other n_keep - 1 are the most
    important of the rest, ties to the lower index. Returns sorted candidate indices.
    """
    probs = np.asarray(attn_probs_last_row, dtype=np.float64)
    n = probs.shape[1]
    importance = probs.mean(axis=0)
    rest = _top_indices(importance[: n - 1], _n_keep(keep_ratio, n) - 1)
    return np.append(rest, n - 1).astype(np.int64)


def pool_max(scores: np.ndarray, radius: int) -> np.ndarray:
    """Along the last axis, the max over the window [j - radius, j + radius] (clipped at the ends)."""
    n = scores.shape[-1]
    out = scores.copy()
    for r in range(1, radius + 1):
        out[..., :n - r] = np.maximum(out[..., :n - r], scores[..., r:])
        out[..., r:] = np.maximum(out[..., r:], scores[..., :n - r])
    return out


def recycle_scores(q, k, pool: int = 0) -> np.ndarray:
    """The per-KV-head scores recycle_topk ranks by: [n_head_kv, n] (see there)."""
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    n_head, d = q.shape
    n_head_kv, n, _ = k.shape
    kh = np.repeat(k, n_head // n_head_kv, axis=0)
    probs = softmax(np.einsum("hd,hnd->hn", q, kh) / math.sqrt(d), axis=-1)
    per_kv = probs.reshape(n_head_kv, n_head // n_head_kv, n).max(axis=1)
    return pool_max(per_kv, pool) if pool else per_kv


def recycle_topk_shared(qs, ks, k_count: int, pool: int, share: float, n_candidates: int) -> tuple:
    """recycle_topk for every layer with Recycle(share=), as the engine does it: scores over every
    token the query sees (ks include the refresh token itself), pooled, plus share x each token's best
    score over all layers and KV heads; the top k_count among the first n_candidates tokens (the
    refresh token is not a candidate). Returns (per-layer picks, per-layer ranked scores)."""
    scores = [recycle_scores(q, k, pool) for q, k in zip(qs, ks)]
    best = np.max([s.max(axis=0) for s in scores], axis=0)
    ranked = [(s + share * best)[:, :n_candidates] for s in scores]
    kc = min(k_count, n_candidates)
    picks = [np.stack([_top_indices(r[g], kc) for g in range(r.shape[0])]).astype(np.int64) for r in ranked]
    return picks, ranked


def recycle_topk(q, k, k_count: int, pool: int = 0) -> np.ndarray:
    """Per KV head, the k_count tokens a recycled-attention full step keeps.

    q [n_head, d] (one query, after RoPE), k [n_head_kv, n, d] (after RoPE). Score of token j
    for KV head g = max over the query heads of group g (heads g*G .. g*G+G-1) of
    softmax_j(q_h . k_gj / sqrt(d)). Top k_count (clamped to n) per KV head, ties to the
    lower index. pool > 0: each token's score is first replaced by the max over tokens
    j-pool .. j+pool (SnapKV-style clustering). Returns int64 [n_head_kv, min(k_count, n)],
    each row sorted ascending.
    """
    per_kv = recycle_scores(q, k, pool)                                # [n_head_kv, n]
    kc = min(k_count, per_kv.shape[1])
    return np.stack([_top_indices(row, kc) for row in per_kv]).astype(np.int64)


def llama_greedy(ref, n: int) -> list:
    """llama.cpp's greedy continuation of what `ref` (a llama_cpp.Llama with logits_all) evaluated,
    token by token from its own logits: the reference for a greedy decode of n tokens."""
    tokens = []
    for _ in range(n):
        tokens.append(int(ref.scores[ref.n_tokens - 1].argmax()))
        ref.eval([tokens[-1]])
    return tokens
