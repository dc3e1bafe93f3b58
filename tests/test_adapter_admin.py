"""Adapters loaded at run time, through the HTTP API: a load reads the weights (bad ones are
refused to that call, as vLLM's load does), and a full registry is the server's limit (503),
not the caller's fault (400)."""

from __future__ import annotations

import asyncio

import httpx
from test_isolation import nan_adapter

from caraserve.config import AdapterConfig, EngineConfig, ServerConfig
from caraserve.engine import Engine
from caraserve.model.tiny import write_random_adapter
from caraserve.serve.api import build_app
from caraserve.serve.async_engine import AsyncEngine


def _serve(engine: Engine, calls, roots=()):
    """Runs `calls(client)` against the API over `engine` (runtime loads on, from `roots`)."""
    service = AsyncEngine(engine, 8)
    app = build_app(service, ServerConfig(allow_runtime_lora=True), "tiny", list(roots))
    service.start()

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await calls(c)

    try:
        return asyncio.run(go())
    finally:
        service.stop()


def _completion(model: str) -> dict:
    return {"model": model, "prompt": [1, 5, 6], "max_tokens": 2, "temperature": 0}


def test_a_load_of_weights_that_cannot_be_served_is_refused_by_the_load(tmp_path):
    nan_adapter(tmp_path / "bad")
    write_random_adapter(tmp_path / "good", 8, 16, ["q_proj", "v_proj"], seed=5)
    engine = Engine(EngineConfig(compile="false", max_batch_size=4, max_seq_len=128, adapters=AdapterConfig(dir="")))

    async def calls(c):
        bad = await c.post("/v1/load_lora_adapter", json={"lora_name": "t1", "lora_path": str(tmp_path / "bad")})
        models = [m["id"] for m in (await c.get("/v1/models")).json()["data"]]
        after = await c.post("/v1/completions", json=_completion("t1"))
        good = await c.post("/v1/load_lora_adapter", json={"lora_name": "t1", "lora_path": str(tmp_path / "good")})
        served = await c.post("/v1/completions", json=_completion("t1"))
        return bad, models, after, good, served

    bad, models, after, good, served = _serve(engine, calls, [tmp_path])
    assert bad.status_code == 400 and "NaN" in bad.json()["error"]["message"]
    assert "t1" not in models and after.status_code == 404  # nothing of it stays registered
    assert good.status_code == 200 and served.status_code == 200  # and the name is free again
    assert engine.store.stats().cached == 1  # the good one's weights were read at its load


def test_a_full_registry_is_a_503_for_a_tenant_found_on_first_use(tmp_path):
    tenants = tmp_path / "tenants"
    for i in range(3):
        write_random_adapter(tenants / f"tenant-{i}", 8, 16, ["q_proj", "v_proj"], seed=i)
    nan_adapter(tenants / "tenant-nan")
    engine = Engine(EngineConfig(compile="false", max_batch_size=4, max_seq_len=128,
                                 adapters=AdapterConfig(dir="", resolve_dirs=(str(tenants),), max_registered=2)))

    async def calls(c):
        outs = [await c.post("/v1/completions", json=_completion(m)) for m in ("tenant-nan", "tenant-0", "tenant-1")]
        return outs, (await c.get("/metrics")).text

    (nan, first, full), metrics = _serve(engine, calls)
    assert nan.status_code == 400 and first.status_code == 200
    message = nan.json()["error"]["message"]
    assert message.startswith("adapter 'tenant-nan' cannot be used (") and "used: adapter" not in message
    assert full.status_code == 503 and full.headers["retry-after"] == "1"
    error = full.json()["error"]
    assert error["type"] == "adapter_capacity" and "adapters.max_registered" in error["message"]
    assert 'caraserve_requests_total{status="rejected_adapter_capacity"} 1.0' in metrics


