"""The HTTP server under bad input: every bad request gets a 4xx naming the problem, a request
whose own step fails gets an error (with its message, streamed or not) and nothing else changes,
adapter management needs its key, and the engine's own faults make /health say so."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import threading
import time

import httpx
import pytest
import uvicorn
from test_isolation import MARK, FaultyModel
from test_server import free_port

from caraserve.config import AdapterConfig, EngineConfig, LimitsConfig, ServerConfig
from caraserve.engine import Engine
from caraserve.model.tiny import tiny_paths
from caraserve.serve.api import build_app
from caraserve.serve.async_engine import AsyncEngine
from caraserve.serve.http import Guard
from caraserve.serve.protocol import FAULT_HEADER

KEY, ADMIN = "user-key", "admin-key"


def serve(app, port: int):
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    return server, thread


@contextlib.contextmanager
def in_process_server(engine: Engine, cfg: ServerConfig, roots=()):
    """The engine behind an in-process server on a loopback port: yields (its URL, its AsyncEngine)."""
    service = AsyncEngine(engine, max_queue=16)
    app = build_app(service, cfg, "tiny", list(roots))
    service.start()
    port = free_port()
    server, thread = serve(app, port)
    try:
        yield f"http://127.0.0.1:{port}", service
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        service.stop()


@contextlib.contextmanager
def live_server(root):
    """An in-process server (so a test can plant faults in its engine) on a loopback port:
    {"base": its URL, "engine", "service", "adapters": its adapter folder under `root`}."""
    adapters = root / "adapters"
    shutil.copytree(tiny_paths()[1], adapters)
    engine = Engine(EngineConfig(compile="false", max_batch_size=4, max_seq_len=256,
                                 adapters=AdapterConfig(dir=str(adapters)),
                                 limits=LimitsConfig(max_prompt_bytes=8000, max_chat_messages=8)))
    cfg = ServerConfig(api_key=KEY, admin_api_key=ADMIN, max_body_bytes=20000, unload_timeout_s=0.3)
    with in_process_server(engine, cfg, [adapters.resolve()]) as (base, service):
        yield {"base": base, "engine": engine, "service": service, "adapters": adapters}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with live_server(tmp_path_factory.mktemp("hardening")) as server:
        yield server


def post(live, path, body, key=KEY):
    """POSTs body as JSON; NaN and Infinity are sent as JSON's common extension writes them."""
    return httpx.post(live["base"] + path, content=json.dumps(body), timeout=60,
                      headers={"Authorization": f"Bearer {key}", "content-type": "application/json"})


def completion(live, model="tiny", prompt=(1, 5, 6, 7), **extra):
    prompt = prompt if isinstance(prompt, str) else list(prompt)
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True, **extra}
    return post(live, "/v1/completions", body)


def stream_events(live, body) -> tuple[int, list[dict]]:
    """(status, the data events before [DONE]) of a streamed completion."""
    events = []
    with httpx.stream("POST", live["base"] + "/v1/completions", json={**body, "stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, [r.json()]
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    return 200, events


@pytest.mark.parametrize("body,field", [
    ({"temperature": math.nan}, "temperature"), ({"temperature": 1e300}, "temperature"),
    ({"temperature": "0.5"}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": 2**70}, "top_k"), ({"top_k": True}, "top_k"), ({"seed": 2**64}, "seed"),
    ({"seed": -(2**70)}, "seed"), ({"max_tokens": True}, "max_tokens"), ({"max_tokens": 2**70}, "context length"),
    ({"n": True}, "n"), ({"stream": "yes"}, "stream"), ({"logprobs": 10**6}, "logprobs"),
    ({"stop_token_ids": list(range(300))}, "stop_token_ids"), ({"stop_token_ids": [10**12]}, "stop_token_ids"),
    ({"stop": ["s"] * 20}, "stop"), ({"prompt": [1, True, 3]}, "prompt"), ({"prompt": [1, 2**70]}, "token ids"),
    ({"prompt": [1.0, 2.0]}, "prompt"), ({"prompt": "x" * 9000}, "max_prompt_bytes"),
    ({"ignore_eos": "false"}, "ignore_eos"), ({"stop": ""}, "stop"), ({"stream_options": 5}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": "x"}}, "stream_options.include_usage"),
])
def test_bad_fields_get_400_naming_them(live, body, field):
    r = completion(live, **body)
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["message"]


def test_chat_limits(live):
    msgs = [{"role": "user", "content": "hi"}] * 9
    r = post(live, "/v1/chat/completions", {"model": "tiny", "messages": msgs, "max_tokens": 2})
    assert r.status_code == 400 and "at most 8 messages" in r.json()["error"]["message"]
    parts = [{"type": "text", "text": 5}]
    r = post(live, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": parts}]})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = post(live, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x" * 9000}]})
    assert r.status_code == 400 and "max_prompt_bytes" in r.json()["error"]["message"]
    for extra, field in [({"logprobs": 10**6}, "logprobs"), ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
                         ({"max_completion_tokens": 0}, "max_completion_tokens must be")]:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], **extra}
        r = post(live, "/v1/chat/completions", body)
        assert r.status_code == 400 and field in r.json()["error"]["message"]


