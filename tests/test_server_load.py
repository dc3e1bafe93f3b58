"""Load on the real server: 200 concurrent streams over 4 adapters and the base model."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import httpx
import pytest
from test_server import free_port

N_STREAMS = 200
N_DISCONNECT = 20
TOKENS = 12
MODELS = ["tiny", "demo-r8", "demo-r16", "demo-r32", "demo-r64"]


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("CARASERVE_API_KEY", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "caraserve.serve", f"server.port={port}", "engine.max_batch_size=32",
         "engine.compile=false", "server.log_level=warning"],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, env=env, cwd=root)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"server did not start: {(root / 'server.log').read_text()[-2000:]}")
    yield url
    proc.kill()


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def one_stream(client: httpx.AsyncClient, url: str, i: int, cut: bool) -> dict:
    body = {"model": MODELS[i % len(MODELS)], "prompt": f"def f{i}(x):", "max_tokens": 200 if cut else TOKENS,
            "ignore_eos": True, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    chunks, usage, done, status = 0, None, False, None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        status = r.status_code
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            chunks += 1
            if cut and chunks >= 3:
                break  # leaves the stream: the connection closes mid-response
    return {"status": status, "usage": usage, "done": done}


def test_200_concurrent_streams_complete_and_disconnects_free_slots(base_url):
    aborts_before = metric(base_url, 'caraserve_requests_total{status="abort"}')

    async def run():
        limits = httpx.Limits(max_connections=N_STREAMS + N_DISCONNECT)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            jobs = [one_stream(client, base_url, i, cut=i < N_DISCONNECT) for i in range(N_STREAMS + N_DISCONNECT)]
            return await asyncio.gather(*jobs)

    results = asyncio.run(run())
    full = results[N_DISCONNECT:]
    statuses = [r["status"] for r in results]
    assert statuses == [200] * len(results), {s: statuses.count(s) for s in set(statuses)}
    assert all(r["done"] for r in full), "every full stream ends with [DONE]"
    assert all(r["usage"] and r["usage"]["completion_tokens"] == TOKENS for r in full)
    deadline = time.time() + 60
    while time.time() < deadline and metric(base_url, "caraserve_running_batch_size") > 0:
        time.sleep(0.2)
    assert metric(base_url, "caraserve_running_batch_size") == 0
    assert metric(base_url, "caraserve_queue_length") == 0
    assert metric(base_url, 'caraserve_requests_total{status="abort"}') - aborts_before == N_DISCONNECT
    assert metric(base_url, 'caraserve_requests_total{status="length"}') >= N_STREAMS
