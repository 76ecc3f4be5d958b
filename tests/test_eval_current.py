"""scripts/eval_current.py: policies picked from several runs, compared on the prompts they share."""
import gzip
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import eval_current  # noqa: E402


def _run(tmp_path, name, policies, seeds):
    """A results.json with one record per policy: niah_single at 4096, one instance per seed."""
    records = []
    for pol, scores in policies.items():
        inst = [{"depth": 0.5, "seed": s, "score": scores[s], "ttft_s": 2.0 if pol == "full" else 1.0,
                 "decode_tok_s": 10.0, "prompt_tokens": 4000, "stats": {}, "output": ""} for s in seeds]
        records.append({"task": "niah_single:natural", "policy": pol, "context_len": 4096, "instances": inst})
    path = tmp_path / name
    with gzip.open(path, "wt") as f:
        json.dump({"config": {"policies": {p: {} if p == "full" else {"lazy": "x"} for p in policies}},
                   "records": records}, f)
    return str(path)


def test_policies_from_two_runs_on_their_common_prompts(tmp_path):
    a = _run(tmp_path, "a.json.gz", {"full": {0: 1, 1: 1, 2: 0}, "lazy": {0: 1, 1: 0, 2: 0}}, [0, 1, 2])
    b = _run(tmp_path, "b.json.gz", {"stream": {1: 0, 2: 1, 3: 1}}, [1, 2, 3])
    res = eval_current.combine([(a, [("full", "full"), ("lazy", "LazyPrefill()")]), (b, [("stream", "S")])])
    assert res["config"]["prompts"] == 2          # seeds 1 and 2: the only ones every policy ran
    acc = {r["policy"]: r["accuracy"] for r in res["records"]}
    assert acc == {"full": 0.5, "LazyPrefill()": 0.0, "S": 0.5}
    table = eval_current.totals_table(res)
    assert "| full | 1.00 | — | 1.00x | 1.00x |" in table
    assert "| LazyPrefill() | 0.00 | 0.0 % | 2.00x | 1.00x |" in table   # TTFT 2 s -> 1 s
    assert "| S | 1.00 | 100.0 % |" in table


def test_a_label_in_two_runs_takes_both_runs_prompts(tmp_path):
    a = _run(tmp_path, "a.json.gz", {"full": {0: 1}}, [0])
    b = _run(tmp_path, "b.json.gz", {"full": {5: 0}}, [5])
    res = eval_current.combine([(a, [("full", "full")]), (b, [("full", "full")])])
    assert res["config"]["prompts"] == 2 and res["records"][0]["accuracy"] == 0.5
    with pytest.raises(SystemExit, match="no policy 'nope'"):
        eval_current.combine([(a, [("nope", "x")])])
    assert eval_current.parse_run("dir/r.json:full,lazy_default=LazyPrefill()") == \
        ("dir/r.json", [("full", "full"), ("lazy_default", "LazyPrefill()")])


def test_partial_jsonl_of_a_cut_run(tmp_path):
    lines = [{"policy": p, "task": "qa", "context_len": 4096, "depth": 0.25, "seed": s, "score": sc,
              "ttft_s": 1.0, "decode_tok_s": 5.0, "prompt_tokens": 4090, "stats": {}} for p, s, sc in
             [("full", 0, 1.0), ("lazy", 0, 1.0), ("full", 1, 1.0)]]   # cut before lazy's seed 1
    path = tmp_path / "partial.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    res = eval_current.combine([(str(path), [("full", "full"), ("lazy", "lazy")])])
    assert res["config"]["prompts"] == 1 and res["config"]["policies"]["full"] == {}
    assert [r["accuracy"] for r in res["records"]] == [1.0, 1.0]
