"""Decode after a lazy prefill (issue 17): between re-selections every stage attends to its last selection
plus the tokens since, in one graph; a re-selecting step selects at every boundary and revives what it
selects. Checked against a numpy model of that schedule (tests/reference.py) and, at keep = 100 %, against
full attention bit for bit."""
import numpy as np
import pytest

from pylazy.engine import Context, Model, RecycleMode
from pylazy.policy import StepKind
from tests import reference as R

SCHEDULE = [(0, 0.7), (1, 0.5), (2, 0.3)]   # tiny model: 4 layers, one layer per stage


def _tokens(n, seed):
    return np.random.default_rng(seed).integers(100, 40000, size=n).tolist()


class LazyStages:
    """Numpy model of the engine's stages: per stage the K/V of every token computed there (by position),
    the aux hidden states a pruned token is revived from, the selected positions, and select_pos (the
    step that made the selection: fresh rows see every token from there on)."""

    def __init__(self, hp, w, schedule):
        self.hp, self.w = hp, w
        ends = [l for l, _ in schedule] + [hp["n_layer"] - 1]
        self.layers = [list(range(a + 1, b + 1)) for a, b in zip([-1] + ends[:-1], ends)]
        self.keep = [1.0] + [k for _, k in schedule]
        S = len(self.layers)
        self.kv = [{il: {} for il in self.layers[s]} for s in range(S)]   # il -> pos -> (k, v)
        self.aux = [dict() for _ in range(S)]
        self.selected = [[] for _ in range(S)]
        self.select_pos = 0
        self.revived = 0

    def _cache(self, s, il, positions):
        ks = np.array([self.kv[s][il][p][0] for p in positions]).reshape(len(positions), self.hp["n_head_kv"], -1)
        vs = np.array([self.kv[s][il][p][1] for p in positions]).reshape(len(positions), self.hp["n_head_kv"], -1)
        return ks, vs

    def run_stage(self, s, h, pos, visible_cache):
        """Rows (hidden states h at positions pos) through stage s. visible_cache(row, cache_pos) and, within
        the batch, causal order: the masks the engine builds. Returns (h_out, the last row's mean attention
        over [cache positions + batch positions], those positions)."""
        cache_pos = sorted(self.kv[s][self.layers[s][0]])
        vis = np.array([[visible_cache(i, p) for p in cache_pos] + [True] * len(pos) for i in range(len(pos))])
        for il in self.layers[s]:
            kc, vc = self._cache(s, il, cache_pos) if cache_pos else (None, None)
            h, k, v, inner = R.layer_forward(self.hp, self.w, il, h, pos, kc, vc, cache_pos if cache_pos else None,
                                             return_internals=True, visible=vis)
            for i, p in enumerate(pos):
                self.kv[s][il][p] = (k[i], v[i])
        probs = inner["probs"][:, -1, :].mean(axis=0)
        return h, probs, cache_pos + list(pos)

    def select(self, s, importance, key_pos, seen, n_total, p0):
        """The next stage's selection by the last row's attention (its own token forced in), fresh ones dropped."""
        n_seen = sum(1 for p in key_pos if seen(p))
        n_keep = min(R._n_keep(self.keep[s + 1], n_total), n_seen)
        score = np.array([importance[j] if seen(p) else -2.0 for j, p in enumerate(key_pos)])
        score[-1] = 2.0
        chosen = np.argsort(-score, kind="stable")[:n_keep]
        return sorted(key_pos[j] for j in chosen if key_pos[j] < p0), score, key_pos

    def step(self, token, p0, select, follow=None):
        """One decoded token at position p0; follow[s]: the engine's selection for stage s (ties). Returns the
        logits and, per boundary, the reference's own selection with its scores."""
        h = R.embed(self.w, [token])
        own_picks = []
        for s in range(len(self.layers)):
            fresh_from = p0 if select else self.select_pos
            chosen = set(self.selected[s])
            revive = [p for p in self.selected[s] if select and s > 0 and p not in self.kv[s][self.layers[s][0]]]
            rows_h = np.concatenate([np.array([self.aux[s][p] for p in revive]).reshape(len(revive), -1), h]) if revive else h
            rows_pos = revive + [p0]
            self.revived += len(revive)

            def visible(i, p, s=s, n_rev=len(revive), chosen=chosen, fresh_from=fresh_from):
                return s == 0 or i < n_rev or p >= fresh_from or p in chosen
            out, importance, key_pos = self.run_stage(s, rows_h, rows_pos, visible)
            if s + 1 < len(self.layers):
                for i, p in enumerate(rows_pos):
                    self.aux[s + 1][p] = out[i]
                if select:
                    seen = (lambda p, s=s: s == 0 or p >= p0 or p in chosen)
                    own = self.select(s, importance, key_pos, seen, p0 + 1, p0)
                    own_picks.append(own)
                    self.selected[s + 1] = list(follow[s + 1]) if follow is not None else own[0]
            h = out[-1:]
        if select:
            self.select_pos = p0
        return R.output_logits(self.hp, self.w, h)[0], own_picks


