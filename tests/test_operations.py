"""What an operator reads (on an in-process server): TTFT counted from the call's arrival (the
wait for the engine thread included) and observed with the first token, prompt tokens and
end-to-end latency in /metrics, a hung engine thread failing /health, and /v1/state answering
503 rather than hanging or a 500."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import pytest
from test_server_hardening import in_process_server

from caraserve.config import AdapterConfig, EngineConfig, ServerConfig
from caraserve.engine import Engine
from caraserve.serve import async_engine as async_engine_module


@pytest.fixture(scope="module")
def live():
    engine = Engine(EngineConfig(compile="false", max_batch_size=4, max_seq_len=256,
                                 adapters=AdapterConfig(dir="demo")))
    engine.generate("warm up", None)  # the first step's one-time costs stay out of the timings below
    with in_process_server(engine, ServerConfig()) as (base, service):
        yield {"base": base, "service": service, "engine": engine}


def metric(live, name: str) -> float:
    """The sample `name` (with its labels, as exposed) of /metrics, 0 when absent."""
    text = httpx.get(live["base"] + "/metrics").text
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def block_engine_thread(live) -> threading.Event:
    """Holds the engine thread inside one call until the returned event is set."""
    release, inside = threading.Event(), threading.Event()
    live["service"]._call(lambda: (inside.set(), release.wait(30)))
    assert inside.wait(10)
    return release


def test_ttft_counts_the_wait_for_the_engine_thread(live):
    count, total = (metric(live, f'caraserve_ttft_seconds_{k}{{adapter="warm"}}') for k in ("count", "sum"))
    release = block_engine_thread(live)
    threading.Timer(1.0, release.set).start()  # a step (or a compile) 1 s long
    r = httpx.post(live["base"] + "/v1/completions", timeout=60,
                   json={"model": "tiny", "prompt": "x", "max_tokens": 2, "ignore_eos": True, "n": 3, "seed": 1})
    assert r.status_code == 200
    assert metric(live, 'caraserve_ttft_seconds_count{adapter="warm"}') == count + 3
    # every choice counts from the call's arrival, the later ones' wait for the first's hand-over too
    assert metric(live, 'caraserve_ttft_seconds_sum{adapter="warm"}') - total >= 3 * 0.9


def test_ttft_is_observed_with_the_first_streamed_token_before_the_end(live):
    name = 'caraserve_ttft_seconds_count{adapter="warm"}'
    before = metric(live, name)
    body = {"model": "tiny", "prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", live["base"] + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        first = next(ln for ln in lines if ln.startswith("data: {"))
        assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
        assert metric(live, name) == before + 1  # while the stream goes on
        assert "data: [DONE]" in list(lines)


def test_prompt_tokens_and_end_to_end_latency_by_status(live):
    prompt_before = metric(live, "caraserve_prompt_tokens_total")
    e2e_before = metric(live, 'caraserve_e2e_request_latency_seconds_count{status="length"}')
    r = httpx.post(live["base"] + "/v1/completions", timeout=60,
                   json={"model": "tiny", "prompt": ["import os", "def f(x):"], "max_tokens": 3, "n": 2,
                         "ignore_eos": True, "seed": 1}).json()
    # each of the n choices is an engine request of its own, with its prompt (as the requests count)
    assert metric(live, "caraserve_prompt_tokens_total") - prompt_before == 2 * r["usage"]["prompt_tokens"]
    assert metric(live, 'caraserve_e2e_request_latency_seconds_count{status="length"}') - e2e_before == 4


def test_a_hung_engine_thread_fails_health_and_state_says_so(live, monkeypatch):
    service = live["service"]
    monkeypatch.setattr(service, "stall_timeout_s", 0.3)
    monkeypatch.setattr(async_engine_module, "STATE_WAIT_S", 0.3)
    release = block_engine_thread(live)
    try:
        assert httpx.get(live["base"] + "/health").status_code == 200  # nothing waits on it
        waiting = threading.Thread(target=httpx.post, args=(live["base"] + "/v1/completions",),
                                   kwargs={"json": {"model": "tiny", "prompt": "x", "max_tokens": 2}, "timeout": 60})
        waiting.start()
        time.sleep(0.6)
        health = httpx.get(live["base"] + "/health")
        assert health.status_code == 503 and "in one step" in health.json()["error"]["message"], health.text
        state = httpx.get(live["base"] + "/v1/state", timeout=10)
        assert state.status_code == 503 and "took no state call" in state.json()["error"]["message"], state.text
    finally:
        release.set()
    waiting.join(30)
    assert httpx.get(live["base"] + "/health").status_code == 200
    assert httpx.get(live["base"] + "/v1/state").status_code == 200


def test_vllms_request_series_for_dashboards_made_for_vllm(live):
    names = {"prompt": 'vllm:prompt_tokens_total{model_name="tiny"}',
             "generated": 'vllm:generation_tokens_total{model_name="tiny"}',
             "ttft": 'vllm:time_to_first_token_seconds_count{model_name="tiny"}',
             "e2e": 'vllm:e2e_request_latency_seconds_count{model_name="tiny"}',
             "length": 'vllm:request_success_total{finished_reason="length",model_name="tiny"}'}
    before = {k: metric(live, name) for k, name in names.items()}
    r = httpx.post(live["base"] + "/v1/completions", timeout=60,
                   json={"model": "demo-r16", "prompt": "def f(x):", "max_tokens": 3, "n": 2, "seed": 1,
                         "ignore_eos": True}).json()
    delta = {k: metric(live, name) - before[k] for k, name in names.items()}
    assert delta == {"prompt": 2 * r["usage"]["prompt_tokens"], "generated": r["usage"]["completion_tokens"],
                     "ttft": 2, "e2e": 2, "length": 2}


def test_requests_waiting_for_an_adapter_are_counted():
    from caraserve.request import SamplingParams
    from caraserve.serve.metrics import waiting_for_adapter

    engine = Engine(EngineConfig(compile="false", max_batch_size=4, max_seq_len=128,
                                 adapters=AdapterConfig(dir="demo")))
    params = SamplingParams(max_tokens=2, temperature=0)
    for adapter in ("demo-r8", "demo-r16", None):
        engine.add_request("x", params, adapter)
    assert waiting_for_adapter(engine) == 2  # the base request needs no adapter
    while engine.has_unfinished():
        engine.step()
    engine.add_request("x", params, "demo-r8")  # its adapter resident now
    assert waiting_for_adapter(engine) == 0


def test_state_of_a_failed_engine_is_a_503(live, monkeypatch):
    """Last in this module: the engine stops serving for good."""
    service = live["service"]
    monkeypatch.setattr(service.engine, "step", lambda: (_ for _ in ()).throw(RuntimeError("planted engine fault")))
    r = httpx.post(live["base"] + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2},
                   timeout=60)
    assert r.status_code == 500
    state = httpx.get(live["base"] + "/v1/state", timeout=10)
    assert state.status_code == 503 and "planted engine fault" in state.json()["error"]["message"], state.text


def test_a_log_line_for_each_request_when_asked(caplog):
    engine = Engine(EngineConfig(compile="false", max_batch_size=4, max_seq_len=128,
                                 adapters=AdapterConfig(dir="demo")))
    with in_process_server(engine, ServerConfig(log_requests=True)) as (base, _), caplog.at_level("INFO"):
        r = httpx.post(base + "/v1/completions", timeout=60, headers={"x-request-id": "logged-1"},
                       json={"model": "demo-r16", "prompt": "x", "max_tokens": 3, "ignore_eos": True})
        assert r.status_code == 200
        deadline = time.time() + 5
        while "logged-1" not in caplog.text and time.time() < deadline:
            time.sleep(0.05)
    line = next(rec.getMessage() for rec in caplog.records if "logged-1" in rec.getMessage())
    assert "length, adapter demo-r16" in line and "3 generated tokens" in line and "TTFT" in line
