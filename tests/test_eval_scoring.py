"""RULER string-match metrics on hand-made outputs, and the suite runner with a fake runner."""
import json
import os

import numpy as np
import pytest

from pylazy.eval.scoring import score, string_match_all, string_match_part
from pylazy.eval.tasks import Task

from pylazy.models import default_model_path  # noqa: E402

DEFAULT_MODEL = default_model_path()


def test_string_match_all_counts_fraction_case_insensitive():
    out = "The special magic numbers are 1234567 and abcde-9."
    assert string_match_all(out, ["1234567", "ABCDE-9", "7654321"]) == pytest.approx(2 / 3)
    assert string_match_all(out, ["1234567"]) == 1.0
    assert string_match_all("", ["1"]) == 0.0
    assert string_match_all("VAR QWERT", ["qwert", "asdfg"]) == 0.5


def test_string_match_part_is_any():
    assert string_match_part("answer: Paris", ["london", "paris"]) == 1.0
    assert string_match_part("answer: Rome", ["london", "paris"]) == 0.0


def test_control_characters_split_like_ruler():
    # RULER turns control characters into newlines: a tab is no longer a space
    assert string_match_all("12\t34", ["12 34"]) == 0.0
    assert string_match_all("  12 34\x00", ["12 34"]) == 1.0
    with pytest.raises(ValueError):
        string_match_all("x", [])


def test_score_uses_task_answers():
    t = Task("niah_multivalue", 1024, 0.5, 0, "prompt", ["111", "222", "333", "444"], 64)
    assert score(t, "111, 222 and 444") == 0.75
    t = Task("vt", 1024, 0.5, 0, "prompt", ["AAAAA", "BBBBB"], 48)
    assert score(t, "aaaaa") == 0.5


class FakeRunner:
    """Streams canned text: the prompt itself (so every answer is found) or nothing."""

    def __init__(self, echo: bool, logits: bool):
        self.echo, self.stats, self.resets = echo, {}, 0
        if logits:
            self.eval_logits = lambda toks: np.zeros((len(toks), 49152), np.float32)

    def reset(self):
        self.resets += 1

    def create_completion(self, prompt, max_tokens, temperature, stream):
        assert stream and temperature == 0.0
        self.stats = {"prompt_tokens": 7, "computed_fraction": 0.5 if not self.echo else 1.0}
        text = prompt if self.echo else "I do not know"
        for i in range(0, len(text), 50):
            yield {"choices": [{"text": text[i:i + 50]}]}


@pytest.fixture(scope="module")
def tokenize():
    llama_cpp = pytest.importorskip("llama_cpp")
    vocab = llama_cpp.Llama(model_path=DEFAULT_MODEL, vocab_only=True, verbose=False)
    return lambda s: vocab.tokenize(s.encode(), add_bos=True)


def test_run_suite_writes_one_record_per_task_policy_length(tmp_path, tokenize):
    from pylazy.eval.runner import run_suite
    made = []

    def factory(model_path, n_ctx, kwargs):
        assert n_ctx >= 512
        made.append(FakeRunner(echo=not kwargs, logits=not kwargs))
        return made[-1]

    specs, lengths = ["niah_single:noise", "vt"], [256, 512]   # corpus-free: fast
    res = run_suite(DEFAULT_MODEL, {"full": {}, "fake_lazy": {"lazy": "x"}}, lengths, specs,
                    [0.0, 1.0], seed=3, progress=False, out_dir=str(tmp_path),
                    runner_factory=factory, tokenize=tokenize, ppl_tokens=64, make_plots=False)
    with open(os.path.join(tmp_path, "results.json")) as f:
        saved = json.load(f)
    recs = saved["records"]
    keys = [(r["task"], r["policy"], r["context_len"]) for r in recs]
    assert len(recs) == 2 * 2 * 2 and len(set(keys)) == len(keys)
    for r in recs:
        assert r["accuracy"] == (1.0 if r["policy"] == "full" else 0.0)
        assert r["n_instances"] == 2 and set(r["by_depth"]) == {"0", "1"}
        assert r["stats"]["computed_fraction"] == (1.0 if r["policy"] == "full" else 0.5)
        assert r["prompt_tokens"] == 7 and r["ttft_s"] >= 0
    # 2 tasks x 2 depths x 2 lengths per policy, each after a reset
    assert [m.resets for m in made] == [8, 8]
    # uniform logits over the 49152-token vocabulary: perplexity is the vocabulary size
    ppl = {(p["policy"], p["context_len"]): p["ppl"] for p in saved["perplexity"]}
    assert ppl[("full", 64)] == pytest.approx(49152, rel=1e-6)
    assert ppl[("fake_lazy", 64)] is None
    assert res["records"] == recs


