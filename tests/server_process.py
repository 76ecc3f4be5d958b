"""A `pylazy serve` process of this checkout on a free loopback port, and plain HTTP
requests to it (http.client: no client library between the test and the bytes)."""
from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*args: str, timeout: float = 300.0):
    """(process, base URL) of `python -m pylazy serve` from this checkout, once /health answers."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # stderr to a file, not a pipe: a pipe nobody reads would block the server once full
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "pylazy", "serve", "--port", str(port), *args],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log)
    proc.log = log
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited {proc.returncode}: {log.read().decode()[-2000:]}")
        try:
            status, body = request("GET", f"http://127.0.0.1:{port}", "/health")
            if status == 200 and body["status"] == "ok":
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not come up")


def stop_process(proc, timeout: float = 20.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stop_server(proc) -> None:
    stop_process(proc)
    proc.log.close()


def request(method: str, base: str, path: str, body=None, raw: bytes = None, headers=None, timeout=120):
    """(status, parsed JSON or text) of one plain HTTP request."""
    host, port = base.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    try:
        return resp.status, json.loads(text)
    except json.JSONDecodeError:
        return resp.status, text
