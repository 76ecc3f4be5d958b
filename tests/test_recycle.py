"""Recycled attention against references: exact full attention when K >= context or S = 1, and the
numpy reference for which tokens a refresh keeps per KV head and what a recycled step computes."""
import math

import numpy as np
import pytest

from pylazy.engine import Context, Model, RecycleMode
from pylazy.policy import StepKind
from tests import reference as R


def _generate(model, prompt, n, *, mode=RecycleMode.OFF, k=0, stride=1, n_ctx=512, **ctx_kw):
    """Greedy generation with a fixed stride: logits of every step."""
    with Context(model, n_ctx=n_ctx, **ctx_kw) as ctx:
        ctx.set_recycle(mode, k, stride, 4)
        out = [ctx.eval(prompt)[0]]
        for i in range(n):
            logits, _, _ = ctx.decode(int(out[-1].argmax()), StepKind.RECYCLED if i % stride != 0 else StepKind.FULL)
            out.append(logits)
        return np.array(out), ctx.recycle_stats()


# Both attention paths (flash attention and llama.cpp's mul_mat + softmax, V transposed) and a quantized
# KV cache (through flash attention, which a quantized V needs).
@pytest.mark.parametrize("kv", [dict(), dict(flash_attn=True), dict(flash_attn=True, type_k="q8_0", type_v="q8_0")])
def test_k_over_context_or_stride_1_equals_full(default_model_path, kv):
    m = Model(default_model_path, n_threads=2)
    prompt = list(range(2000, 2064))
    full, _ = _generate(m, prompt, 256, **kv)
    big_k, st = _generate(m, prompt, 256, mode=RecycleMode.TOPK, k=4096, stride=16, **kv)
    assert st["recycled_steps"] > 200
    s1, st1 = _generate(m, prompt, 256, mode=RecycleMode.TOPK, k=16, stride=1, **kv)
    assert st1["recycled_steps"] == 0
    m.close()
    assert np.array_equal(full, big_k)
    assert np.array_equal(full, s1)


def _close_sets(engine_rows, ref_rows, scores, margin=1e-3):
    for g, (a, b) in enumerate(zip(engine_rows, ref_rows)):
        diff = set(a.tolist()) ^ set(b.tolist())
        if diff:
            cut = min(scores[g][p] for p in b)
            assert all(abs(scores[g][p] - cut) < margin for p in diff), (g, sorted(diff))


@pytest.mark.parametrize("flash_attn", [False, True])
def test_refresh_topk_and_recycled_step_match_numpy(tiny, flash_attn):
    m, hp, w = tiny
    K, G = 8, hp["n_head"] // hp["n_head_kv"]
    prompt = np.random.default_rng(3).integers(100, 40000, size=40).tolist()
    t1, t2 = 1234, 4321
    seq = prompt + [t1]
    _, layers = R.forward(hp, w, seq, return_internals=True)
    with Context(m, n_ctx=256, flash_attn=flash_attn) as ctx:
        ctx.set_recycle(RecycleMode.TOPK, K, 8, 0)
        ctx.eval(prompt)
        _, ran, _ = ctx.decode(t1, StepKind.RECYCLED)      # no cache yet: runs as a refresh
        assert not ran
        kept = [np.sort(ctx.recycle_positions(il), axis=1) for il in range(hp["n_layer"])]
        logits2, ran2, sims = ctx.decode(t2, StepKind.RECYCLED, similarity=True)
        assert ran2
    n = len(seq)
    # 1) the refresh token's choice per layer and KV head
    ref_kept = []
    for il in range(hp["n_layer"]):
        q = layers[il]["q"][-1]                                   # [H, d] of t1
        k = np.transpose(layers[il]["k"][:-1], (1, 0, 2))         # [Hkv, n-1, d], t1 itself excluded
        ref = R.recycle_topk(q, k, K)
        kh = np.repeat(k, G, axis=0)
        p = R.softmax(np.einsum("hd,hnd->hn", q, kh) / math.sqrt(hp["head_dim"]), axis=-1)
        _close_sets(kept[il], ref, p.reshape(hp["n_head_kv"], G, -1).max(axis=1))
        ref_kept.append(ref)
    # 2) the recycled step: t2 attends per KV head to its K kept tokens + tail (t1, t2)
    h = R.embed(w, [t2])
    for il in range(hp["n_layer"]):
        q, k2, v2 = R.qkv(hp, w, il, h, [n])
        outs = []
        for hq in range(hp["n_head"]):
            g = hq // G
            keys = list(ref_kept[il][g]) + [n - 1]
            kk = np.concatenate([layers[il]["k"][keys, g], k2[:, g]])
            vv = np.concatenate([layers[il]["v"][keys, g], v2[:, g]])
            p = R.softmax(kk @ q[0, hq] / math.sqrt(hp["head_dim"]))
            outs.append(p @ vv)
        p_ = f"blk.{il}."
        hh = h + np.concatenate(outs)[None] @ w[p_ + "attn_output.weight"].T
        x = R.rms_norm(hh, w[p_ + "ffn_norm.weight"], hp["rms_eps"])
        gate, up = x @ w[p_ + "ffn_gate.weight"].T, x @ w[p_ + "ffn_up.weight"].T
        h = hh + (gate / (1 + np.exp(-gate)) * up) @ w[p_ + "ffn_down.weight"].T
    ref_logits = R.output_logits(hp, w, h)[0]
    assert np.abs(logits2 - ref_logits).max() < 0.1
    assert logits2.argmax() == ref_logits.argmax()
    assert np.all((sims > -1.0001) & (sims < 1.0001))


