"""The Ray ingress's edge cases without a Ray instance: the real ASGI app over RayService, whose
replicas answer as scripted (the fakes of test_ray_ingress)."""

from __future__ import annotations

import asyncio
import gc
import json

import pytest

pytest.importorskip("ray")

from test_ray_ingress import FakeHandle, _replicas_answering  # noqa: E402

from caraserve.config import ServerConfig  # noqa: E402
from caraserve.ray_serve.config import RoutingConfig  # noqa: E402
from caraserve.ray_serve.ingress import RayService  # noqa: E402
from caraserve.ray_serve.messages import Head  # noqa: E402
from caraserve.serve import protocol as proto  # noqa: E402
from caraserve.serve.http import ApiError  # noqa: E402
from caraserve.serve.routes import guarded_app  # noqa: E402

LINES = ["data: {\"a\": 1}\n\n", "data: [DONE]\n\n"]


async def asgi_post(app, path: str, body: dict, rid: str, gone: bool) -> list[dict]:
    """One POST through the ASGI app (a scope as Ray Serve's proxy gives it: no asgi
    spec_version); gone: the client has left once its body is read. The messages sent back."""
    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"x-request-id", rid.encode())],
             "scheme": "http", "server": ("test", 80), "client": ("test", 1), "root_path": ""}
    messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]
    sent = []

    async def receive():
        if messages:
            return messages.pop(0)
        if gone:
            return {"type": "http.disconnect"}
        await asyncio.Event().wait()

    async def send(message):
        sent.append(message)
        await asyncio.sleep(0)

    await app(scope, receive, send)
    return sent


def test_a_client_gone_before_its_stream_starts_frees_its_id_and_cancels_the_replica():
    """The first token came, but the client left before the response's first line was sent: the
    stream is never iterated. The call must still end: its id taken again, the replica's call
    cancelled (else it generates to max_tokens for no one), drain not waiting for it."""
    handle = FakeHandle([[Head(200, None), *LINES], [Head(200, None), *LINES]])
    service = RayService(handle, RoutingConfig(max_attempts=3, first_token_timeout_s=2))
    app = guarded_app(service, ServerConfig())
    body = {"model": "demo-r8", "prompt": "x", "max_tokens": 4, "stream": True}

    async def go():
        await asgi_post(app, "/v1/completions", body, "same", gone=True)
        for _ in range(3):  # what the stream left behind is collected, and its finalizers run
            gc.collect()
            await asyncio.sleep(0.05)
        assert service.inflight == 0 and not service.live_ids
        assert handle.gens[0].cancelled
        sent = await asgi_post(app, "/v1/completions", body, "same", gone=False)
        assert sent[0]["status"] == 200

    asyncio.run(go())


def test_an_unload_reaches_a_replacement_replica_that_never_had_the_runtime_adapter():
    """Loaded through the ingress on r0 and r1; r1 died and Serve's replacement starts without it
    (it gets it only when a request for it lands there). The unload is what the caller asked for
    on every replica: r0 unloads, the replacement has nothing to unload. It must succeed, and the
    adapter must not be loaded back anywhere."""
    handle = FakeHandle([])
    handle.fan_out = _replicas_answering([200, 200])
    service = RayService(handle, RoutingConfig(max_attempts=3, first_token_timeout_s=2))

    async def go():
        await service.load_adapter(proto.LoadLoraRequest(lora_name="rt", lora_path="/adapters/rt"))
        handle.fan_out = _replicas_answering([200, 404])  # r1 is the replacement
        handle.fan_out.calls.clear()
        answer = await service.unload_adapter(proto.UnloadLoraRequest(lora_name="rt"))
        assert answer["status"] == "ok"
        assert not any(op == "load_adapter" for op, _ in handle.fan_out.calls)
        assert "rt" not in service.runtime_adapters and "rt" in service.unloaded
        with pytest.raises(ApiError) as e:  # gone from the whole deployment
            await service.completion(proto.CompletionRequest(model="rt", prompt="x"), "q", False)
        assert e.value.status == 404

    asyncio.run(go())


class Replicas:
    """Replicas holding adapters by name, as the engine's registry does: a load of a name held
    already is refused (400), an unload of one not held is a 404; `full` replicas refuse loads
    (503 adapter_capacity). Fan-out calls go to the replicas not covered yet, a target call to
    its target."""

    def __init__(self, names: list[str]):
        self.held = {r: set() for r in names}
        self.full: set[str] = set()

    async def remote(self, hint, op, body=None):
        if hint.covered is None:
            replica = hint.target
        else:
            replica = next((r for r in self.held if r not in hint.covered), None)
            if replica is None:
                return Head(200, None, None, "none", skipped=True)
        held, name = self.held[replica], body.lora_name
        if op == "load_adapter" and replica in self.full:
            return Head(503, proto.error_body("registry full", "adapter_capacity", 503), None, replica)
        if op == "load_adapter" and name in held:
            return Head(400, proto.error_body(f"adapter {name!r} is already registered", "invalid_request_error",
                                              400), None, replica)
        if op == "unload_adapter" and name not in held:
            return Head(404, proto.error_body(f"adapter {name!r} is not loaded", "not_found_error", 404), None,
                        replica)
        (held.add if op == "load_adapter" else held.discard)(name)
        return Head(200, {"status": "ok", "lora_name": name, "rank": 8}, None, replica)


