"""The server process as an operator sees it: SIGTERM during an idle-time compile, the drain
time running out, and server.limit_concurrency (each on a `python -m caraserve.serve` of its own)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from test_server import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_server_exits_0_on_sigterm_during_an_idle_compile(tmp_path):
    """engine.compile=auto on CPU compiles decode variants on the engine thread once the server
    is idle; a SIGTERM while one compiles (a compile in a thread other than the main one) used to
    abort the process at exit (status 134) in about a third to a half of the tries, and it waited
    for the compile up to 10 s. Each try starts on an empty compile cache and is stopped at
    another point of the compile (a cold one takes ~30 s): the server exits at once."""
    from caraserve.model.tiny import tiny_paths

    tiny_paths()  # built here once, not inside the first server's start
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for attempt, delay in enumerate((0.5, 1.5, 3.0, 4.5)):
        port, cache, log_file = free_port(), tmp_path / f"cache{attempt}", tmp_path / f"serve{attempt}.log"
        with open(log_file, "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "caraserve.serve", f"server.port={port}",
                                     "engine.compile=auto", f"engine.compile_cache_dir={cache}"],
                                    stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                assert proc.poll() is None, log_file.read_text()[-2000:]
                try:
                    if httpx.get(base + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            for model in ("tiny", "demo-r8"):  # decode steps queue the variants' compiles
                r = httpx.post(base + "/v1/completions", timeout=60,
                               json={"model": model, "prompt": "x", "max_tokens": 4})
                assert r.status_code == 200, r.text
            while "compiling the decode step" not in log_file.read_text() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(delay)
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            status = proc.wait(timeout=60)
            waited_s = time.monotonic() - t0
            text = log_file.read_text()
            assert status == 0, text[-2000:]
            assert waited_s < 5, f"{waited_s:.1f} s from SIGTERM to exit"
            assert "terminate called" not in text
        finally:
            if proc.poll() is None:
                proc.kill()


def _start_server(tmp_path, *overrides: str):
    """A `python -m caraserve.serve` on a free port, healthy: (process, base URL, log file). The
    log file is its stdout; its stderr goes to serve.err beside it."""
    from caraserve.model.tiny import tiny_paths

    tiny_paths()
    port, log_file = free_port(), tmp_path / "serve.log"
    with open(log_file, "w") as log, open(tmp_path / "serve.err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "caraserve.serve", f"server.port={port}", *overrides],
                                stdout=log, stderr=err, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=ROOT)
    base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, log_file.read_text()[-2000:]
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base, log_file
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not start")


def test_limit_concurrency_serves_that_many_requests_at_once(tmp_path):
    """server.limit_concurrency=2: two requests at once are served; a third at that time gets an
    OpenAI-style JSON 503 (uvicorn's own limit answered plain text), counted in /metrics, while
    the health and metrics probes are still answered."""
    proc, base, _ = _start_server(tmp_path, "engine.compile=false", "server.limit_concurrency=2",
                                  "cpu_assist.mode=off", "cpu_assist.emulate_copy_gbps=0.002")
    try:
        got = {}

        def call(name, model):  # cold adapters: each waits ~2 s for its emulated copy
            r = httpx.post(base + "/v1/completions", timeout=60, json={"model": model, "prompt": "x", "max_tokens": 2})
            got[name] = r.status_code

        slow = [threading.Thread(target=call, args=(m, m)) for m in ("demo-r32", "demo-r64")]
        for t in slow:
            t.start()
            time.sleep(0.3)
        third = httpx.post(base + "/v1/completions", timeout=10, json={"model": "tiny", "prompt": "x", "max_tokens": 1})
        probes = [httpx.get(base + path, timeout=10).status_code for path in ("/health", "/metrics")]
        for t in slow:
            t.join(timeout=60)
        assert got == {"demo-r32": 200, "demo-r64": 200} and probes == [200, 200]
        assert third.status_code == 503 and third.headers["retry-after"] == "1"
        assert third.json()["error"]["type"] == "server_overloaded"
        assert "server.limit_concurrency" in third.json()["error"]["message"]
        metrics = httpx.get(base + "/metrics", timeout=10).text
        assert 'caraserve_requests_total{status="rejected_concurrency_limit"} 1.0' in metrics
        assert httpx.get(base + "/v1/models", timeout=10).status_code == 200  # served again
    finally:
        proc.kill()


def test_requests_the_drain_time_leaves_get_a_503_not_a_cancelled_connection(tmp_path):
    """SIGTERM with a request that cannot finish within server.drain_timeout_s (its adapter's
    emulated copy takes minutes): it is answered with a JSON 503 saying why, the process exits 0,
    and the log holds no traceback of cancelled handlers."""
    proc, base, log_file = _start_server(tmp_path, "engine.compile=false", "server.drain_timeout_s=2",
                                         "cpu_assist.mode=off", "cpu_assist.emulate_copy_gbps=0.0001")
    try:
        got = {}

        def call():
            r = httpx.post(base + "/v1/completions", timeout=60,
                           json={"model": "demo-r64", "prompt": "x", "max_tokens": 4})
            got["status"], got["body"] = r.status_code, r.json()

        t = threading.Thread(target=call)
        t.start()
        time.sleep(1.0)  # admitted, its adapter being copied
        proc.send_signal(signal.SIGTERM)
        t.join(timeout=60)
        assert got.get("status") == 503, got
        assert "shutting down" in got["body"]["error"]["message"]
        assert proc.wait(timeout=60) == 0
        out, err = log_file.read_text(), (tmp_path / "serve.err").read_text()
        assert "Traceback" not in out + err
        # One log on stdout, every line stamped, uvicorn's lines (start, access, shutdown) among them
        lines = out.splitlines()
        stamped = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")
        assert lines and all(stamped.match(line) for line in lines), out
        for expected in ("uvicorn.error: Started server process", '"POST /v1/completions HTTP/1.1" 503',
                         "uvicorn.error: Finished server process", "caraserve.serve: drained; exiting"):
            assert any(expected in line for line in lines), (expected, out)
        assert "uvicorn" not in err and "INFO" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
