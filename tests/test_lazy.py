"""Lazy prefill against independent references: llama.cpp-exact full attention at keep=1, and the numpy
forward of tests/reference.py for which tokens each pruning layer keeps and what revival computes."""
import numpy as np
import pytest

from pylazy.engine import Context, Model
from tests import reference as R

SCHEDULE = [(0, 0.7), (1, 0.5), (2, 0.3)]   # tiny model: 4 layers, one layer per stage


def _prompt(n, seed=0):
    return np.random.default_rng(seed).integers(100, 40000, size=n).tolist()


def _reference_selection(hp, w, tokens, schedule, pool=0, follow=None, window=1):
    """Stage-by-stage numpy prefill: returns the positions kept at each boundary and the last logits.
    follow: positions to carry on with at each boundary instead of the reference's own pick (pooled
    scores tie in runs, and a tie broken the other way must not cascade into later stages)."""
    n = len(tokens)
    alive = np.arange(n)
    h = R.embed(w, tokens)                      # hidden states of the alive tokens
    kept = []
    bounds = [l for l, _ in schedule] + [hp["n_layer"] - 1]
    il0 = 0
    for b, il_last in enumerate(bounds):
        for il in range(il0, il_last + 1):
            h, _, _, inner = R.layer_forward(hp, w, il, h, alive, return_internals=True)
        il0 = il_last + 1
        if b == len(schedule):
            break
        importance = inner["probs"][:, -window:, :].mean(axis=(0, 1))   # last rows over the alive tokens
        if pool:
            importance = R.pool_max(importance, pool)        # neighbours in position order
        n_keep = R._n_keep(schedule[b][1], n)
        rest = R._top_indices(importance[:-1], n_keep - 1)
        idx = np.append(rest, len(alive) - 1)
        kept.append((alive[idx].copy(), importance))
        if follow is not None:
            idx = np.searchsorted(alive, np.sort(follow[b]))
        alive, h = alive[idx], h[idx]
    return kept, R.output_logits(hp, w, h[-1:])[0]


def _assert_same_selection(engine_sel, ref_sel, importance_of_pos, margin=1e-3):
    """Equal sets, or differing only in tokens whose reference importance is within `margin` of the cut
    (f16 KV and flash attention vs float64)."""
    a, b = set(engine_sel.tolist()), set(ref_sel.tolist())
    diff = a ^ b
    if diff:
        cut = min(importance_of_pos[p] for p in b if p != max(b))   # the last token is kept regardless
        assert all(abs(importance_of_pos[p] - cut) < margin for p in diff), (sorted(a - b), sorted(b - a))


@pytest.mark.parametrize("n_ubatch,pool,window", [(512, 0, 1), (16, 0, 1), (16, 2, 1), (512, 0, 8), (16, 0, 8)])
def test_prefill_selection_matches_numpy_reference(tiny, n_ubatch, pool, window):
    m, hp, w = tiny
    tokens = _prompt(48)
    with Context(m, n_ctx=256, n_ubatch=n_ubatch) as ctx:
        ctx.set_lazy(SCHEDULE, pool, window)
        logits = ctx.eval(tokens)[0]
        stages = ctx.stages()
    follow = [stages[s]["selected"] for s in range(1, len(SCHEDULE) + 1)] if pool else None
    ref_kept, ref_logits = _reference_selection(hp, w, tokens, SCHEDULE, pool, follow, window)
    if pool or window > 1:   # the option must change what is kept, or this case would test nothing
        plain, _ = _reference_selection(hp, w, tokens, SCHEDULE)
        assert any(set(a.tolist()) != set(b.tolist()) for (a, _), (b, _) in zip(plain, ref_kept))
    exact = 0
    for s, (ref_pos, importance) in enumerate(ref_kept, start=1):
        # importance is indexed by position among the alive tokens of the previous stage
        prev_alive = np.arange(len(tokens)) if s == 1 else ref_kept[s - 2][0]
        imp_by_pos = dict(zip(prev_alive.tolist(), importance.tolist()))
        got = stages[s]["selected"]
        assert len(got) == len(ref_pos) == R._n_keep(SCHEDULE[s - 1][1], len(tokens))
        assert got[-1] == len(tokens) - 1           # the last token is never pruned
        _assert_same_selection(got, ref_pos, imp_by_pos)
        exact += set(got.tolist()) == set(ref_pos.tolist())
        assert sorted(stages[s]["cell_pos"].tolist()) == sorted(got.tolist())  # only kept tokens computed
    # Pooled scores tie in runs; the engine breaks ties as the reference does (the lower position), so
    # the kept sets are equal, pooled or not (ggml_top_k's own tie order kept 2 of 3 here).
    assert exact == len(SCHEDULE)
    assert np.abs(logits - ref_logits).max() < 0.1
    assert logits.argmax() == ref_logits.argmax()


