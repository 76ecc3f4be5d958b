"""`pylazy bench` end to end on the default model (tiny lengths), and its pure helpers."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pylazy import bench

REPO = Path(__file__).resolve().parents[1]


def test_bench_quick_writes_positive_numbers(default_model_path, tmp_path):
    pytest.importorskip("llama_cpp")
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "pylazy", "bench", "--quick", "--rows", "ttft,prefill",
                           "--lengths", "128", "--no-progress", "--json", str(out)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert set(data) == {"meta", "prefill", "ttft"}
    assert data["meta"]["threads"] == 2 and data["meta"]["n_ctx"] == 256
    (pre,) = data["prefill"]
    assert pre["n_tokens"] == 128 and pre["runs"] == 1
    for key in ("pylazy_tok_s", "llama_cpp_tok_s", "ratio"):
        assert pre[key] > 0, key
    (tt,) = data["ttft"]   # only the default lazy schedule
    assert tt["lazy"] == "default" and tt["schedule"]
    for key in ("full_s", "lazy_s", "speedup", "kv_bytes_full", "kv_bytes_lazy"):
        assert tt[key] > 0, key
    # the default schedule keeps 60/40/25 % after 1/4, 1/2, 3/4 of the depth: ~0.57 computed
    assert 0.5 < tt["computed_fraction"] < 0.75
    assert "| 128 |" in proc.stdout and "**TTFT**" in proc.stdout and "**Decode**" not in proc.stdout


def test_bench_tokens_are_deterministic_text():
    calls = []

    def tokenize(text: bytes):   # one "token" per byte: enough to check length and seeding
        calls.append(text)
        return list(text)

    a = bench.bench_tokens(tokenize, 5000)
    b = bench.bench_tokens(tokenize, 5000)
    c = bench.bench_tokens(tokenize, 5000, seed=7)
    assert len(a) == 5000 and a == b and a != c
    assert b"lazy" in bytes(a)   # text from the repo, not random ids


def _args(**kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    argv = []
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return p.parse_args(argv)


def test_plan_defaults_and_context_size():
    plan = bench.make_plan(_args())
    assert plan.prefill == [512, 2048, 8000] and plan.ttft == [2048, 4096, 8000]
    assert plan.depths == [0, 2048, 8000] and plan.n_ctx == 8192   # 8000 + 32 steps + 1, to 256
    quick = bench.make_plan(_args(quick=True, rows="decode", decode_steps=16))
    assert quick.depths == [256, 512] and quick.n_ctx == 768       # 512 + 16 + 1 -> 768
    extra = bench.make_plan(_args(lazy_layers="4,0.5", lazy_keep="0.5,0.2"))
    assert [name for name, _ in extra.lazies] == ["default", "4,0.5/0.5,0.2"]
    assert extra.lazies[1][1].resolve(30) == [(4, 0.5), (14, 0.2)]


@pytest.mark.parametrize("kw, message", [
    (dict(rows="prefill,bogus"), "--rows"),
    (dict(n_ctx=1024, lengths="2048"), "too small"),
    (dict(lazy_layers="4"), "go together"),
])
def test_plan_rejects_bad_flags(kw, message):
    with pytest.raises(ValueError, match=message):
        bench.make_plan(_args(**kw))


def test_markdown_tables_from_numbers():
    result = {"meta": {"date": "d", "cpu": "c", "threads": 2, "model": "/x/m.gguf", "pylazy_version": "0",
                       "llama_cpp_version": "1", "n_ctx": 256, "n_ubatch": 512, "load_start": 0, "load_end": 0},
              "prefill": [{"n_tokens": 128, "pylazy_tok_s": 300.0, "llama_cpp_tok_s": 150.0, "ratio": 2.0,
                           "runs": 3}]}
    text = bench.markdown(result)
    assert "| 128 | 300 | 150 | 2.00 | 3 |" in text and "m.gguf" in text and "**Decode**" not in text


def test_decode_rows_rejects_an_unknown_policy():
    with pytest.raises(ValueError, match="sparse"):
        bench.decode_rows("sparse", None, [], [0], 4, 1, lambda label: None)
    assert set(bench.DECODE_POLICIES) == {"full", "recycled"}