@pytest.mark.parametrize("pool", [1, 3])
def test_refresh_topk_with_pool_matches_numpy(tiny, pool):
    """Pooled scores (max over +-pool neighbours) pick the same tokens as the numpy reference, and
    pooling changes the pick (else the test would not see the option at all)."""
    m, hp, w = tiny
    K, G = 8, hp["n_head"] // hp["n_head_kv"]
    prompt = np.random.default_rng(5).integers(100, 40000, size=48).tolist()
    seq = prompt + [1234]
    _, layers = R.forward(hp, w, seq, return_internals=True)
    with Context(m, n_ctx=256) as ctx:
        ctx.set_recycle(RecycleMode.TOPK, K, 8, 0, pool=pool)
        ctx.eval(prompt)
        ctx.decode(1234, StepKind.FULL)
        kept = [np.sort(ctx.recycle_positions(il), axis=1) for il in range(hp["n_layer"])]
    changed = 0
    for il in range(hp["n_layer"]):
        q = layers[il]["q"][-1]
        k = np.transpose(layers[il]["k"][:-1], (1, 0, 2))
        ref = R.recycle_topk(q, k, K, pool=pool)
        kh = np.repeat(k, G, axis=0)
        p = R.softmax(np.einsum("hd,hnd->hn", q, kh) / math.sqrt(hp["head_dim"]), axis=-1)
        pooled = R.pool_max(p.reshape(hp["n_head_kv"], G, -1).max(axis=1), pool)
        _close_sets(kept[il], ref, pooled)
        changed += not np.array_equal(ref, R.recycle_topk(q, k, K))
    assert changed > 0


def test_refresh_topk_with_share_matches_numpy(tiny):
    """Recycle(share=): each layer's scores plus share x a token's best score over all layers and
    KV heads pick the same tokens as the numpy reference, and sharing changes some layer's pick."""
    m, hp, w = tiny
    K, pool, share = 8, 1, 0.5
    prompt = np.random.default_rng(9).integers(100, 40000, size=48).tolist()
    seq = prompt + [1234]
    _, layers = R.forward(hp, w, seq, return_internals=True)
    with Context(m, n_ctx=256) as ctx:
        ctx.set_recycle(RecycleMode.TOPK, K, 8, 0, pool=pool, share=share)
        ctx.eval(prompt)
        ctx.decode(1234, StepKind.FULL)
        kept = [np.sort(ctx.recycle_positions(il), axis=1) for il in range(hp["n_layer"])]
    qs = [layers[il]["q"][-1] for il in range(hp["n_layer"])]
    ks = [np.transpose(layers[il]["k"], (1, 0, 2)) for il in range(hp["n_layer"])]   # refresh token included
    ref, ranked = R.recycle_topk_shared(qs, ks, K, pool, share, len(prompt))
    plain, _ = R.recycle_topk_shared(qs, ks, K, pool, 0.0, len(prompt))
    for il in range(hp["n_layer"]):
        _close_sets(kept[il], ref[il], ranked[il])
    assert any(not np.array_equal(ref[il], plain[il]) for il in range(hp["n_layer"]))