def test_content_parts_other_than_text_get_400(live):
    for part, says in (({"type": "image_url", "image_url": {"url": "http://x"}}, "'image_url' are not supported"),
                       ({"type": "text"}, "needs its 'text'")):
        body = {"model": "tiny", "messages": [{"role": "user", "content": [part]}], "max_tokens": 2}
        r = post(live, "/v1/chat/completions", body)
        assert r.status_code == 400 and says in r.json()["error"]["message"], r.text
    # text parts are joined a line each, as vLLM joins them
    parts = [{"type": "text", "text": "import os"}, {"type": "text", "text": "import sys"}]
    joined = post(live, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": parts}],
                                                 "max_tokens": 4, "temperature": 0})
    whole = post(live, "/v1/chat/completions", {"model": "tiny", "max_tokens": 4, "temperature": 0,
                                                "messages": [{"role": "user", "content": "import os\nimport sys"}]})
    assert joined.status_code == 200 and joined.json()["choices"] == whole.json()["choices"]


def test_null_fields_take_their_defaults(live):
    plain = completion(live, temperature=0)
    nulls = completion(live, temperature=0, top_p=None, n=None, stream=None, stop=None, seed=None, logprobs=None)
    assert nulls.status_code == 200, nulls.text
    assert nulls.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]