def test_a_load_one_replica_refuses_is_undone_on_the_others_and_can_be_sent_again():
    """r1 cannot take the adapter now (503, come back later): the caller is told the load failed,
    so no replica may keep it (r0 would serve it while the ingress does not know it), and the
    same load sent again once r1 has room succeeds everywhere."""
    handle = FakeHandle([])
    handle.fan_out = replicas = Replicas(["r0", "r1"])
    replicas.full.add("r1")
    service = RayService(handle, RoutingConfig(max_attempts=3, first_token_timeout_s=2))
    load = proto.LoadLoraRequest(lora_name="rt", lora_path="/adapters/rt")

    async def go():
        with pytest.raises(ApiError) as e:
            await service.load_adapter(load)
        assert e.value.status == 503
        assert replicas.held == {"r0": set(), "r1": set()}
        replicas.full.clear()
        assert (await service.load_adapter(load))["replicas"] == 2
        assert replicas.held == {"r0": {"rt"}, "r1": {"rt"}}

    asyncio.run(go())


@pytest.fixture(scope="module")
def full_cluster():
    """One replica that takes one call at a time (cluster.max_ongoing_requests=1)."""
    import shutil
    import tempfile

    import ray
    from ray import serve
    from test_ray_serve import composed
    from test_server import free_port

    from caraserve.ray_serve.app import app_config, deploy

    temp, port = tempfile.mkdtemp(prefix="csrv", dir="/tmp"), free_port()
    deploy(app_config(composed([
        "cluster.replicas=1", "cluster.cpus_per_replica=1", "cluster.max_ongoing_requests=1", "engine.compile=false",
        "router.first_token_timeout_s=2", "router.request_timeout_s=3", "router.max_attempts=2",
        f"server.port={port}", f"ray.temp_dir={temp}", "ray.num_cpus=2"])))
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_a_full_deployment_answers_probes_at_once_and_new_calls_503(full_cluster):
    """Every replica holds max_ongoing_requests calls (one long stream here). The probes are
    answered however busy the server is (an orchestrator restarts a server whose liveness probe
    fails), and a new call is refused as overloaded (503, come back later), not held for
    max_attempts x first_token_timeout_s and answered 502 as if the replicas had failed."""
    import threading
    import time

    import httpx

    max_len = httpx.get(full_cluster + "/v1/models", timeout=60).json()["data"][0]["max_model_len"]
    started, ended = threading.Event(), threading.Event()

    def long_stream():
        body = {"model": "tiny", "prompt": "x", "max_tokens": max_len - 8, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", full_cluster + "/v1/completions", json=body, timeout=300) as r:
            for _ in r.iter_lines():
                started.set()
        ended.set()

    threading.Thread(target=long_stream, daemon=True).start()
    assert started.wait(60)

    def timed(method: str, path: str, **kw) -> tuple[int | str, float]:
        t0 = time.monotonic()
        try:
            status = httpx.request(method, full_cluster + path, timeout=8, **kw).status_code
        except httpx.TimeoutException:
            status = "timed out"
        return status, round(time.monotonic() - t0, 1)

    health = timed("GET", "/health")
    refused = timed("POST", "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert not ended.is_set(), "the long stream ended before the checks: they prove nothing"
    assert health[0] == 200 and health[1] < 2, health
    assert refused[0] == 503 and refused[1] < 2, refused


@pytest.mark.parametrize("prefix", ["api", "/api/", "/{x}"])
def test_a_route_prefix_serve_refuses_is_a_config_error_before_ray_starts(prefix):
    """Serve refuses these in serve.run, after Ray has started and the replicas' checks ran: the
    settings' check is where a bad one must stop (one line, exit 2)."""
    from caraserve.config import ConfigError
    from caraserve.ray_serve.config import RayConfig

    with pytest.raises(ConfigError, match="ray.route_prefix"):
        RayConfig.from_dict({"route_prefix": prefix})


@pytest.mark.slow
def test_a_client_that_leaves_frees_the_replica_for_the_next_call(full_cluster):
    """The one replica takes one call at a time: once a client has gone (a non-streamed call, then
    a stream after its first chunk), the next call must find the replica free, its request
    aborted rather than generated to max_tokens for no one."""
    import time

    import httpx

    max_len = httpx.get(full_cluster + "/v1/models", timeout=60).json()["data"][0]["max_model_len"]
    long = {"model": "tiny", "prompt": "x", "max_tokens": max_len - 8, "ignore_eos": True}
    small = {"model": "tiny", "prompt": "x", "max_tokens": 2}

    def free_within(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if httpx.post(full_cluster + "/v1/completions", json=small, timeout=30).status_code == 200:
                return True
            time.sleep(0.2)
        return False

    assert free_within(120)  # (what an earlier test left running has ended)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(full_cluster + "/v1/completions", json=long, timeout=3)
    assert free_within(5), "the non-streamed call of a client gone still holds the replica"
    with httpx.stream("POST", full_cluster + "/v1/completions", json={**long, "stream": True}, timeout=30) as r:
        next(r.iter_lines())
    assert free_within(5), "the stream of a client gone still holds the replica"


def test_the_router_sends_a_call_past_a_replica_at_its_call_limit():
    """A replica holding cluster.max_ongoing_requests calls refuses one more (503); Serve lets it
    have more (its own limit leaves room for probes), so the router itself ranks the replicas
    with room first, as Serve's own limit made it try them before."""
    from ray.serve._private.common import DeploymentHandleSource
    from test_ray_router import DEPLOYMENT, choose, idle, replica

    from caraserve.ray_serve.request_router import RankAwareRequestRouter

    async def build():
        r = RankAwareRequestRouter(DEPLOYMENT, DeploymentHandleSource.UNKNOWN)
        r.initialize_state(policy="first_fit", slo_ms=1000.0, seed=0, max_calls=1)
        return r

    router = asyncio.run(build())
    reps = [replica("r1", idle()), replica("r2", idle())]
    assert [choose(router, reps, f"q{i}") for i in range(2)] == ["r1", "r2"]
