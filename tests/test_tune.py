"""`pylazy tune` and tuned profiles (pylazy/tune.py, pylazy/profiles.py): the choice rule on known
rows, the command end to end on the tiny random model (profile written, read back, applied by
Llama and the CLI as the file's default, overridden by explicit arguments), bad profiles."""
import json

import pytest

import pylazy
from pylazy import cli, cli_args, profiles, tune
from pylazy.errors import PylazyError
from pylazy.policy import LazyPrefill, Recycle


@pytest.fixture
def profile_dir(tmp_path, monkeypatch):
    d = tmp_path / "profiles"
    monkeypatch.setenv("PYLAZY_PROFILES", str(d))
    return d


def _row(name, acc, ttft, tok_s, gen=64):
    return {"name": name, "prompts": 10, "accuracy": acc, "ttft_s": ttft, "decode_tok_s": tok_s,
            "est_seconds": ttft + gen / tok_s}


def test_choose_takes_the_fastest_setting_within_the_budget():
    rows = [_row("full", 0.50, 10.0, 10.0), _row("lazy a", 0.40, 3.0, 10.0),   # fastest, 80 %: out
            _row("lazy b", 0.49, 5.0, 10.0), _row("rec", 0.55, 10.0, 40.0),     # 98 %: in; 110 %: in
            _row("lazy b + rec", 0.45, 5.0, 30.0)]
    best = tune.choose(rows, 0.98)
    assert best["name"] == "lazy b"            # 5 + 6.4 s beats rec's 10 + 1.6 s
    assert [r["passes"] for r in rows] == [True, False, True, True, False]
    assert rows[3]["relative_accuracy"] == pytest.approx(1.1) and rows[1]["speedup"] == pytest.approx(16.4 / 9.4)
    assert tune.choose(rows, 0.9)["name"] == "lazy b + rec"   # 90 % now passes: 5 + 2.1 s
    assert tune.choose(rows, 1.2)["name"] == "full"    # nothing else qualifies: full attention stays
    with pytest.raises(ValueError, match="scored 0"):
        tune.choose([_row("full", 0.0, 1.0, 1.0)], 0.98)


def test_combos_pair_passing_settings_by_predicted_time():
    rows = [_row("full", 0.5, 10, 10), _row("lazy a", 0.5, 4, 5), _row("lazy b", 0.1, 2, 10),
            _row("rec x", 0.5, 10, 40), _row("rec y", 0.5, 10, 20)]
    tune.choose(rows, 0.9)
    pols = {r["name"]: {r["name"].split()[0]: r["name"]} for r in rows}
    combos = tune._combos(rows, pols, 1)
    assert combos == {"lazy a + rec x": {"lazy": "lazy a", "rec": "rec x"}}   # lazy b fails the budget


def test_profile_applies_as_default_and_explicit_arguments_win(tiny_model_path, profile_dir, capsys):
    lazy, rec = LazyPrefill(layers=(1,), keep=(0.5,), pool=4), Recycle(k=64, stride=4, share=0.25)
    path = profiles.save_profile(str(tiny_model_path), {"chosen": "x", "lazy": profiles.policy_to_dict(lazy),
                                                        "recycle": profiles.policy_to_dict(rec),
                                                        "tuned": {"length": 256, "prompts": 3, "min_accuracy": 0.98}})
    assert path.parent == profile_dir and json.loads(path.read_text())["lazy"]["keep"] == [0.5]
    llm = pylazy.Llama(str(tiny_model_path), n_ctx=256, verbose=False)
    assert (llm.lazy, llm.recycle, llm.profile) == (lazy, rec, str(path))
    out = llm("Hello there, how are", max_tokens=12, temperature=0.0)   # runs under the profile
    assert llm.stats["computed_fraction"] < 1.0 and llm.stats["recycled_steps"] > 0
    # explicit arguments override, None included; per call as well
    full = llm("Hello there, how are", max_tokens=12, temperature=0.0, lazy=None, recycle=None)
    assert llm.stats["computed_fraction"] == 1.0 and llm.stats["recycled_steps"] == 0
    llm.close()
    llm = pylazy.Llama(str(tiny_model_path), n_ctx=256, verbose=False, lazy=None)
    assert (llm.lazy, llm.recycle) == (None, rec)
    llm.close()
    llm = pylazy.Llama(str(tiny_model_path), n_ctx=256, verbose=False, lazy=None, recycle=None)
    assert (llm.lazy, llm.recycle, llm.profile) == (None, None, None)
    again = llm("Hello there, how are", max_tokens=12, temperature=0.0)
    assert again["choices"][0]["text"] == full["choices"][0]["text"]
    llm.close()
    assert out["choices"][0]["text"]   # the profiled call produced text too
    # the CLI: `pylazy info` shows it, --no-profile and explicit flags override it
    assert cli.main(["info", "-m", str(tiny_model_path)]) == 0
    assert f"profile: {path} (lazy=LazyPrefill(layers=(1,)" in capsys.readouterr().out
    parser = cli.build_parser()
    for argv, want in ((["run", "x"], (lazy, rec)), (["run", "x", "--no-profile"], (None, None)),
                       (["run", "x", "--recycle-k", "32"], (lazy, Recycle(k=32)))):
        args = parser.parse_args(argv + ["-m", str(tiny_model_path), "--ctx", "256"])
        llm = cli_args.open_llama(args)
        assert (llm.lazy, llm.recycle) == want, argv
        llm.close()