def test_dynamic_stride_triggers_full_step_after_low_similarity(tiny):
    from pylazy.policy import DynamicStride
    m, _, _ = tiny
    policy = DynamicStride(16, 0.999, 1)    # a threshold no real query reaches
    policy.reset()
    kinds = []
    with Context(m, n_ctx=256) as ctx:
        ctx.set_recycle(RecycleMode.TOPK, 8, 16, 0)
        ctx.eval(list(range(100, 140)))
        for t in range(200, 206):
            step = policy.next_step()
            _, ran, sims = ctx.decode(t, step.kind, similarity=step.check_similarity)
            kinds.append("recycled" if ran else "full")
            if step.check_similarity:
                sim = float(np.nanmean(sims)) if ran else None
                if ran:
                    assert sim < 0.999
                policy.observe(sim)
    # full, then a checked recycled step whose low similarity makes the next one full, and so on
    assert kinds == ["full", "recycled", "full", "recycled", "full", "recycled"]


def test_bad_recycle_values(tiny):
    m, _, _ = tiny
    with Context(m, n_ctx=64) as ctx:
        with pytest.raises(ValueError):
            ctx.set_recycle(RecycleMode.TOPK, 0, 16, 0)
        with pytest.raises(ValueError):
            ctx.set_recycle(3, 8, 16, 0)
        with pytest.raises(ValueError):
            ctx.set_recycle(RecycleMode.TOPK, 8, 1000, 0)
        with pytest.raises(ValueError):
            ctx.set_recycle(RecycleMode.TOPK, 8, 16, 0, pool=65)
        for share in (-0.5, 1.5, float("nan")):
            with pytest.raises(ValueError):
                ctx.set_recycle(RecycleMode.TOPK, 8, 16, 0, share=share)
        with pytest.raises(ValueError):     # no refresh yet: nothing to read
            ctx.recycle_query(0)
        ctx.set_recycle(RecycleMode.TOPK, 8, 16, 0)
        ctx.eval(list(range(100, 120)))
        ctx.decode(7, StepKind.FULL)
        assert ctx.recycle_query(0).shape == (m.info.n_head, m.info.head_dim)
        for layer in (-1, m.info.n_layer):
            with pytest.raises(ValueError):
                ctx.recycle_query(layer)


@pytest.mark.parametrize("flash_attn", [False, True])
def test_cached_graphs_equal_rebuilt_graphs(tiny, monkeypatch, flash_attn):
    """Refresh and recycled steps each keep their graph (two schedulers) across the stride; logits over
    several refreshes equal those of a context that rebuilds every graph."""
    m, hp, w = tiny
    prompt = np.random.default_rng(7).integers(100, 40000, size=60).tolist()

    def run():
        out = []
        with Context(m, n_ctx=256, flash_attn=flash_attn) as ctx:
            ctx.set_recycle(RecycleMode.TOPK, 8, 4, 0, pool=2)
            logits = ctx.eval(prompt)
            for i in range(24):
                logits, ran, _ = ctx.decode(int(logits.argmax()), StepKind.RECYCLED if i % 4 != 0 else StepKind.FULL)
                assert ran == (i % 4 != 0)
                out.append(logits.copy())
        return np.array(out)

    cached = run()
    monkeypatch.setenv("PYLAZY_GRAPH_REUSE", "0")
    rebuilt = run()
    assert np.array_equal(cached, rebuilt)


@pytest.mark.parametrize("share,flash_attn", [(0.0, False), (0.5, False), (0.5, True)])
def test_recycle_after_lazy_keep_all_equals_plain_recycle(tiny, share, flash_attn):
    """A lazy stage boundary that keeps every token changes nothing under recycling either: same
    refresh picks and logits as without lazy stages. With share > 0 a token's best score comes from
    every stage's layers (the picks wait for all stages: refresh_picks), so this holds there too (it
    failed while each stage shared over its own layers only). With a pruning schedule, a later stage's
    picks are among its own cells."""
    m, hp, _ = tiny
    prompt = np.random.default_rng(7).integers(100, 40000, size=60).tolist()

    def run(schedule, pool=1, n=12):
        out = []
        with Context(m, n_ctx=256, flash_attn=flash_attn) as ctx:
            if schedule:
                ctx.set_lazy(schedule, 0)
            ctx.set_recycle(RecycleMode.TOPK, 8, 4, 0, pool=pool, share=share)
            logits = ctx.eval(prompt)[-1]
            for i in range(n):
                logits, ran, _ = ctx.decode(int(logits.argmax()), StepKind.RECYCLED if i % 4 != 0 else StepKind.FULL)
                out.append(logits.copy())
            kept = [np.sort(ctx.recycle_positions(il), axis=1) for il in range(hp["n_layer"])]
            stages = ctx.stages()
        return np.array(out), kept, stages

    plain, kept_plain, _ = run([])
    staged, kept_staged, stages = run([(1, 1.0)])
    assert len(stages) == 2
    assert np.array_equal(plain, staged)
    for a, b in zip(kept_plain, kept_staged):
        assert np.array_equal(a, b)

    pruned, kept_pruned, stages = run([(1, 0.3)])
    later = stages[1]
    assert len(later["cell_pos"]) < len(prompt)           # the stage really holds fewer tokens
    for il in range(*later["layers"]):
        assert set(kept_pruned[il].ravel().tolist()) <= set(later["cell_pos"].tolist())


