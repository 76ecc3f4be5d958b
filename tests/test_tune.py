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
