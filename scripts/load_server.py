"""Load test of `pylazy serve` (and, beside it, llama-cpp-python's `python -m llama_cpp.server`).

Loopback only and bounded: each server is started here on a free 127.0.0.1 port, gets a
sequential warm-up pass, then ``--rounds`` rounds of ``--clients`` concurrent clients x
``--requests`` requests each (completions and chats, streamed and not; every
``--disconnect-every``-th request is a stream the client drops after two events), and is
stopped. Every completed answer is greedy and must equal the text the same request gets
from the matching library, run here in-process: ``pylazy.Llama`` for pylazy, the
llama.cpp reference (``pylazy.llama_ref.reference_llama``, the settings the server uses)
for llama_cpp.server. Reported: requests ok / wrong / failed, p50/p95 latency, TTFT of
streams, tokens/s, and the server's RSS after the warm-up and after each round.

    python scripts/load_server.py                       # both servers, the table on stdout
    python scripts/load_server.py --servers pylazy --parallel 2 --json out.json
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.server_process import free_port, request, stop_process  # noqa: E402

COMPLETIONS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
               "The three laws of motion are"]
CHATS = [[{"role": "user", "content": "Name three primary colors."}],
         [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Why is the sky blue?"}],
         [{"role": "user", "content": "Give me a word that rhymes with cat."}],
         [{"role": "user", "content": "What is 12 times 7?"}]]


def workload(n_clients: int, n_requests: int, disconnect_every: int):
    """[(client, i, kind, prompt index, stream, drop)]: the same mix for every server."""
    jobs = []
    for c in range(n_clients):
        for i in range(n_requests):
            n = c * n_requests + i
            kind = "chat" if n % 2 else "completion"
            stream = (n // 2) % 2 == 0
            drop = stream and disconnect_every > 0 and n % disconnect_every == 4   # n % 4 == 0: a stream
            jobs.append((c, i, kind, (c + i) % len(COMPLETIONS), stream, drop))
    return jobs


def body_for(kind: str, index: int, stream: bool, max_tokens: int) -> dict:
    # repeat_penalty spelled out: llama_cpp.server's default is 1.1, the libraries' 1.0
    body = {"max_tokens": max_tokens, "temperature": 0, "repeat_penalty": 1.0, "stream": stream, "model": "m"}
    if kind == "chat":
        body["messages"] = CHATS[index]
    else:
        body["prompt"] = COMPLETIONS[index]
    return body


def one_request(base: str, kind: str, body: dict, drop: bool, timeout: float) -> dict:
    """Send one request; {"text", "ttft_s", "latency_s", "tokens", "status", "dropped"}."""
    host, port = base.split("//")[1].split(":")
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = {"status": resp.status, "dropped": False, "ttft_s": None, "tokens": 0}
    if resp.status != 200 or not body["stream"]:
        data = json.loads(resp.read())
        conn.close()
        out["latency_s"] = time.perf_counter() - t0
        if resp.status == 200:
            choice = data["choices"][0]
            out["text"] = choice["message"]["content"] if kind == "chat" else choice["text"]
            out["tokens"] = data["usage"]["completion_tokens"]
        return out
    parts, events = [], 0
    while True:
        line = resp.fp.readline()
        if not line:
            break
        if not line.startswith(b"data: "):
            continue
        payload = line[6:].strip()
        if payload == b"[DONE]":
            break
        chunk = json.loads(payload)
        events += 1
        if drop and events >= 2:
            out["dropped"] = True
            break
        if not chunk.get("choices"):
            continue
        choice = chunk["choices"][0]
        piece = (choice.get("delta") or {}).get("content") if kind == "chat" else choice.get("text")
        if piece:
            if out["ttft_s"] is None:
                out["ttft_s"] = time.perf_counter() - t0
            parts.append(piece)
            out["tokens"] += 1   # one chunk per token in both servers
    resp.close()   # a dropped stream: the socket closes now, mid-response
    conn.close()
    out["latency_s"] = time.perf_counter() - t0
    out["text"] = "".join(parts)
    return out


def expected_answers(server: str, model: str, n_ctx: int, max_tokens: int) -> dict:
    """{(kind, index): text} from the library the server runs, in this process."""
    if server == "pylazy":
        from pylazy import Llama
        llm = Llama(model, n_ctx=n_ctx, verbose=False)
    else:
        from pylazy.llama_ref import reference_llama
        llm = reference_llama(model, n_ctx=n_ctx, n_threads=max(1, (os.cpu_count() or 2) // 2))
    out = {}
    for i, prompt in enumerate(COMPLETIONS):
        llm.reset()
        out[("completion", i)] = llm(prompt, max_tokens=max_tokens, temperature=0)["choices"][0]["text"]
    for i, messages in enumerate(CHATS):
        llm.reset()
        resp = llm.create_chat_completion(messages, max_tokens=max_tokens, temperature=0)
        out[("chat", i)] = resp["choices"][0]["message"]["content"]
    llm.close()
    return out


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def start(server: str, model: str, n_ctx: int, parallel: int, log):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if server == "pylazy":
        cmd = [sys.executable, "-m", "pylazy", "serve", "-m", model, "--port", str(port), "--ctx", str(n_ctx),
               "--parallel", str(parallel)]
    else:   # llama.cpp's AMX buffers crash on these CPUs: the same patch as pylazy.llama_ref
        cmd = [sys.executable, __file__, "--serve-llama-cpp", "--model", model, "--port", str(port),
               "--n_ctx", str(n_ctx), "--interrupt_requests", "False"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{server} exited with {proc.returncode}")
        try:
            if request("GET", base, "/v1/models", timeout=5)[0] == 200:
                return proc, base
        except OSError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"{server} did not come up")


def run_round(base: str, jobs, max_tokens: int, expected: dict, timeout: float, deadline: float) -> dict:
    results = []
    t0 = time.perf_counter()
    lock = threading.Lock()
    by_client = {}
    for job in jobs:
        by_client.setdefault(job[0], []).append(job)

    def client(mine):
        for client_id, _i, kind, index, stream, drop in mine:
            if time.monotonic() > deadline:
                break
            sent = time.perf_counter() - t0
            try:
                r = one_request(base, kind, body_for(kind, index, stream, max_tokens), drop, timeout)
            except (OSError, ValueError) as exc:
                r = {"status": None, "error": repr(exc), "dropped": False}
            r.update(kind=kind, index=index, stream=stream, drop=drop, client=client_id, sent_s=sent)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(mine,)) for mine in by_client.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return summarize(results, len(jobs), wall, expected)


def summarize(results, n_sent: int, wall: float, expected: dict) -> dict:
    done = [r for r in results if r["status"] == 200 and not r["dropped"]]
    wrong = [r for r in done if r["text"] != expected[(r["kind"], r["index"])]]
    lat = sorted(r["latency_s"] for r in done)
    ttft = sorted(r["ttft_s"] for r in done if r["stream"] and r["ttft_s"] is not None)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else None
    return {"sent": n_sent, "answered": len(results), "completed": len(done), "wrong": len(wrong),
            "dropped": sum(r["dropped"] for r in results),
            "failed": sum(1 for r in results if r["status"] != 200),
            "lost": n_sent - len(results), "wall_s": wall,
            "p50_s": pct(lat, 0.5), "p95_s": pct(lat, 0.95),
            "ttft_p50_s": pct(ttft, 0.5), "ttft_p95_s": pct(ttft, 0.95),
            "tok_s": sum(r["tokens"] for r in done) / wall, "req_s": len(done) / wall,
            "wrong_examples": [(r["kind"], r["index"], r["text"][:60]) for r in wrong[:3]],
            "errors": [r.get("error") for r in results if r["status"] != 200][:3],
            "requests": [{k: r.get(k) for k in ("client", "kind", "stream", "drop", "sent_s", "latency_s", "ttft_s",
                                                "status")} for r in results]}


def bench_server(server: str, args, jobs) -> dict:
    expected = expected_answers(server, args.model, args.ctx, args.max_tokens)
    log = open(REPO / "build" / f"load_{server}.log", "w")
    proc, base = start(server, args.model, args.ctx, args.parallel, log)
    report = {"server": server, "rounds": []}
    try:
        warm = [(0, i, kind, i % len(COMPLETIONS), i % 4 < 2, False)
                for i, kind in enumerate(["completion", "chat"] * len(COMPLETIONS))]
        report["warmup"] = run_round(base, warm, args.max_tokens, expected, args.timeout,
                                     time.monotonic() + args.timeout)
        report["rss_mib"] = [rss_mib(proc.pid)]
        for _ in range(args.rounds):
            deadline = time.monotonic() + args.timeout
            report["rounds"].append(run_round(base, jobs, args.max_tokens, expected, args.timeout, deadline))
            time.sleep(1.0)   # dropped streams' generations end, slots go back
            report["rss_mib"].append(rss_mib(proc.pid))
        report["alive"] = proc.poll() is None
    finally:
        stop_process(proc)
        log.close()
    return report


def table(reports) -> str:
    rows = ["| server | round | completed / sent | wrong | failed | lost | dropped by client | p50 s | p95 s "
            "| stream TTFT p50 s | tok/s | req/s | RSS MiB after |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for rep in reports:
        for n, r in enumerate(rep["rounds"], 1):
            fmt = lambda v: "–" if v is None else f"{v:.2f}"
            rows.append(f"| {rep['label']} | {n} | {r['completed']} / {r['sent']} | {r['wrong']} | {r['failed']} "
                        f"| {r['lost']} | {r['dropped']} | {fmt(r['p50_s'])} | {fmt(r['p95_s'])} "
                        f"| {fmt(r['ttft_p50_s'])} | {r['tok_s']:.1f} | {r['req_s']:.2f} "
                        f"| {rep['rss_mib'][n]:.0f} (warm-up {rep['rss_mib'][0]:.0f}) |")
    return "\n".join(rows)


def serve_llama_cpp() -> None:
    """`python -m llama_cpp.server` with llama.cpp's extra buffer types off (see llama_ref)."""
    from llama_cpp.server.__main__ import main
    from pylazy.llama_ref import _no_extra_bufts
    sys.argv = [sys.argv[0]] + [a for a in sys.argv[1:] if a != "--serve-llama-cpp"]
    with _no_extra_bufts():
        main()