def test_run_suite_cut_short_keeps_finished_instances_in_partial_jsonl(tmp_path, tokenize):
    # the third completion fails (a run killed mid-way): the two finished instances are on disk
    from pylazy.eval.runner import run_suite
    calls = []

    class Dying(FakeRunner):
        def create_completion(self, prompt, **kw):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt("cut")
            return super().create_completion(prompt, **kw)

    with pytest.raises(KeyboardInterrupt):
        run_suite(DEFAULT_MODEL, {"full": {}, "fake_lazy": {"lazy": "x"}}, [256], ["niah_single:noise"],
                  [0.0, 1.0], seed=3, progress=False, out_dir=str(tmp_path), ppl_tokens=0,
                  runner_factory=lambda p, n, kw: Dying(echo=not kw, logits=False), tokenize=tokenize,
                  make_plots=False)
    assert not (tmp_path / "results.json").exists()
    lines = [json.loads(x) for x in (tmp_path / "partial.jsonl").read_text().splitlines()]
    assert [(x["policy"], x["depth"], x["score"]) for x in lines] == [("full", 0.0, 1.0), ("fake_lazy", 0.0, 0.0)]
    assert all(x["task"] == "niah_single:noise" and x["context_len"] == 256 and x["seed"] == 3 for x in lines)
    import importlib.util
    spec = importlib.util.spec_from_file_location("eval_current", os.path.join(
        os.path.dirname(__file__), "..", "scripts", "eval_current.py"))
    eval_current = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_current)
    back = eval_current.load(str(tmp_path / "partial.jsonl"))
    assert {r["policy"]: r["instances"][0]["score"] for r in back["records"]} == {"full": 1.0, "fake_lazy": 0.0}


class FakeChatRunner:
    def create_chat_completion(self, messages, stream, max_tokens, temperature):
        assert messages[0]["role"] == "user" and stream and temperature == 0.0
        yield {"choices": [{"delta": {"role": "assistant"}}]}   # llama_cpp's first chunk
        for piece in ["The", " number", " is", " 42", "."]:
            yield {"choices": [{"delta": {"content": piece}}]}
        yield {"choices": [{"delta": {}, "finish_reason": "stop"}]}


def test_generate_chat_stream_counts_tokens_and_text():
    from pylazy.eval.runner import generate
    t = Task("niah_single", 64, 0.5, 0, "p", ["42"], 8,
             chat_messages=[{"role": "user", "content": "p"}])
    g = generate(FakeChatRunner(), t, chat=True)
    assert g["output"] == "The number is 42." and g["completion_tokens"] == 5
    assert g["ttft_s"] >= 0 and g["decode_tok_s"] > 0 and g["stats"] == {}
    assert score(t, g["output"]) == 1.0


def test_plots_write_pngs(tmp_path):
    from pylazy.eval.plots import plot_all, speedups
    recs = []
    for pol, ttft, dec, acc in [("full", 2.0, 50.0, 0.9), ("lazy", 1.0, 100.0, 0.6)]:
        for n in (1024, 2048):
            recs.append({"task": "niah_single", "policy": pol, "context_len": n, "accuracy": acc,
                         "by_depth": {"0": acc, "0.5": acc}, "ttft_s": ttft * n / 1024,
                         "decode_tok_s": dec})
    res = {"config": {"policies": {"full": {}, "lazy": {"lazy": "LazyPrefill()"}}}, "records": recs}
    sp = speedups(res, "ttft_s", higher_is_faster=False)
    assert sp["full"] == (pytest.approx(0.9), pytest.approx(1.0))
    assert sp["lazy"] == (pytest.approx(0.6), pytest.approx(2.0))
    paths = plot_all(res, str(tmp_path))
    assert len(paths) == 3
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