def test_revival_computes_from_aux_cache_once(tiny):
    m, hp, w = tiny
    tokens = _prompt(40, seed=1)
    _, layers = R.forward(hp, w, tokens, return_internals=True)
    decode = _prompt(12, seed=2)
    with Context(m, n_ctx=256) as ctx:
        ctx.set_lazy(SCHEDULE)
        ctx.eval(tokens)
        before = [set(s["cell_pos"].tolist()) for s in ctx.stages()]
        # The aux cache at boundary 1 holds every prompt token's hidden state after layer 0 (stage 0 is full).
        h_saved = ctx.read_aux(1, range(len(tokens)))
        assert np.abs(h_saved - layers[1]["h_in"]).max() < 2e-2
        revived_total = 0
        for t in decode:
            ctx.eval([t])
            stages = ctx.stages()
            for s in range(1, len(stages)):
                cells = stages[s]["cell_pos"].tolist()
                assert len(cells) == len(set(cells)), "a token was computed twice at a layer"
                fresh = {p for p in cells if p >= len(tokens)}
                revived = set(cells) - before[s] - fresh
                revived_total += len(revived)
                # A revived token's K/V at the stage's first layer is computed from its saved hidden state.
                for p in sorted(revived)[:4]:
                    h = ctx.read_aux(s, [p])
                    _, k_ref, v_ref = R.qkv(hp, w, stages[s]["layers"][0], h.astype(np.float64), [p])
                    k, v = ctx.read_kv(stages[s]["layers"][0], [p])
                    assert np.abs(k[0] - k_ref.reshape(-1)).max() < 2e-2 * max(1.0, np.abs(k_ref).max())
                    assert np.abs(v[0] - v_ref.reshape(-1)).max() < 2e-2 * max(1.0, np.abs(v_ref).max())
                before[s] = set(cells)
        stats = ctx.layer_stats()
    assert revived_total > 0, "the schedule never revived a token: the test proves nothing"
    assert sum(stats["revived"]) == revived_total


@pytest.mark.parametrize("kv", [dict(), dict(flash_attn=True), dict(flash_attn=True, type_k="q4_0", type_v="q8_0")])
def test_keep_all_equals_full_attention(default_model_path, kv):
    m = Model(default_model_path, n_threads=2)
    text = list(range(1000, 1300))
    # Straight to the engine: LazyPrefill.resolve drops entries that keep everything (they prune nothing).
    schedule = [(7, 1.0), (14, 1.0), (22, 1.0)]
    outs = []
    for sched in ([], schedule):
        with Context(m, n_ctx=512, n_ubatch=64, **kv) as ctx:
            ctx.set_lazy(sched)
            assert len(ctx.stages()) == len(sched) + 1
            seq = [ctx.eval(text)[0]]
            for _ in range(16):
                seq.append(ctx.eval([int(seq[-1].argmax())])[0])
            outs.append(np.array(seq))
    m.close()
    assert np.array_equal(outs[0], outs[1])


def test_bad_schedules_raise(tiny):
    m, _, _ = tiny
    with Context(m, n_ctx=64) as ctx:
        for bad in ([(3, 0.5)], [(1, 0.5), (0, 0.3)], [(0, 0.0)], [(0, 0.3), (1, 0.5)]):
            with pytest.raises(ValueError):
                ctx.set_lazy(bad)
        ctx.eval([1, 2, 3])
        with pytest.raises(ValueError, match="empty context"):
            ctx.set_lazy([(0, 0.5)])