def main() -> int:
    if "--serve-llama-cpp" in sys.argv:
        serve_llama_cpp()
        return 0
    from pylazy.models import default_model_path
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--servers", default="pylazy,llama_cpp", help="comma list of pylazy, llama_cpp")
    p.add_argument("-m", "--model", default=default_model_path())
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--parallel", type=int, default=1, help="pylazy slots (llama_cpp.server has one)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=8, help="requests per client per round")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--disconnect-every", type=int, default=16, help="every N-th request drops its stream")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900, help="seconds per round (and per request)")
    p.add_argument("--json", default=None, help="write the full report here")
    args = p.parse_args()
    (REPO / "build").mkdir(exist_ok=True)
    jobs = workload(args.clients, args.requests, args.disconnect_every)
    reports = []
    for server in args.servers.split(","):
        if server == "llama_cpp":
            try:
                import llama_cpp.server.app  # noqa: F401  (its [server] extra's packages)
            except ImportError as exc:
                print(f"llama_cpp.server not runnable here ({exc}); skipped", file=sys.stderr)
                continue
        rep = bench_server(server, args, jobs)
        rep["label"] = f"pylazy serve --parallel {args.parallel}" if server == "pylazy" else "llama_cpp.server"
        reports.append(rep)
        print(json.dumps({k: v for k, v in rep.items() if k not in ("rounds", "warmup")}, default=str),
              file=sys.stderr)
    print(table(reports))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "reports": reports}, indent=1))
    ok = all(r["wrong"] == 0 and r["failed"] == 0 and r["lost"] == 0 and rep["alive"]
             for rep in reports for r in rep["rounds"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
