"""The router over replicas: routing with its own accounting, retries, down/up, streaming, errors.

Fake replicas (httpx.MockTransport) make the failure cases exact and fast; the last test runs real
caraserve.serve replicas behind `python -m caraserve.router` and kills one mid-run.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from caraserve.cluster.config import RouterServiceConfig
from caraserve.cluster.router import Router
from caraserve.config import ConfigError, ServerConfig
from caraserve.model.tiny import tiny_paths
from caraserve.router.app import build_router_app
from caraserve.serve.protocol import FAULT_HEADER

ROOT = Path(__file__).resolve().parents[1]


class FakeReplica:
    """A replica speaking just enough of the server's API. `mode`: ok | error500 | refuse |
    stream_dies_early | stream_breaks; `hold`: an Event a completion waits for."""

    def __init__(self, name: str, max_batch_size: int = 8):
        self.name, self.max_batch_size = name, max_batch_size
        self.mode = "ok"
        self.hold: asyncio.Event | None = None
        self.completions = 0
        self.healthy = True

    def state(self) -> dict:
        return {"model": "base", "max_batch_size": self.max_batch_size, "running": [], "queued": [],
                "resident_adapters": [], "adapters": {"lora-a": 8, "lora-b": 64}, "slo_ms": 0.0, "perf_model": None}

    async def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if self.mode == "refuse" or (path == "/health" and not self.healthy):
            raise httpx.ConnectError("connection refused", request=request)
        if path == "/health":
            return httpx.Response(200, json={"status": "ok"})
        if path == "/v1/state":
            if self.mode == "slow_state":  # busy in a long engine step
                raise httpx.ReadTimeout("state read timed out", request=request)
            return httpx.Response(200, json=self.state())
        body = json.loads(request.content)
        if self.mode == "error500":
            return httpx.Response(500, json={"error": {"message": "boom"}})
        if self.mode == "busy":
            return httpx.Response(503, json={"error": {"message": "queue full"}})
        if body.get("max_tokens") == 999:
            return httpx.Response(400, json={"error": {"message": "bad max_tokens"}})
        if body.get("max_tokens") == 666:  # the request's own step failed on this replica
            return httpx.Response(500, json={"error": {"message": "poisoned", "type": "request_failed"}},
                                  headers={FAULT_HEADER: "request"})
        if self.hold is not None:
            await self.hold.wait()
        self.completions += 1
        rid = request.headers["x-request-id"]
        if body.get("stream"):
            return httpx.Response(200, stream=_Chunks(self.name, rid, self.mode))
        return httpx.Response(200, json={"id": rid, "choices": [{"text": f"from {self.name}"}],
                                         "usage": {"completion_tokens": 1}})


class _Chunks(httpx.AsyncByteStream):
    def __init__(self, name, rid, mode):
        self.name, self.rid, self.mode = name, rid, mode

    async def __aiter__(self):
        if self.mode == "stream_dies_early":
            raise httpx.ReadError("died before the first token")
        yield f'data: {{"id": "{self.rid}", "text": "{self.name}-1"}}\n\n'.encode()
        if self.mode == "stream_breaks":
            raise httpx.ReadError("died mid-stream")
        yield b"data: [DONE]\n\n"


def make_router(fakes: list[FakeReplica], **overrides) -> Router:
    by_host = {f"{f.name}:80": f for f in fakes}

    async def handler(request: httpx.Request):
        return await by_host[f"{request.url.host}:{request.url.port or 80}"].handle(request)

    cfg = RouterServiceConfig(**{"replicas": tuple(f"http://{f.name}" for f in fakes), "policy": "most_idle",
                                 "poll_interval_s": 0.02, "probe_interval_s": 0.05, "max_wait_s": 5.0,
                                 **overrides})
    return Router(cfg, transport=httpx.MockTransport(handler))


def run(coro):
    return asyncio.run(coro)


def test_own_accounting_spreads_requests_the_snapshot_has_not_seen_yet():
    async def go():
        a, b = FakeReplica("a"), FakeReplica("b")
        a.hold = b.hold = asyncio.Event()
        router = make_router([a, b], poll_interval_s=60)  # no fresh reads: only the router's own accounting
        await router.start()
        tasks = [asyncio.create_task(router.forward("/v1/completions", {"model": "lora-a", "prompt": "x"}))
                 for _ in range(4)]
        await asyncio.sleep(0.2)
        inflight = [len(r.inflight) for r in router.replicas]
        a.hold.set()
        await asyncio.gather(*tasks)
        after = [len(r.inflight) for r in router.replicas]
        await router.close()
        return inflight, after, a.completions, b.completions

    inflight, after, na, nb = run(go())
    assert inflight == [2, 2]  # most_idle saw its own in-flight requests; the stale snapshot shows none
    assert after == [0, 0] and (na, nb) == (2, 2)


def test_state_drops_own_finished_requests_but_keeps_others():
    router = make_router([FakeReplica("a")])
    rep = router.replicas[0]
    view = {"adapter": "lora-a", "rank": 8, "prompt_tokens": 4, "remaining_tokens": 10}
    rep.snapshot = {"max_batch_size": 8, "running": [{"request_id": router.prefix + "7", **view},
                                                     {"request_id": "someone-else", **view}], "queued": []}
    state = rep.state(router.prefix, router.fallback)
    assert len(state.running) == 1  # ours finished since the read; the other client's still runs
    rep.inflight[router.prefix + "8"] = state.running[0]
    assert len(rep.state(router.prefix, router.fallback).queued) == 1  # sent after the read: queued


def test_failed_replica_is_retried_marked_down_and_probed_back():
    async def go():
        a, b = FakeReplica("a"), FakeReplica("b")
        router = make_router([a, b], max_failures=2)
        await router.start()
        a.mode = "error500"
        a.healthy = False
        outs = [await router.forward("/v1/completions", {"model": "base", "prompt": "x"}) for _ in range(4)]
        down = router.replicas[0].up
        a.mode, a.healthy = "ok", True
        for _ in range(100):
            await asyncio.sleep(0.02)
            if router.replicas[0].up:
                break
        back = router.replicas[0].up
        await router.close()
        return outs, down, back, b.completions

    outs, down, back, nb = run(go())
    assert all(o.status_code == 200 and b"from b" in o.body for o in outs)
    assert nb == 4
    assert down is False and back is True


def test_a_slow_state_read_does_not_mark_a_replica_down():
    async def go():
        a = FakeReplica("a")
        router = make_router([a], max_failures=1)
        await router.start()
        a.mode = "slow_state"
        await asyncio.sleep(0.3)  # ~15 polls time out
        up = router.replicas[0].up
        a.mode = "ok"
        r = await router.forward("/v1/completions", {"model": "base", "prompt": "x"})
        await router.close()
        return up, r.status_code

    assert run(go()) == (True, 200)


def test_every_attempt_failing_names_the_replicas_and_busy_ones_give_503():
    async def go():
        a, b = FakeReplica("a"), FakeReplica("b")
        router = make_router([a, b], max_attempts=2, max_failures=10)
        await router.start()
        a.mode = b.mode = "error500"
        with pytest.raises(Exception) as broken:
            await router.forward("/v1/completions", {"model": "base", "prompt": "x"})
        a.mode = b.mode = "busy"
        with pytest.raises(Exception) as busy:
            await router.forward("/v1/completions", {"model": "base", "prompt": "x"})
        await router.close()
        return broken.value, busy.value

    broken, busy = run(go())
    assert broken.status == 502 and "http://a" in broken.message and "http://b" in broken.message
    assert busy.status == 503 and "overloaded" in busy.message


def test_client_errors_pass_through_without_retry():
    async def go():
        a, b = FakeReplica("a"), FakeReplica("b")
        router = make_router([a, b])
        sent = []
        router.on_event = lambda kind, url: sent.append(kind)
        await router.start()
        r = await router.forward("/v1/completions", {"model": "base", "prompt": "x", "max_tokens": 999})
        await router.close()
        return r, sent

    r, sent = run(go())
    assert r.status_code == 400 and b"bad max_tokens" in r.body
    assert sent == ["sent"]


def test_a_request_fault_is_returned_without_retry_or_blame():
    async def go():
        a, b = FakeReplica("a"), FakeReplica("b")
        router = make_router([a, b], max_failures=1)
        sent = []
        router.on_event = lambda kind, url: sent.append(kind)
        await router.start()
        r = await router.forward("/v1/completions", {"model": "base", "prompt": "x", "max_tokens": 666})
        reps = list(router.replicas)
        await router.close()
        return r, sent, reps

    r, sent, reps = run(go())
    assert r.status_code == 500 and b"poisoned" in r.body
    assert sent == ["sent"] and all(rep.up and rep.failures == 0 for rep in reps)


async def _read_stream(resp) -> bytes:
    return b"".join([c async for c in resp.body_iterator])


def test_stream_retried_before_first_token_and_error_event_after_it():
    async def go():
        a, b = FakeReplica("a"), FakeReplica("b")
        router = make_router([a, b], policy="first_fit")
        await router.start()
        a.mode = "stream_dies_early"
        first = await _read_stream(await router.forward("/v1/completions", {"model": "base", "prompt": "x",
                                                                            "stream": True}))
        a.mode, b.mode = "stream_breaks", "stream_breaks"
        broken = await _read_stream(await router.forward("/v1/completions", {"model": "base", "prompt": "x",
                                                                             "stream": True}))
        inflight = [len(r.inflight) for r in router.replicas]
        await router.close()
        return first, broken, inflight

    first, broken, inflight = run(go())
    assert b"b-1" in first and first.endswith(b"[DONE]\n\n")  # a died before its first token: b served it
    assert b"-1" in broken and b"replica failed mid-stream" in broken and broken.endswith(b"[DONE]\n\n")
    assert inflight == [0, 0]


def test_waits_for_room_then_gives_up_with_503():
    async def go():
        a = FakeReplica("a", max_batch_size=1)
        a.hold = asyncio.Event()
        router = make_router([a], poll_interval_s=60, max_wait_s=0.3)
        await router.start()
        first = asyncio.create_task(router.forward("/v1/completions", {"model": "base", "prompt": "x"}))
        await asyncio.sleep(0.05)
        with pytest.raises(Exception) as refused:
            await router.forward("/v1/completions", {"model": "base", "prompt": "y"})
        second = asyncio.create_task(router.forward("/v1/completions", {"model": "base", "prompt": "z"}))
        await asyncio.sleep(0.05)
        waiting = router.waiting
        a.hold.set()
        outs = await asyncio.gather(first, second)
        await router.close()
        return refused.value, waiting, outs

    refused, waiting, outs = run(go())
    assert getattr(refused, "status", None) == 503 and "full" in refused.message
    assert waiting == 1  # the second waited while the only slot was taken, then ran
    assert [o.status_code for o in outs] == [200, 200]


def test_app_validates_and_names_unknown_models():
    async def go():
        router = make_router([FakeReplica("a")])
        app = build_router_app(router, ServerConfig())
        await router.start()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as c:
            rs = [await c.post("/v1/completions", json={"model": "nope", "prompt": "x"}),
                  await c.post("/v1/completions", content=b"{not json"),
                  await c.post("/v1/completions", json={"prompt": "x"}),
                  await c.post("/v1/completions", json={"model": "lora-b", "prompt": "x"}),
                  await c.get("/v1/models"), await c.get("/health")]
        await router.close()
        return rs

    missing, bad_json, no_model, ok, models, health = run(go())
    assert missing.status_code == 404 and "nope" in missing.json()["error"]["message"]
    assert bad_json.status_code == 400 and "JSON" in bad_json.json()["error"]["message"]
    assert no_model.status_code == 400 and "model" in no_model.json()["error"]["message"]
    assert ok.status_code == 200
    assert {m["id"]: m.get("rank") for m in models.json()["data"]} == {"base": None, "lora-a": 8, "lora-b": 64}
    assert health.json()["replicas_up"] == 1


def test_config_refuses_bad_values():
    with pytest.raises(ConfigError, match="at least one replica"):
        RouterServiceConfig(replicas=())
    with pytest.raises(ConfigError, match="not an http"):
        RouterServiceConfig(replicas=("127.0.0.1:8001",))
    with pytest.raises(ConfigError, match="duplicate"):
        RouterServiceConfig(replicas=("http://a", "http://a"))
    with pytest.raises(ValueError, match="unknown policy"):
        Router(RouterServiceConfig(replicas=("http://a",), policy="nope"))


# ---- end to end: real replicas, a real router, one replica killed mid-run -----------------------

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc, want_up: int = 0, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{url} exited early"
        try:
            r = httpx.get(url + "/health", timeout=2)
            if r.status_code == 200 and r.json().get("replicas_up", 0) >= want_up:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} not healthy")


def test_router_end_to_end_survives_a_killed_replica(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []

    def spawn(name, *args):
        log = open(tmp_path / f"{name}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        procs.append(proc)
        return proc

    tiny_paths()  # built once here, not by both replicas at the same time
    try:
        ports = [_free_port() for _ in range(2)]
        reps = [spawn(f"replica{i}", "caraserve.serve", f"server.port={p}", "engine.compile=false",
                      "server.log_level=warning") for i, p in enumerate(ports)]
        for p, proc in zip(ports, reps):
            _wait(f"http://127.0.0.1:{p}", proc)
        rport = _free_port()
        router = spawn("router", "caraserve.router", f"replicas=[http://127.0.0.1:{ports[0]},http://127.0.0.1:{ports[1]}]",
                       "policy=rank_aware", f"server.port={rport}", "server.log_level=warning")
        url = f"http://127.0.0.1:{rport}"
        _wait(url, router, want_up=2)
        models = ["tiny", "demo-r8", "demo-r16", "demo-r32", "demo-r64"]

        def call(i):
            body = {"model": models[i % 5], "prompt": f"request {i}: def f():", "max_tokens": 24,
                    "temperature": 0, "ignore_eos": True}
            r = httpx.post(url + "/v1/completions", json=body, timeout=120)
            return r.status_code, r.json()

        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(call, i) for i in range(48)]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # mid-run: some finished, some in flight on the victim
                state = httpx.get(url + "/v1/state", timeout=5).json()
                if sum(f.done() for f in futures) >= 4 and state["replicas"][0]["inflight"] > 0:
                    break
                time.sleep(0.05)
            reps[0].send_signal(signal.SIGKILL)
            results = [f.result() for f in futures]
        assert [s for s, _ in results] == [200] * 48, [b for s, b in results if s != 200][:2]
        assert all(b["usage"]["completion_tokens"] == 24 for _, b in results)
        metrics = httpx.get(url + "/metrics", timeout=5).text
        assert 'caraserve_router_events_total{event="retry"' in metrics  # some were retried away from it
        # a retried request's answer is the survivor's own greedy answer
        direct = httpx.post(f"http://127.0.0.1:{ports[1]}/v1/completions", timeout=60, json={
            "model": "demo-r16", "prompt": "request 2: def f():", "max_tokens": 24, "temperature": 0,
            "ignore_eos": True}).json()
        assert results[2][1]["choices"][0]["text"] == direct["choices"][0]["text"]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