def test_profiles_are_keyed_by_content_and_bad_ones_are_refused(tiny_model_path, tmp_path, profile_dir):
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(open(tiny_model_path, "rb").read())
    assert profiles.file_identity(str(copy)) == profiles.file_identity(str(tiny_model_path))
    data = bytearray(copy.read_bytes())
    data[(len(data) - 65536) * 7 // 15 + 100] ^= 1    # a weight byte in the 8th sampled block
    copy.write_bytes(bytes(data))
    assert profiles.file_identity(str(copy)) != profiles.file_identity(str(tiny_model_path))
    assert profiles.load_profile(str(copy)) is None
    path = profiles.profile_path(str(copy))
    path.parent.mkdir(parents=True)
    path.write_text('{"format": 1, "lazy": {"type": "LazyPrefill", "layers": [1], "keep": [1.5]}}')
    with pytest.raises(PylazyError, match="not a valid pylazy profile.*keep ratios"):
        profiles.load_profile(str(copy))
    path.write_text("{not json")
    with pytest.raises(PylazyError, match=str(path)):
        pylazy.Llama(str(copy), n_ctx=64, verbose=False)
    with pytest.raises(ValueError, match="a policy must be an object"):
        profiles.save_profile(str(copy), {"lazy": {"type": "Nope"}})


def test_tune_command_on_tiny_model(tiny_model_path, profile_dir, tmp_path, monkeypatch, capsys):
    # The tiny model's answers are noise; every prompt scores 1 so every setting passes and the
    # choice is the fastest measured one: the test checks the mechanism, not the numbers.
    import pylazy.eval.runner as runner
    monkeypatch.setattr(runner, "score", lambda task, output: 1.0)
    argv = ["tune", "-m", str(tiny_model_path), "--length", "256", "--tasks", "niah_single",
            "--depths", "0.5", "--lazy-keeps", "0.6,0.4,0.25", "--k-divisors", "8", "--strides", "4",
            "--thresholds", "--combos", "1", "--verify-samples", "1", "--threads", "1",
            "--no-progress", "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 0
    assert "chosen:" in capsys.readouterr().out
    profile = profiles.load_profile(str(tiny_model_path))
    names = [r["name"] for r in profile["sweep"]]
    assert names == ["full", "lazy 60/40/25", "rec L/8 s4", "lazy 60/40/25 + rec L/8 s4"]
    assert all(r["passes"] and r["prompts"] == 1 for r in profile["sweep"])
    fastest = min(profile["sweep"], key=lambda r: r["est_seconds"])
    assert profile["chosen"] == fastest["name"]
    want_lazy = LazyPrefill(layers=(0.25, 0.5, 0.75), keep=(0.6, 0.4, 0.25)) if "lazy" in fastest["name"] else None
    want_rec = Recycle(k=32, stride=4) if "rec" in fastest["name"] else None
    assert (profile["lazy"], profile["recycle"]) == (want_lazy, want_rec)
    v, check = profile["verification"], profile["check"]
    assert v["seed"] == 1000 and check["seed"] == 2000
    if profile["chosen"] != "full":   # every prompt scores 1: the fastest shortlisted one is accepted
        assert v["candidates"][0]["name"] == profile["chosen"] and v["candidates"][0]["accepted"]
        assert check["prompts"] == 1 and check["meets_budget"] and check["relative_accuracy"] == 1.0
    else:                             # full attention measured fastest: nothing to verify or check
        assert v["shortlist"] == [] and "skipped" in check
    assert profile["tuned"]["length"] == 256 and profile["model"]["identity"] == profiles.file_identity(str(tiny_model_path))
    with open(tmp_path / "out" / "sweep.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "out" / "profile.json").read_text())["chosen"] == profile["chosen"]
    llm = pylazy.Llama(str(tiny_model_path), n_ctx=256, verbose=False)
    assert (llm.lazy, llm.recycle) == (want_lazy, want_rec)
    llm.close()


@pytest.mark.parametrize("flag,match", [(["--min-accuracy", "0"], "min-accuracy"), (["--length", "100"], "length"),
                                        (["--lazy-keeps", "0.5,0.6,0.1"], "non-increasing"),
                                        (["--tasks", "nope"], "unknown task")])
def test_tune_refuses_bad_arguments(flag, match, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["tune"] + flag)
    assert exc.value.code == 2 and match in capsys.readouterr().err


# ----- the held-out cascade and the final check, on scripted runners ---------------------------
def test_paired_bound_counts_losses_the_point_estimate_hides():
    from pylazy.tune_rule import paired
    full = {"a": 0.0, "b": 1.0, "c": 1.0, "d": 1.0}
    st = paired(full, {"a": 1.0, "b": 0.0, "c": 1.0, "d": 1.0}, z=1.0)   # one win, one loss
    assert (st["relative_accuracy"], st["wins"], st["losses"]) == (1.0, 1, 1)
    # sd of d = (+1, -1, 0, 0) is sqrt(2/3); bound 1 - sqrt(2/3)/2 / 0.75
    assert st["relative_lower"] == pytest.approx(1 - (2 / 3) ** 0.5 / 2 / 0.75)
    same = paired(full, dict(full), z=1.0)                                # agrees on every prompt
    assert same["relative_lower"] == same["relative_accuracy"] == 1.0
    assert paired(full, {"a": 1.0, "b": 0.0, "c": 1.0, "d": 1.0}, z=0.0)["relative_lower"] == 1.0
    with pytest.raises(ValueError, match="scored 0"):
        paired({"a": 0.0}, {"a": 1.0}, z=1.0)


class _ScriptedRunner:
    """A Llama-like runner for tune's runner_factory: it echoes the prompt (every answer found:
    score 1) or answers nothing (score 0) as its script says for the current suite, and reports a
    fixed prefill time so the speed order is known."""

    def __init__(self, loses: bool, prefill_s: float):
        self.loses, self.prefill_s, self.stats = loses, prefill_s, {}

    def reset(self):
        pass

    def create_completion(self, prompt, stream, max_tokens, temperature):
        self.stats = {"prefill_s": self.prefill_s, "completion_tokens": 4}
        for piece in (["nothing", " at", " all", "."] if self.loses else [prompt[:10], prompt[10:], " ", "."]):
            yield {"choices": [{"text": piece}]}


# sweep candidates of _tune_args; prefill seconds set the speed order: lazy 50/30/20 fastest
_SPEED = {"full": 1.0, "lazy 50/30/20": 0.3, "lazy 60/40/25": 0.5, "rec L/8 s4": 0.8}
_SUITES = ("sweep", "held out", "check")


def _scripted_factory(losses: dict):
    """runner_factory whose runners lose where losses[name] names the suite. run_suite opens full
    first in each suite (tune's policies start with it): that counts the suites."""
    names = {**{repr(v): k for k, v in tune.lazy_candidates([(0.6, 0.4, 0.25), (0.5, 0.3, 0.2)]).items()},
             **{repr(v): k for k, v in tune.recycle_candidates(256, [8], [4], []).items()}}
    suite = []

    def factory(model_path, n_ctx, kwargs):
        name = "full" if not kwargs else names[repr(kwargs)]
        if name == "full":
            suite.append(_SUITES[len(suite)])
        return _ScriptedRunner(suite[-1] in losses.get(name, ()), _SPEED[name])
    return factory


def _run_scripted(model_path, losses, capsys):
    argv = ["tune", "-m", str(model_path), "--length", "256", "--tasks", "niah_single:noise", "--depths",
            "0.25", "0.75", "--lazy-keeps", "0.6,0.4,0.25", "0.5,0.3,0.2", "--k-divisors", "8",
            "--strides", "4", "--thresholds", "--combos", "0", "--verify-samples", "1", "--check-samples",
            "2", "--no-progress", "--no-plot"]
    args = cli.build_parser().parse_args(argv)
    tune.check_args(args)
    profile = tune.tune(str(model_path), args, runner_factory=_scripted_factory(losses))
    capsys.readouterr()
    return profile, tune.report(profile)


def test_cascade_takes_the_next_setting_when_the_fastest_misses_held_out(tiny_model_path, profile_dir, capsys):
    profile, text = _run_scripted(tiny_model_path, {"lazy 50/30/20": ("held out",)}, capsys)
    assert all(r["passes"] and r["holds"] and r["relative_accuracy"] == 1.0 for r in profile["sweep"])
    v = profile["verification"]
    assert v["seed"] == 1000 and v["prompts"] == 2
    assert v["shortlist"] == ["lazy 50/30/20", "lazy 60/40/25", "rec L/8 s4"]   # fastest first
    first, second, third = v["candidates"]
    assert first["held_out"]["relative_accuracy"] == 0.0 and not first["passes"] and not first["accepted"]
    assert first["pooled"]["prompts"] == 4 and first["pooled"]["relative_accuracy"] == 0.5
    assert second["accepted"] and second["held_out"]["relative_accuracy"] == 1.0
    assert third["passes"] and not third["accepted"]
    assert (profile["chosen"], profile["fallback"]) == ("lazy 60/40/25", False)
    assert "chosen: lazy 60/40/25\n" in text and "lazy 50/30/20" in text and "held out 0.000 x full < 0.98" in text
    saved = profiles.load_profile(str(tiny_model_path))   # the JSON records every verification
    assert [c["name"] for c in saved["verification"]["candidates"]] == v["shortlist"]
    want = LazyPrefill(layers=(0.25, 0.5, 0.75), keep=(0.6, 0.4, 0.25))
    assert (saved["lazy"], saved["recycle"]) == (want, None)
    llm = pylazy.Llama(str(tiny_model_path), n_ctx=256, verbose=False)
    assert (llm.lazy, llm.recycle) == (want, None)
    llm.close()


def test_cascade_falls_back_to_full_when_every_shortlisted_setting_misses(tiny_model_path, profile_dir, capsys):
    losses = {name: ("held out",) for name in _SPEED if name != "full"}
    profile, text = _run_scripted(tiny_model_path, losses, capsys)
    assert [c["passes"] for c in profile["verification"]["candidates"]] == [False, False, False]
    assert (profile["chosen"], profile["fallback"], profile["lazy"], profile["recycle"]) == ("full", True, None, None)
    assert profile["verification"]["candidates"][0]["why"] == "held out 0.000 x full < 0.98; pooled paired bound 0.211 < 0.98"
    assert "skipped" in profile["check"] and profile["check"]["meets_budget"]
    assert "chosen: full (fallback" in text
    llm = pylazy.Llama(str(tiny_model_path), n_ctx=256, verbose=False)
    assert (llm.lazy, llm.recycle) == (None, None)   # the profile applied is full attention
    llm.close()


def test_final_check_on_a_third_seed_is_reported_and_does_not_choose(tiny_model_path, profile_dir, capsys):
    profile, text = _run_scripted(tiny_model_path, {"lazy 50/30/20": ("check",)}, capsys)
    c = profile["check"]
    assert profile["chosen"] == "lazy 50/30/20"      # chosen before the check ran; the check leaves it
    assert (c["seed"], c["prompts"], c["full_accuracy"], c["accuracy"]) == (2000, 4, 1.0, 0.0)
    assert not c["meets_budget"] and c["speedup"] == pytest.approx(1.0 / 0.3, rel=1e-3)
    assert "check (seed 2000, 4 prompts never used to choose): 0.00 vs full 1.00 = 0.000 of full" in text
    assert "MISSES the budget 0.98" in text and "total wall time:" in text
    assert profiles.load_profile(str(tiny_model_path))["check"]["meets_budget"] is False