def test_refresh_picks_across_lazy_stages_match_numpy(tiny):
    """After a pruning lazy prefill, a refresh's picks per (layer, KV head) equal a numpy reference
    computed from the refresh queries and each stage's K: softmax over what the fresh row sees in its
    stage (all cells in stage 0, the selected ones + itself later), max over the group's query heads,
    max-pooled along the stage's cells, plus share x the token's best score over every layer of every
    stage (matched by position), top-k among the visible cells but the fresh one."""
    m, hp, _ = tiny
    K, pool, share = 8, 1, 0.5
    D, H, Hkv = hp["head_dim"], hp["n_head"], hp["n_head_kv"]
    prompt = np.random.default_rng(11).integers(100, 40000, size=60).tolist()
    p0 = len(prompt)
    with Context(m, n_ctx=256) as ctx:
        ctx.set_lazy([(1, 0.5)], 0)
        ctx.set_recycle(RecycleMode.TOPK, K, 4, 0, pool=pool, share=share)
        logits = ctx.eval(prompt)[-1]
        ctx.decode(int(logits.argmax()), StepKind.FULL)        # the refresh, at position p0
        stages = ctx.stages()
        kept = [np.sort(ctx.recycle_positions(il), axis=1) for il in range(hp["n_layer"])]
        per_layer = []
        for s, st in enumerate(stages):
            cells = st["cell_pos"]
            seen = np.ones(len(cells), bool) if s == 0 else np.isin(cells, np.append(st["selected"], p0))
            for il in range(*st["layers"]):
                q = ctx.recycle_query(il).astype(np.float64)
                k = ctx.read_kv(il, cells)[0].reshape(len(cells), Hkv, D).transpose(1, 0, 2).astype(np.float64)
                logit = np.einsum("hd,hnd->hn", q, np.repeat(k, H // Hkv, axis=0)) / np.sqrt(D)
                probs = R.softmax(np.where(seen, logit, -np.inf), axis=-1)
                pooled = R.pool_max(probs.reshape(Hkv, H // Hkv, -1).max(axis=1), pool)
                per_layer.append((il, cells, seen & (cells != p0), pooled))
    assert len(stages) == 2 and len(stages[1]["cell_pos"]) < p0      # the later stage really holds fewer

    def picks(best_of):
        out = {}
        for il, cells, cand, pooled in per_layer:
            ranked = np.where(cand, pooled + share * best_of(il)[cells], -np.inf)
            rows = [np.sort(cells[np.argsort(-r, kind="stable")[:K]]) for r in ranked]
            by_pos = [dict(zip(cells.tolist(), r.tolist())) for r in ranked]
            out[il] = (np.array(rows), by_pos)
        return out

    def best_over(layers):
        best = np.full(p0 + 1, -np.inf)
        for il, cells, _, pooled in per_layer:
            if il in layers:
                best[cells] = np.maximum(best[cells], pooled.max(axis=0))
        return best

    everywhere = best_over(range(hp["n_layer"]))
    ref = picks(lambda il: everywhere)
    per_stage = picks(lambda il: best_over(range(*next(st["layers"] for st in stages if st["layers"][0] <= il < st["layers"][1]))))
    for il in range(hp["n_layer"]):
        _close_sets(kept[il], ref[il][0], ref[il][1])
    # sharing within each stage only would pick otherwise somewhere: the test tells the two apart
    assert any(not np.array_equal(ref[il][0], per_stage[il][0]) for il in range(hp["n_layer"]))