def test_a_runtime_load_into_a_full_registry_is_a_503_to_retry(tmp_path):
    """The registry's cap is the operator's limit, cleared by an unload: a controller told 503
    with Retry-After retries, where a 400 would read as a bad adapter."""
    for i in range(2):
        write_random_adapter(tmp_path / f"a{i}", 8, 16, ["q_proj", "v_proj"], seed=i)
    engine = Engine(EngineConfig(compile="false", max_batch_size=4, max_seq_len=128,
                                 adapters=AdapterConfig(dir="", max_registered=1)))

    async def calls(c):
        first = await c.post("/v1/load_lora_adapter", json={"lora_name": "a0", "lora_path": str(tmp_path / "a0")})
        full = await c.post("/v1/load_lora_adapter", json={"lora_name": "a1", "lora_path": str(tmp_path / "a1")})
        await c.post("/v1/unload_lora_adapter", json={"lora_name": "a0"})
        again = await c.post("/v1/load_lora_adapter", json={"lora_name": "a1", "lora_path": str(tmp_path / "a1")})
        return first, full, again

    first, full, again = _serve(engine, calls, [tmp_path])
    assert first.status_code == 200 and again.status_code == 200
    assert full.status_code == 503 and full.headers["retry-after"] == "1"
    assert full.json()["error"]["type"] == "adapter_capacity" and "max_registered" in full.json()["error"]["message"]


def test_a_request_for_an_adapter_refused_at_start_says_why(tmp_path):
    import pytest

    from caraserve.request import RequestError

    write_random_adapter(tmp_path / "good", 8, 16, ["q_proj", "v_proj"], seed=1)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{not json")
    engine = Engine(EngineConfig(compile="false", max_batch_size=2, max_seq_len=64,
                                 adapters=AdapterConfig(dir=str(tmp_path))))
    with pytest.raises(RequestError, match=r"unknown adapter 'broken': its folder was refused at start \(.*json"):
        engine.add_request("x", None, "broken")


def test_an_unload_waits_for_a_request_caught_between_waiting_and_running():
    """The engine thread paused in the middle of admitting a request for the adapter (out of the
    waiting queue, not yet in the running one) as the unload asks whether the adapter is in use:
    the unload still waits for that request and then removes the adapter; it used to see the
    adapter unused, and the removal was refused (a 409)."""
    import inspect
    import sys
    import threading

    from caraserve import scheduler as scheduler_module
    from caraserve.request import SamplingParams

    source = inspect.getsource(scheduler_module).splitlines()
    (line,) = [i + 1 for i, text in enumerate(source) if "self.running.append(req)" in text
               and "self.waiting.remove(req)" in source[i - 1]]  # (1-based, as f_lineno)
    armed, paused, go = threading.Event(), threading.Event(), threading.Event()

    def trace(frame, event, arg):
        if frame.f_code.co_filename != scheduler_module.__file__:
            return None

        def local(frame, event, arg):
            if event == "line" and frame.f_lineno == line and armed.is_set():
                armed.clear()
                paused.set()
                go.wait(30)
            return local
        return local

    ae = AsyncEngine(Engine(EngineConfig(compile="false", max_batch_size=4, max_seq_len=128)), max_queue=8)
    threading.settrace(trace)  # the engine thread starts below: it is traced
    try:
        ae.start()
    finally:
        threading.settrace(None)
    assert ae.wait_ready(60)

    async def main():
        warm = await ae.submit([4, 5], SamplingParams(max_tokens=1), "demo-r8", "warm")  # the adapter resident
        while not (await asyncio.wait_for(warm.get(), 30)).finished:
            pass
        armed.set()
        queue = await ae.submit([1, 2, 3], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True),
                                "demo-r8", "r")
        assert await asyncio.to_thread(paused.wait, 30)
        unload = asyncio.ensure_future(ae.retire_adapter("demo-r8", 30))
        await asyncio.sleep(0.1)
        go.set()
        await unload
        out = await asyncio.wait_for(queue.get(), 30)
        while not out.finished:
            out = await asyncio.wait_for(queue.get(), 30)
        return out

    try:
        out = asyncio.run(main())
    finally:
        go.set()
        ae.stop()
    assert out.error is None and len(out.output_ids) == 30
    assert "demo-r8" not in ae.engine.store
    assert sys.gettrace() is None
