"""Layers split over devices, remote ones through ggml's RPC backend (issue 19).

Two `pylazy rpc-server` processes on 127.0.0.1 (free ports) serve this machine's CPU; a model's
layers go local CPU / server 1 / server 2 as llama.cpp places them, and every logit must equal the
single-device run's (same ggml CPU kernels on each side, so bit for bit): full attention,
LazyPrefill, Recycle; greedy text on the default SmolLM2. A server killed with SIGKILL mid-stream
must give RpcConnectionError within a timeout, not a hang or a crash.

Needs llama-cpp-python built with CMAKE_ARGS="-DGGML_RPC=on": skipped without it, except where
PYLAZY_REQUIRE_RPC=1 (CI, .ci/run) makes that a failure.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 60.0   # seconds any RPC failure may take to surface


def _rpc_or_skip():
    from pylazy.devices import rpc_available, rpc_install_hint
    if rpc_available():
        return
    msg = "llama-cpp-python was built without ggml's RPC backend (" + rpc_install_hint() + ")"
    if os.environ.get("PYLAZY_REQUIRE_RPC") == "1":
        pytest.fail("PYLAZY_REQUIRE_RPC=1: " + msg)
    pytest.skip(msg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RpcServer:
    """A `python -m pylazy rpc-server` of this checkout, running once it printed its ready line."""

    def __init__(self, port=None, threads=1):
        self.port = port or free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="rpc-server-", suffix=".log", delete=False)
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, "-m", "pylazy", "rpc-server", "--port", str(self.port),
                                      "--threads", str(threads)], cwd=REPO, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + TIMEOUT
        while "ready on" not in self.output():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"rpc-server did not come up: {self.output()[-2000:]}")
            time.sleep(0.1)

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        os.unlink(self.log.name)


@pytest.fixture(scope="module")
def servers():
    _rpc_or_skip()
    pair = [RpcServer(), RpcServer()]
    yield [s.endpoint for s in pair]
    for s in pair:
        s.stop()


def split_model(path, servers, n_gpu_layers, **kw):
    from pylazy.engine import Model
    return Model(path, n_gpu_layers=n_gpu_layers, n_threads=1, tensor_split=[1, 1], rpc_servers=servers, **kw)


def test_layers_split_cpu_server1_server2(tiny_model_path, servers):
    """llama.cpp's rule on 4 layers + the head: n_gpu_layers=4 leaves layer 0 on the CPU; [1, 1] puts
    layers 1-2 on server 1, layer 3 and the head on server 2."""
    with split_model(tiny_model_path, servers, 4) as m:
        s1, s2 = (f"RPC0[{e}]" for e in servers)
        assert m.layer_devices() == ["CPU", s1, s1, s2, s2]
        assert [d.split("(")[1].rstrip(")") for d in m.devices()] == servers
        assert m.info.backend == f"CPU,{s1},{s2}" and m.info.on_gpu
        if shutil.which("ss"):   # ggml-rpc's connections got keepalive probes (a vanished host fails, not hangs)
            # (ss shows the pending timer: the retransmit one while data is unacknowledged, so poll)
            for e in servers:
                for _ in range(50):
                    out = subprocess.run(["ss", "-tio", "state", "established", f"( dport = :{e.split(':')[1]} )"],
                                         capture_output=True, text=True).stdout
                    if "keepalive" in out:
                        break
                    time.sleep(0.1)
                assert "keepalive" in out, out
    # n_gpu_layers=0: nothing offloaded, no connection needed (the servers are not even asked)
    from pylazy.engine import Model
    with Model(tiny_model_path, n_gpu_layers=0, n_threads=1, rpc_servers=["127.0.0.1:1"]) as m:
        assert m.layer_devices() == ["CPU"] * 5


@pytest.mark.parametrize("kw, expect", [
    # n_gpu_layers of the 5 "layers" (4 + head) from the end; [3, 1]: layer boundaries at 3/4
    (dict(n_gpu_layers=2, tensor_split=[1, 1]), ["CPU", "CPU", "CPU", 0, 1]),
    (dict(n_gpu_layers=-1, tensor_split=[3, 1]), [0, 0, 0, 0, 1]),
    (dict(n_gpu_layers=99, tensor_split=[0, 1]), [1, 1, 1, 1, 1]),
    (dict(n_gpu_layers=5, tensor_split=[1, 1, 7]), [0, 0, 0, 1, 1]),   # proportions past the devices: ignored
    (dict(n_gpu_layers=-1, split_mode=0, main_gpu=1), [1, 1, 1, 1, 1]),  # none: device main_gpu only
    (dict(n_gpu_layers=-1, split_mode=0, main_gpu=-1), ["CPU"] * 5),
    (dict(n_gpu_layers=3, split_mode=2, tensor_split=[1, 2]), ["CPU", "CPU", 0, 1, 1]),   # row: by layers here
])
def test_placement_follows_llama_cpp(tiny_model_path, servers, kw, expect):
    from pylazy.engine import Model
    with Model(tiny_model_path, n_threads=1, rpc_servers=servers, **kw) as m:
        names = [f"RPC0[{e}]" for e in servers]
        assert m.layer_devices() == [names[d] if isinstance(d, int) else d for d in expect]
    with pytest.raises(ValueError, match="main_gpu = 2 but there are only 2 devices"):
        Model(tiny_model_path, n_gpu_layers=-1, split_mode=0, main_gpu=2, rpc_servers=servers)


def _run(ctx, prompt, steps, kinds):
    rows = [ctx.eval(prompt, all_logits=not ctx.lazy_schedule)]
    # after a lazy prefill the later stages hold fewer tokens: the pruned path runs on the split
    assert all(len(s["cell_pos"]) < len(prompt) for s in ctx.stages()[1:])
    for i in range(steps):
        logits, _, _ = ctx.decode(int(np.argmax(rows[-1][-1])), kinds[i % len(kinds)])
        rows.append(logits[None])
    return rows


@pytest.mark.parametrize("policy", ["full", "lazy", "recycle"])
def test_logits_equal_single_device(tiny_model_path, servers, policy):
    from pylazy.engine import Context, Model, RecycleMode
    from pylazy.policy import StepKind
    prompt = list(np.random.default_rng(3).integers(5, 5000, size=90))
    kinds = {"full": [StepKind.FULL], "lazy": [StepKind.SELECT, StepKind.FULL, StepKind.FULL],
             "recycle": [StepKind.FULL, StepKind.RECYCLED, StepKind.RECYCLED]}[policy]
    out = []
    for model in (Model(tiny_model_path, n_gpu_layers=0, n_threads=1), split_model(tiny_model_path, servers, 4)):
        with model, Context(model, n_ctx=256, n_ubatch=32) as ctx:
            if policy == "lazy":
                ctx.set_lazy([(1, 0.6), (2, 0.4)], pool=2, window=4)
            if policy == "recycle":
                ctx.set_recycle(RecycleMode.TOPK, k=16, tail=4, pool=2, share=0.5)
            out.append(_run(ctx, prompt, 12, kinds))
            assert len(ctx.stages()) == (3 if policy == "lazy" else 1)
            if policy == "lazy":   # SELECT steps revived pruned tokens from the aux cache
                assert sum(ctx.layer_stats()["revived"]) > 0
    for a, b in zip(*out):
        assert np.array_equal(a, b)


@pytest.fixture(scope="module")
def smollm2_pair(servers, default_model_path):
    """The default model on one device and split CPU (layers 0-10) / server 1 (11-20) / server 2."""
    import pylazy
    kw = dict(n_ctx=512, verbose=False, n_threads=1, lazy=None, recycle=None)
    local = pylazy.Llama(default_model_path, **kw)
    split = pylazy.Llama(default_model_path, n_gpu_layers=20, tensor_split=[1, 1], rpc_servers=",".join(servers), **kw)
    yield local, split
    local.close()
    split.close()


@pytest.mark.parametrize("policy", ["full", "lazy", "recycle"])
def test_smollm2_greedy_text_equal(smollm2_pair, servers, policy):
    import pylazy
    local, split = smollm2_pair
    devs = split._model.layer_devices()
    assert devs.count("CPU") == 11 and devs[11] == f"RPC0[{servers[0]}]" and devs[-1] == f"RPC0[{servers[1]}]"
    kw = {"full": {}, "lazy": {"lazy": pylazy.LazyPrefill()},
          "recycle": {"recycle": pylazy.Recycle(k=64, stride=8)}}[policy]
    prompt = "Here is a list of the planets of the solar system, in order from the sun: " * 4
    a = local(prompt, max_tokens=24, temperature=0, **kw)
    b = split(prompt, max_tokens=24, temperature=0, **kw)
    assert a["choices"][0]["text"] == b["choices"][0]["text"] and len(a["choices"][0]["text"]) > 20


def test_server_killed_mid_stream_raises(tiny_model_path, servers):
    """SIGKILL of the server holding the last layers while a stream runs: RpcConnectionError within
    TIMEOUT, every later call raises it too, close() returns; the other servers stay usable."""
    import pylazy
    from pylazy.errors import RpcConnectionError
    victim = RpcServer()
    llm = pylazy.Llama(tiny_model_path, n_ctx=256, verbose=False, n_threads=1, lazy=None, recycle=None,
                       n_gpu_layers=4, tensor_split=[1, 1], rpc_servers=[servers[0], victim.endpoint])
    assert llm._model.layer_devices()[-1] == f"RPC0[{victim.endpoint}]"
    got = {}

    def stream():
        try:
            for i, _ in enumerate(llm("Once upon a time", max_tokens=200, temperature=0, stream=True)):
                got["tokens"] = i + 1
                if i == 3:
                    victim.kill()
        except Exception as exc:   # noqa: BLE001 - the test inspects it
            got["error"] = exc

    t = threading.Thread(target=stream, daemon=True)
    t0 = time.monotonic()
    t.start()
    t.join(TIMEOUT)
    assert not t.is_alive(), "generation hung after the server was killed"
    assert isinstance(got.get("error"), RpcConnectionError), got
    assert victim.endpoint in str(got["error"]) and 4 <= got["tokens"] < 200
    assert time.monotonic() - t0 < TIMEOUT
    with pytest.raises(RpcConnectionError):
        llm("again", max_tokens=2)
    assert llm._model.lost
    llm.close()
    victim.stop()
    # the endpoint cannot be reused in this process (ggml-rpc keeps its dead connection) ...
    with pytest.raises(RpcConnectionError, match="lost earlier"):
        split_model(tiny_model_path, [servers[0], victim.endpoint], 4)
    # ... the surviving server can
    with split_model(tiny_model_path, servers, 4) as m:
        from pylazy.engine import Context
        with Context(m, n_ctx=64) as ctx:
            assert np.isfinite(ctx.eval([1, 2, 3])).all()


def test_unreachable_server_fails_at_load_within_timeout(tiny_model_path):
    _rpc_or_skip()
    from pylazy.errors import RpcConnectionError
    refused = free_port()   # nobody listens
    with pytest.raises(RpcConnectionError, match=f"127.0.0.1:{refused}: cannot connect"):
        split_model(tiny_model_path, [f"127.0.0.1:{refused}"], 4)
    # a listener that never answers (e.g. a server busy with another client): bounded by rpc_timeout
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        t0 = time.monotonic()
        with pytest.raises(RpcConnectionError, match="no answer to HELLO"):
            split_model(tiny_model_path, ["127.0.0.1:%d" % silent.getsockname()[1]], 4, rpc_timeout=1.0)
        assert time.monotonic() - t0 < 10


def test_ggml_rpc_abort_becomes_an_exception(tiny_model_path):
    """Without pylazy's probe, ggml-rpc's own connect fails with GGML_ABORT: the abort handler turns
    it into an exception thrown through ggml's frames (C ones included), twice (no lock left held),
    and the process lives on. In a subprocess: if unwinding failed, the process would abort."""
    _rpc_or_skip()
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from pylazy.engine import Model\n"
            "from pylazy.errors import RpcConnectionError\n"
            "for _ in range(2):\n"
            "    try:\n"
            "        Model(%r, n_gpu_layers=-1, rpc_servers=['127.0.0.1:%d'])\n"
            "    except RpcConnectionError as e:\n"
            "        assert 'Failed to connect to 127.0.0.1' in str(e), e\n"
            "print('alive')\n") % (str(REPO), str(tiny_model_path), free_port())
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYLAZY_RPC_PROBE="0"),
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0 and r.stdout.strip() == "alive", r.stderr[-2000:]


def test_rpc_server_arguments_checked(tiny_model_path):
    _rpc_or_skip()
    import pylazy
    for bad in (["127.0.0.1"], "host:port", ["127.0.0.1:70000"], [":50052"]):
        with pytest.raises(ValueError, match="is not host:port"):
            pylazy.Llama(tiny_model_path, n_gpu_layers=-1, rpc_servers=bad, verbose=False)
    with pytest.raises(TypeError):
        pylazy.Llama(tiny_model_path, rpc_servers=50052, verbose=False)


def test_tensor_split_on_one_device_as_llama_cpp_python(tiny_model_path):
    """No offload device here: llama.cpp then keeps every layer on the CPU whatever tensor_split
    says, and llama-cpp-python rejects more than LLAMA_MAX_DEVICES proportions."""
    import llama_cpp
    import pylazy
    from pylazy.engine import Model
    with Model(tiny_model_path, n_gpu_layers=0) as probe:
        if probe.devices() or any(d for d in _local_offload_devices()):
            pytest.skip("this machine has an offload device")
    kw = dict(n_ctx=64, verbose=False, lazy=None, recycle=None, n_threads=1)
    plain = pylazy.Llama(tiny_model_path, **kw)
    split = pylazy.Llama(tiny_model_path, n_gpu_layers=-1, tensor_split=[0.3, 0.7], main_gpu=1, **kw)
    assert split._model.layer_devices() == ["CPU"] * 5
    assert plain("Hi there", max_tokens=8, temperature=0)["choices"][0]["text"] == \
        split("Hi there", max_tokens=8, temperature=0)["choices"][0]["text"]
    plain.close()
    split.close()
    with pytest.raises(ValueError, match="LLAMA_MAX_DEVICES=%d" % llama_cpp.LLAMA_MAX_DEVICES):
        pylazy.Llama(tiny_model_path, tensor_split=[1.0] * (llama_cpp.LLAMA_MAX_DEVICES + 1), **kw)
    with pytest.raises(ValueError, match="split_mode"):
        pylazy.Llama(tiny_model_path, split_mode=3, **kw)


def _local_offload_devices():
    from pylazy.commands.rpc_server import _list_devices
    return [line for line in _list_devices().splitlines() if not line.startswith("CPU")]


def test_rpc_server_cli_help_and_errors():
    _rpc_or_skip()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    help_text = subprocess.run([sys.executable, "-m", "pylazy", "rpc-server", "--help"], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=60).stdout
    flat = " ".join(help_text.split())
    assert "insecure" in flat and "default 127.0.0.1" in flat and "no authentication" in flat
    # a port already taken: a clear error and exit status 1, not a hang
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "pylazy", "rpc-server", "--port", str(port)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "could not listen" in r.stderr