def _prefill_reference(ref, tokens, engine_stages):
    """The prompt stage by stage, following the engine's selections (the prefill tests check those)."""
    n = len(tokens)
    alive = list(range(n))
    h = R.embed(ref.w, tokens)
    for s in range(len(ref.layers)):
        h, _, _ = ref.run_stage(s, h, alive, lambda i, p: True)
        if s + 1 < len(ref.layers):
            for i, p in enumerate(alive):
                ref.aux[s + 1][p] = h[i]
            nxt = engine_stages[s + 1]["selected"].tolist()
            h = h[np.searchsorted(alive, nxt)]
            alive = nxt
            ref.selected[s + 1] = nxt
    ref.select_pos = n


def _assert_close_selection(engine_sel, own, margin=1e-3):
    ref_sel, score, key_pos = own
    diff = set(engine_sel) ^ set(ref_sel)
    if diff:
        by_pos = dict(zip(key_pos, score))
        cut = min(by_pos[p] for p in ref_sel)
        assert all(abs(by_pos[p] - cut) < margin for p in diff), sorted(diff)


def test_decode_schedule_matches_numpy_reference(tiny):
    m, hp, w = tiny
    prompt, decode = _tokens(40, 1), _tokens(16, 2)
    ref = LazyStages(hp, w, SCHEDULE)
    selects = 0
    with Context(m, n_ctx=256) as ctx:
        ctx.set_lazy(SCHEDULE)
        ctx.eval(prompt)
        _prefill_reference(ref, prompt, ctx.stages())
        for i, t in enumerate(decode):
            p0 = len(prompt) + i
            select = i % 5 == 4
            before = ctx.stages()
            logits, _, _ = ctx.decode(t, StepKind.SELECT if select else StepKind.FULL)
            after = ctx.stages()
            follow = [a["selected"].tolist() for a in after]
            ref_logits, own = ref.step(t, p0, select, follow)
            assert np.abs(logits - ref_logits).max() < 0.1, i
            for s in range(1, len(after)):
                cells_before, cells = set(before[s]["cell_pos"].tolist()), set(after[s]["cell_pos"].tolist())
                if select:
                    _assert_close_selection(follow[s], own[s - 1])
                    revived = set(follow[s]) - cells_before
                    assert cells == cells_before | revived | {p0}
                else:   # the selection holds; only the new token is computed
                    assert follow[s] == before[s]["selected"].tolist()
                    assert cells == cells_before | {p0}
            selects += select
        stats = ctx.layer_stats()
    assert selects == 3 and ref.revived > 0, "no re-selection revived a token: the test proves nothing"
    assert sum(stats["revived"]) == ref.revived


def _greedy(model, prompt, n, schedule=(), select_every=0, recycle=None, n_ctx=512):
    with Context(model, n_ctx=n_ctx) as ctx:
        ctx.set_lazy(list(schedule))
        if recycle:
            ctx.set_recycle(RecycleMode.TOPK, *recycle)
        out = [ctx.eval(prompt)[0]]
        for i in range(n):
            if recycle and i % recycle[1] != 0:
                kind = StepKind.RECYCLED
            elif select_every and i % select_every == select_every - 1:
                kind = StepKind.SELECT
            else:
                kind = StepKind.FULL
            out.append(ctx.decode(int(out[-1].argmax()), kind)[0])
        return np.array(out)


@pytest.mark.parametrize("recycle", [None, (4096, 16)])
def test_keep_all_decode_equals_full_attention(tiny, recycle):
    m, _, _ = tiny
    prompt = _tokens(48, 3)
    keep_all = [(0, 1.0), (1, 1.0), (2, 1.0)]
    full = _greedy(m, prompt, 256, recycle=recycle)
    assert np.array_equal(full, _greedy(m, prompt, 256, keep_all, recycle=recycle))
    assert np.array_equal(full, _greedy(m, prompt, 256, keep_all, select_every=8, recycle=recycle))


def test_keep_all_decode_equals_full_attention_default_model(default_model_path):
    m = Model(default_model_path, n_threads=2)
    prompt = list(range(1000, 1100))
    keep_all = [(7, 1.0), (14, 1.0), (22, 1.0)]
    try:
        full = _greedy(m, prompt, 48)
        assert np.array_equal(full, _greedy(m, prompt, 48, keep_all))
        assert np.array_equal(full, _greedy(m, prompt, 48, keep_all, select_every=4))
    finally:
        m.close()


def test_lazy_kv_memory_follows_the_pruning(tiny):
    m, hp, _ = tiny
    prompt = _tokens(400, 4)
    sizes = {}
    for name, sched in (("full", []), ("lazy", SCHEDULE)):
        with Context(m, n_ctx=1024) as ctx:
            ctx.set_lazy(sched)
            ctx.eval(prompt)
            for t in _tokens(8, 5):
                ctx.decode(t)
            sizes[name] = ctx.layer_stats()["kv_bytes"]
    row = 2 * 2 * hp["head_dim"] * hp["n_head_kv"]   # K + V, F16
    assert sizes["full"] == [1024 * row] * hp["n_layer"]
    # stage s holds keep * 400 tokens + 256 cells of room, padded to 256: 768, 512, 512 cells (0.7/0.5/0.3)
    assert sizes["lazy"] == [1024 * row, 768 * row, 512 * row, 512 * row]
