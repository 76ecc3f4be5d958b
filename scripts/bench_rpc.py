"""Prefill and decode over ggml's RPC backend on loopback against the same model on one device, with
the bytes that cross the link per token (issue 19's benchmark; the table of docs/rpc.md).

    python scripts/bench_rpc.py --prompt 512 --decode 64 --out build/bench-rpc.json

Starts two `pylazy rpc-server` processes on 127.0.0.1 (each serving this machine's CPU with
--server-threads threads) and runs, on the default SmolLM2 unless -m says otherwise:
  local       every layer on this process's CPU
  cpu+1       the first half of the layers on the CPU, the rest and the head on server 1
  cpu+1+2     a third each: CPU / server 1 / server 2 (llama.cpp's n_gpu_layers + tensor_split)
Bytes: what the servers' TCP connections sent and received during the phase (the kernel's
tcp_info through `ss -tin`: bytes_sent + bytes_received), per token, and the data segments per
token (an upper bound of the messages, whose round trips a real network's latency multiplies).
The hidden state itself is n_embd * 4 bytes per token per device boundary.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def start_server(port: int, threads: int) -> subprocess.Popen:
    log = open(f"/tmp/pylazy-bench-rpc-{port}.log", "w")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "pylazy", "rpc-server", "--port", str(port), "-t", str(threads)],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while "ready on" not in Path(log.name).read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(Path(log.name).read_text())
        time.sleep(0.1)
    return proc


def link_counters(ports) -> dict:
    """Bytes and data segments the servers' connections have sent and received so far (the
    kernel's tcp_info of each established socket on a server port, through `ss`)."""
    import re
    total = {"bytes": 0, "segs": 0}
    for port in ports:
        out = subprocess.run(["ss", "-tin", "state", "established", f"( sport = :{port} )"],
                             capture_output=True, text=True, check=True).stdout
        for key, field in (("bytes", "bytes_sent"), ("bytes", "bytes_received"),
                           ("segs", "data_segs_out"), ("segs", "data_segs_in")):
            total[key] += sum(int(v) for v in re.findall(rf"\b{field}:(\d+)", out))
    return total


def measure(llm_kwargs: dict, model: str, prompt: list, n_decode: int, ports: list, threads: int) -> dict:
    from pylazy.engine import Context, Model
    with Model(model, n_threads=threads, **llm_kwargs) as m, Context(m, n_ctx=len(prompt) + n_decode + 8,
                                                                     n_ubatch=512) as ctx:
        row = {"layers": m.layer_devices()}
        ctx.eval(prompt[:8])   # warm-up: first graphs, first remote allocations
        ctx.reset()
        before, t0 = link_counters(ports), time.perf_counter()
        logits = ctx.eval(prompt)
        t1, mid = time.perf_counter(), link_counters(ports)
        token = int(logits[-1].argmax())
        for _ in range(n_decode):
            logits, _, _ = ctx.decode(token)
            token = int(logits.argmax())
        t2, after = time.perf_counter(), link_counters(ports)
    n_p = len(prompt)
    row.update({
        "prefill_tok_s": n_p / (t1 - t0), "decode_tok_s": n_decode / (t2 - t1),
        "prefill_bytes_per_token": (mid["bytes"] - before["bytes"]) / n_p,
        "decode_bytes_per_token": (after["bytes"] - mid["bytes"]) / n_decode,
        "prefill_segments_per_token": (mid["segs"] - before["segs"]) / n_p,
        "decode_segments_per_token": (after["segs"] - mid["segs"]) / n_decode,
    })
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=None, help="GGUF file (default: the default SmolLM2)")
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens (default 512)")
    ap.add_argument("--decode", type=int, default=64, help="decoded tokens (default 64)")
    ap.add_argument("--threads", type=int, default=1, help="client CPU threads (default 1)")
    ap.add_argument("--server-threads", type=int, default=1, help="threads of each server (default 1)")
    ap.add_argument("--port", type=int, default=50352, help="first server port (default 50352)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    import numpy as np
    from pylazy.engine import Model
    from pylazy.models import default_model_path
    model = args.model or default_model_path()
    with Model(model, n_gpu_layers=0) as m:
        info = m.info
    prompt = [int(t) for t in np.random.default_rng(0).integers(100, info.n_vocab - 100, size=args.prompt)]
    servers = [start_server(args.port + i, args.server_threads) for i in range(2)]
    eps = [f"127.0.0.1:{args.port + i}" for i in range(2)]
    L = info.n_layer
    runs = {
        "local": {"n_gpu_layers": 0},
        "cpu+1": {"n_gpu_layers": L + 1 - L // 2, "rpc_servers": eps[:1]},
        "cpu+1+2": {"n_gpu_layers": L + 1 - L // 3, "rpc_servers": eps, "tensor_split": [1, 1]},
    }
    load = os.getloadavg()
    results = {"model": os.path.basename(model), "n_embd": info.n_embd, "n_vocab": info.n_vocab, "n_layer": L,
               "prompt": args.prompt, "decode": args.decode, "client_threads": args.threads,
               "server_threads": args.server_threads, "cpus": os.cpu_count(), "loadavg_before": load, "runs": {}}
    try:
        for name, kw in runs.items():
            row = measure(kw, model, prompt, args.decode, [args.port, args.port + 1], args.threads)
            results["runs"][name] = row
            print(f"{name:8s} prefill {row['prefill_tok_s']:7.1f} tok/s  decode {row['decode_tok_s']:6.1f} tok/s  "
                  f"link {row['prefill_bytes_per_token']:9.0f} B/tok prefill, {row['decode_bytes_per_token']:9.0f} "
                  f"B/tok decode, {row['decode_segments_per_token']:.0f} TCP segments/tok decode", flush=True)
    finally:
        for s in servers:
            s.kill()
    results["loadavg_after"] = os.getloadavg()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