def test_a_body_that_is_not_json_says_so(live):
    r = httpx.post(live["base"] + "/v1/completions", content='{"model": "tiny", "prompt": "x"}',
                   headers={"Authorization": f"Bearer {KEY}", "content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and "Content-Type: application/json" in r.json()["error"]["message"]
    r = httpx.post(live["base"] + "/v1/completions", content="", headers={"Authorization": f"Bearer {KEY}",
                                                                          "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("body:")


@pytest.mark.parametrize("body, said", [('{"model": "tiny", "prompt": "x",}', "not valid JSON: Expecting property"),
                                        (b'{"prompt": "\xff\xfe"}', "could not be read as JSON: it is not UTF-8"),
                                        ("[" * 5000 + "]" * 5000, "could not be read as JSON: it is nested too deeply"),
                                        ('{"max_tokens": 1' + "0" * 5000 + "}", "could not be read as JSON: Exceeds")])
def test_a_body_that_is_not_readable_json_says_why(live, body, said):
    r = httpx.post(live["base"] + "/v1/completions", content=body,
                   headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert r.status_code == 400 and said in r.json()["error"]["message"], r.text


def test_ignored_vllm_fields_are_still_type_checked(live):
    assert completion(live, temperature=0, length_penalty=1.5, spaces_between_special_tokens=False).status_code == 200
    r = completion(live, temperature=0, length_penalty="abc")
    assert r.status_code == 400 and "length_penalty" in r.json()["error"]["message"]


def test_one_model_card_and_every_refusal_counted(live):
    headers = {"Authorization": f"Bearer {KEY}"}
    card = httpx.get(live["base"] + "/v1/models/demo-r8", headers=headers).json()
    assert card["id"] == "demo-r8" and card["object"] == "model"
    r = httpx.get(live["base"] + "/v1/models/nope", headers=headers)
    assert r.status_code == 404 and "`nope` does not exist" in r.json()["error"]["message"]

    def rejected(reason):
        text = httpx.get(live["base"] + "/metrics", headers=headers).text
        line = f'caraserve_requests_total{{status="rejected_{reason}"}} '
        return next((float(x[len(line):]) for x in text.splitlines() if x.startswith(line)), 0.0)

    before = rejected("bad_request"), rejected("unknown_model")
    assert completion(live, max_tokens=0).status_code == 400  # the service's own check
    assert completion(live, max_tokens="x").status_code == 400  # the schema's
    assert completion(live, temperature=-1).status_code == 400  # the sampling parameters'
    assert completion(live, model="nope").status_code == 404
    assert (rejected("bad_request"), rejected("unknown_model")) == (before[0] + 3, before[1] + 1)


def test_a_callers_request_id_never_meets_an_n_request_of_another(live):
    """The n - 1 extra requests of an n > 1 call have ids no caller can send: a caller's "q-1"
    runs while "q" with n=2 does."""
    headers = {"Authorization": f"Bearer {KEY}", "X-Request-Id": "q"}
    body = {"model": "tiny", "prompt": "x", "max_tokens": 64, "n": 2, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", live["base"] + "/v1/completions", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # both choices admitted
        other = httpx.post(live["base"] + "/v1/completions", timeout=60, json={"model": "tiny", "prompt": "y",
                                                                              "max_tokens": 2},
                           headers={"Authorization": f"Bearer {KEY}", "X-Request-Id": "q-1"})
        assert other.status_code == 200 and other.json()["id"] == "q-1", other.text


def test_unencodable_text_gets_4xx(live):
    r = completion(live, model="\ud800")
    assert r.status_code == 404 and "\\ud800" in r.json()["error"]["message"]
    r = completion(live, prompt="a\ud800b")
    assert r.status_code == 400 and "not valid Unicode" in r.json()["error"]["message"]


def test_request_fault_fails_it_alone(live, monkeypatch):
    clean = [completion(live, model=m, prompt=(1, 40 + i, 50)).json()["choices"][0]["text"]
             for i, m in enumerate(["tiny", "demo-r8", "demo-r64"])]
    engine = live["engine"]
    long_prompt = [1] + list(range(200, 236))  # 37 tokens: only it reaches a context of 40
    monkeypatch.setattr(engine.runner, "model", FaultyModel(engine.runner.model, at_context=40))
    results: dict = {}

    def good(i, m):
        results[i] = completion(live, model=m, prompt=(1, 40 + i, 50))

    threads = [threading.Thread(target=good, args=(i, m)) for i, m in enumerate(["tiny", "demo-r8", "demo-r64"])]
    for t in threads:
        t.start()
    bad = completion(live, model="demo-r16", prompt=(1, MARK, 3))
    status, early = stream_events(live, {"model": "demo-r8", "prompt": [1, MARK], "max_tokens": 4})
    late_status, events = stream_events(live, {"model": "demo-r8", "prompt": long_prompt, "max_tokens": 8})
    for t in threads:
        t.join()
    assert bad.status_code == 500 and bad.headers[FAULT_HEADER] == "request"
    assert bad.json()["error"]["type"] == "request_failed" and "planted fault" in bad.json()["error"]["message"]
    # before its first token a stream gets the status; after it, an error event with the message
    assert status == 500 and early[0]["error"]["type"] == "request_failed"
    assert late_status == 200 and sum(bool(e.get("choices") and e["choices"][0]["text"]) for e in events) >= 1
    assert events[-2]["choices"][0]["finish_reason"] == "error"
    assert events[-1]["error"]["type"] == "request_failed" and "planted fault" in events[-1]["error"]["message"]
    assert [results[i].json()["choices"][0]["text"] for i in range(3)] == clean
    assert httpx.get(live["base"] + "/health").status_code == 200


def test_ping_answers_as_health_without_a_key_and_version_needs_one(live):
    """vLLM's /ping (GET and POST) is /health's probe, open like it; /version is the package's."""
    import caraserve

    assert httpx.get(live["base"] + "/ping").status_code == 200
    assert httpx.post(live["base"] + "/ping").json() == httpx.get(live["base"] + "/health").json()
    assert httpx.get(live["base"] + "/version").status_code == 401
    r = httpx.get(live["base"] + "/version", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.json() == {"version": caraserve.__version__}
    assert caraserve.__version__ not in ("", "0+unknown")  # the installed package's own


def test_adapter_management_needs_the_admin_key(live):
    body = {"lora_name": "again-r8", "lora_path": str(live["adapters"] / "demo-r8")}
    r = post(live, "/v1/load_lora_adapter", body, key=KEY)
    assert r.status_code == 401 and "admin API key" in r.json()["error"]["message"]
    r = post(live, "/v1/load_lora_adapter", body, key=ADMIN)
    assert r.status_code == 200, r.text
    assert post(live, "/v1/unload_lora_adapter", {"lora_name": "again-r8"}, key=KEY).status_code == 401
    r = post(live, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp/\x00bad"}, key=ADMIN)
    assert r.status_code == 400 and "lora_path" in r.json()["error"]["message"]
    assert post(live, "/v1/unload_lora_adapter", {"lora_name": "again-r8"}, key=ADMIN).status_code == 200


def test_unloading_an_adapter_in_use_is_a_conflict(live, monkeypatch):
    done = {}
    engine = live["engine"]
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (time.sleep(0.005), step())[1])  # 200 tokens outlast the 0.3 s

    def long_request():
        done["r"] = completion(live, model="demo-r32", max_tokens=200)

    t = threading.Thread(target=long_request)
    t.start()
    deadline = time.time() + 10
    while not any(r.adapter == "demo-r32" for r in list(live["engine"].scheduler.running)) and time.time() < deadline:
        time.sleep(0.01)  # (its own request: another test's may still be running)
    r = post(live, "/v1/unload_lora_adapter", {"lora_name": "demo-r32"}, key=ADMIN)
    t.join()
    assert r.status_code == 409 and "still in use" in r.json()["error"]["message"]
    assert done["r"].status_code == 200
    assert completion(live, model="demo-r32").status_code == 200  # still served


def test_chunked_body_over_the_limit_gets_413(live):
    def chunks():
        for _ in range(30):
            yield b"x" * 1000

    r = httpx.post(live["base"] + "/v1/completions", content=chunks(), timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert r.status_code == 413 and "20000 bytes" in r.json()["error"]["message"]

    def small():
        yield json.dumps({"model": "tiny", "prompt": [1, 2], "max_tokens": 2}).encode()

    r = httpx.post(live["base"] + "/v1/completions", content=small(), timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_runtime_lora_is_off_without_any_key():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def call(guard, path):
        transport = httpx.ASGITransport(app=guard)

        async def go():
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                return await c.post(path, json={})

        import asyncio

        return asyncio.run(go())

    off = Guard(app, "", 1 << 20)
    r = call(off, "/v1/load_lora_adapter")
    assert r.status_code == 403 and "allow_runtime_lora" in r.json()["error"]["message"]
    assert call(off, "/v1/unload_lora_adapter").status_code == 403
    assert call(off, "/v1/completions").status_code == 200
    assert call(Guard(app, "", 1 << 20, allow_admin=True), "/v1/load_lora_adapter").status_code == 200


def test_engine_fault_makes_the_server_unhealthy(live, monkeypatch):
    """Last in this module: the engine stops serving for good. The step's only request fails,
    and so does the one-token probe that tells the engine's faults from the request's."""
    engine = live["engine"]
    monkeypatch.setattr(engine.runner, "model", FaultyModel(engine.runner.model, always=True))
    r = completion(live, prompt=(1, 70))
    assert (r.status_code, r.json()["error"]["type"]) == (500, "internal_error")
    health = httpx.get(live["base"] + "/health")
    assert health.status_code == 503 and "planted fault" in health.json()["error"]["message"]
    assert httpx.get(live["base"] + "/ping").json() == health.json()
    r = completion(live)
    assert r.status_code == 503 and r.json()["error"]["type"] == "engine_unavailable"


def test_failed_warm_up_is_not_ready_and_refuses_requests(live, monkeypatch):
    """A warm-up that raises (a compile that cannot finish) leaves an engine that does not serve:
    wait_ready (a Ray replica's constructor) says so with the cause, and a request queued
    meanwhile is refused instead of waiting forever."""
    import asyncio

    from caraserve.request import SamplingParams
    from caraserve.serve.async_engine import EngineUnavailableError

    engine = Engine(EngineConfig(compile="false", max_batch_size=2, max_seq_len=64,
                                 adapters=AdapterConfig(dir=str(live["adapters"]))))
    started, release = threading.Event(), threading.Event()

    def warm_up():
        started.set()
        release.wait(10)
        raise RuntimeError("planted warm-up failure")

    monkeypatch.setattr(engine, "warm_up", warm_up)
    service = AsyncEngine(engine, max_queue=4)
    service.start()
    try:
        assert started.wait(10) and not service.wait_ready(0.05)

        async def scenario():
            queued = asyncio.ensure_future(
                service.submit([1, 5, 6], SamplingParams(max_tokens=2, temperature=0), None, "w"))
            await asyncio.sleep(0.1)
            release.set()
            with pytest.raises(EngineUnavailableError, match="planted warm-up failure"):
                await asyncio.wait_for(queued, 10)

        asyncio.run(scenario())
        assert not service.wait_ready(1) and "planted warm-up failure" in service.fault
    finally:
        release.set()
        service.stop()
