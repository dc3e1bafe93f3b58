"""The real server on a loopback port, driven with the official openai client and raw HTTP."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from caraserve.model.tiny import tiny_paths, write_random_adapter

KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    _, demo = tiny_paths()
    adapters = root / "adapters"
    adapters.mkdir()
    for d in demo.iterdir():
        shutil.copytree(d, adapters / d.name)
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", CARASERVE_API_KEY=KEY)
    cmd = [sys.executable, "-m", "caraserve.serve", f"server.port={port}", f"adapters.dir={adapters}",
           "server.served_model_name=tiny", "server.max_queue=2", "server.max_body_bytes=20000",
           "engine.max_batch_size=4", "engine.max_seq_len=512", "engine.compile=false",
           "server.drain_timeout_s=60", "server.log_level=warning"]
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited: {(root / 'server.log').read_text()[-3000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("server did not start")
    yield {"base": base, "proc": proc, "root": root, "adapters": adapters}
    if proc.poll() is None:
        proc.kill()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0)


def auth():
    return {"Authorization": f"Bearer {KEY}"}


@pytest.mark.parametrize("model", ["tiny", "demo-r8", "demo-r64"])
def test_completions_plain_and_streaming(client, model):
    r = client.completions.create(model=model, prompt="def main():", max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8
    assert r.usage.prompt_tokens > 0 and r.choices[0].text
    chunks = list(client.completions.create(model=model, prompt="def main():", max_tokens=8, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    # a stop string a few characters in: the chunks add up to the text before it, and none sends any of it
    stop = r.choices[0].text[3:6]
    kw = dict(model=model, prompt="def main():", max_tokens=8, temperature=0, stop=[stop])
    cut = client.completions.create(**kw).choices[0]
    chunks = list(client.completions.create(**kw, stream=True))
    assert cut.finish_reason == "stop" and cut.text == r.choices[0].text[: r.choices[0].text.index(stop)]
    assert "".join(c.choices[0].text for c in chunks) == cut.text


def test_sampling_options_and_cached_tokens(client):
    """OpenAI's penalties and logit_bias, vLLM's repetition_penalty and min_tokens; the usage says
    how much of the prompt came from the prefix cache."""
    prompt = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
    biased = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, presence_penalty=1.0,
                                       frequency_penalty=0.5, logit_bias={"25": 100},
                                       extra_body={"repetition_penalty": 1.2, "min_tokens": 8})
    assert biased.choices[0].text != plain.choices[0].text and biased.usage.completion_tokens == 8
    assert biased.usage.prompt_tokens_details.cached_tokens > 0  # the plain request's prompt blocks


def test_adapters_change_output_and_token_prompts(client):
    texts = {m: client.completions.create(model=m, prompt=[1, 445, 596], max_tokens=6, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].text
             for m in ("tiny", "demo-r16", "demo-r32")}
    assert len(set(texts.values())) == 3


def test_chat_plain_and_streaming(client):
    msgs = [{"role": "user", "content": "hello"}]
    r = client.chat.completions.create(model="demo-r32", messages=msgs, max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens == 6
    stream = client.chat.completions.create(model="demo-r32", messages=msgs, max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 6


def test_models_lists_base_and_adapters(client):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"tiny", "demo-r8", "demo-r16", "demo-r32", "demo-r64"}
    assert cards["demo-r64"].model_extra["rank"] == 64
    assert isinstance(cards["demo-r8"].model_extra["resident"], bool)


def test_models_paging_over_sorted_names(server):
    def page(**params):
        r = httpx.get(server["base"] + "/v1/models", params=params, headers=auth())
        assert r.status_code == 200, r.text
        return [c["id"] for c in r.json()["data"]], r.json()["has_more"]

    assert page() == (["tiny", "demo-r16", "demo-r32", "demo-r64", "demo-r8"], False)
    assert page(limit=2) == (["tiny", "demo-r16"], True)
    assert page(limit=2, after="demo-r16") == (["demo-r32", "demo-r64"], True)
    assert page(limit=2, after="demo-r64") == (["demo-r8"], False)
    assert page(after="demo-r20") == (["demo-r32", "demo-r64", "demo-r8"], False)  # a cursor gone since
    assert page(after="tiny", limit=1) == (["demo-r16"], True)
    assert httpx.get(server["base"] + "/v1/models", params={"limit": 0}, headers=auth()).status_code == 400


def test_dynamic_load_use_unload(server, client):
    extra = server["adapters"] / "late-r12"
    write_random_adapter(extra, 12, 24, ["q_proj", "down_proj"], seed=7)
    r = httpx.post(server["base"] + "/v1/load_lora_adapter", headers=auth(),
                   json={"lora_name": "late", "lora_path": str(extra)})
    assert r.status_code == 200, r.text
    out = client.completions.create(model="late", prompt="x = 1", max_tokens=4, temperature=0)
    assert out.usage.completion_tokens >= 1
    assert "late" in {m.id for m in client.models.list().data}
    r = httpx.post(server["base"] + "/v1/unload_lora_adapter", headers=auth(), json={"lora_name": "late"})
    assert r.status_code == 200, r.text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="late", prompt="x", max_tokens=2)


def test_load_refuses_paths_outside_roots_and_bad_adapters(server, tmp_path):
    outside = tmp_path / "evil"
    write_random_adapter(outside, 8, 8, ["q_proj"], seed=1)
    r = httpx.post(server["base"] + "/v1/load_lora_adapter", headers=auth(),
                   json={"lora_name": "evil", "lora_path": str(outside)})
    assert r.status_code == 400 and "outside the allowed adapter roots" in r.json()["error"]["message"]
    sneaky = str(server["adapters"] / ".." / "evil")
    r = httpx.post(server["base"] + "/v1/load_lora_adapter", headers=auth(),
                   json={"lora_name": "evil", "lora_path": sneaky})
    assert r.status_code == 400
    broken = server["adapters"] / "broken"
    write_random_adapter(broken, 8, 8, ["q_proj"], seed=1)
    (broken / "adapter_config.json").write_text("{nope")
    r = httpx.post(server["base"] + "/v1/load_lora_adapter", headers=auth(),
                   json={"lora_name": "broken", "lora_path": str(broken)})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_api_key_enforced(server):
    assert httpx.get(server["base"] + "/health").status_code == 200
    r = httpx.get(server["base"] + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == 401
    assert httpx.get(server["base"] + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(server["base"] + "/metrics").status_code == 401


@pytest.mark.parametrize("body,status,needle", [
    ({"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "n": 17}, 400, "limits.max_n"),
    ({"model": "tiny", "prompt": "x", "n": 0, "stream": True}, 400, "limits.max_n"),
    ({"model": "tiny"}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 600}, 400, "context length"),
    ({"model": "tiny", "prompt": [10**7]}, 400, "token ids"),
    ({"model": "nope", "prompt": "x"}, 404, "does not exist"),
    ({"model": "tiny", "prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    ({"model": "tiny", "prompt": "x", "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens"),
])
def test_bad_requests_get_openai_errors(server, client, body, status, needle):
    r = httpx.post(server["base"] + "/v1/completions", headers=auth(), json=body)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["code"] == status and needle in err["message"] and "Traceback" not in r.text
    assert client.completions.create(model="tiny", prompt="ok", max_tokens=2).usage.completion_tokens >= 1


def test_validation_errors_carry_openais_param_and_plain_messages(server):
    """A field's check names it in `param` and the message; a check over several fields says its
    own words, without pydantic's "body: Value error," before them."""
    def error(**fields):
        body = {"model": "tiny", "prompt": "x", **fields}
        r = httpx.post(server["base"] + "/v1/completions", headers=auth(), json=body)
        assert r.status_code == 400
        return r.json()["error"]

    assert error(temperature="hot") == {"message": "temperature: Input should be a valid number",
                                        "param": "temperature", "type": "invalid_request_error", "code": 400}
    err = error(best_of=2)
    assert err["param"] is None and err["message"].startswith("best_of=2 is not supported")


def test_state_for_routers_and_request_ids(server, client):
    r = httpx.post(server["base"] + "/v1/completions", headers={**auth(), "X-Request-Id": "rt-test-1"},
                   json={"model": "demo-r16", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["id"] == "rt-test-1"
    bad = httpx.post(server["base"] + "/v1/completions", headers={**auth(), "X-Request-Id": "no spaces/please"},
                     json={"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert bad.status_code == 400 and "X-Request-Id" in bad.json()["error"]["message"]
    state = httpx.get(server["base"] + "/v1/state", headers=auth()).json()
    assert state["model"] == "tiny" and state["max_batch_size"] == 4
    assert state["adapters"]["demo-r16"] == 16 and "demo-r16" in state["resident_adapters"]
    assert state["running"] == [] and state["queued"] == [] and state["perf_model"] is None
    assert httpx.get(server["base"] + "/v1/state").status_code == 401


def test_body_too_large_and_bad_json(server):
    r = httpx.post(server["base"] + "/v1/completions", headers=auth(),
                   json={"model": "tiny", "prompt": "x" * 30000})
    assert r.status_code == 413 and r.json()["error"]["code"] == 413
    r = httpx.post(server["base"] + "/v1/completions", headers={**auth(), "content-type": "application/json"},
                   content=b"{not json")
    assert r.status_code == 400


def metric(server, name: str) -> float:
    text = httpx.get(server["base"] + "/metrics", headers=auth()).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_queue_full_gets_503_and_server_recovers(server, client):
    results = []

    def call():
        r = httpx.post(server["base"] + "/v1/completions", headers=auth(), timeout=120,
                       json={"model": "demo-r8", "prompt": "x", "max_tokens": 200, "ignore_eos": True})
        results.append((r.status_code, r.headers.get("retry-after")))

    threads = [threading.Thread(target=call) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (503, "1") in results and (200, None) in results and set(results) <= {(200, None), (503, "1")}
    assert client.completions.create(model="tiny", prompt="ok", max_tokens=2).usage.completion_tokens >= 1
    # a call is admitted or refused whole: n choices of two prompts are 32 requests, far past
    # server.max_queue=2 and the batch of 4, and the idle server takes them all
    many = client.completions.create(model="tiny", prompt=["a", "b"], n=16, max_tokens=12,
                                     extra_body={"ignore_eos": True})
    assert len(many.choices) == 32 and sorted(c.index for c in many.choices) == list(range(32))


def test_disconnect_mid_stream_aborts(server):
    before = metric(server, 'caraserve_requests_total{status="abort"}')
    with httpx.stream("POST", server["base"] + "/v1/completions", headers=auth(), timeout=60,
                      json={"model": "demo-r16", "prompt": "x", "max_tokens": 400, "ignore_eos": True,
                            "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 4:
                break
    deadline = time.time() + 30
    while time.time() < deadline and metric(server, 'caraserve_requests_total{status="abort"}') <= before:
        time.sleep(0.2)
    assert metric(server, 'caraserve_requests_total{status="abort"}') == before + 1
    assert metric(server, "caraserve_running_batch_size") == 0


def test_metrics_exposed(server, client):
    client.completions.create(model="demo-r64", prompt="x", max_tokens=3)
    text = httpx.get(server["base"] + "/metrics", headers=auth()).text
    for name in ("caraserve_ttft_seconds_bucket", "caraserve_tpot_seconds", "caraserve_queue_length",
                 "caraserve_adapter_slots_used", "caraserve_adapter_loads_total", "caraserve_generated_tokens_total",
                 'caraserve_requests_total{status="length"}', "caraserve_kv_blocks_total", "caraserve_kv_blocks_used",
                 "caraserve_preemptions_total", "caraserve_prompt_tokens_total",
                 'caraserve_e2e_request_latency_seconds_bucket{le="0.005",status="length"}'):
        assert name in text, name


def test_gateway_metrics_in_vllms_names(server, client):
    """The names and labels the Gateway API Inference Extension's vLLM scrapers read."""
    text = httpx.get(server["base"] + "/metrics", headers=auth()).text
    assert 'vllm:num_requests_running{model_name="tiny"} 0.0' in text
    assert 'vllm:num_requests_waiting{model_name="tiny"} 0.0' in text
    assert 'vllm:kv_cache_usage_perc{model_name="tiny"} 0.0' in text
    assert 'vllm:num_preemptions_total{model_name="tiny"} 0.0' in text
    info = [ln for ln in text.splitlines() if ln.startswith("vllm:lora_requests_info{")]
    assert len(info) == 1 and 'running_lora_adapters=""' in info[0] and 'waiting_lora_adapters=""' in info[0]
    assert 'max_lora="' in info[0] and float(info[0].rsplit(" ", 1)[1]) > 1.7e9  # the time of the scrape


def test_sigterm_drains_running_requests(server):
    """Runs last in this module: it stops the server."""
    proc, done = server["proc"], {}

    def call():
        r = httpx.post(server["base"] + "/v1/completions", headers=auth(), timeout=120,
                       json={"model": "tiny", "prompt": "x", "max_tokens": 60, "ignore_eos": True})
        done["status"], done["body"] = r.status_code, r.json()

    t = threading.Thread(target=call)
    t.start()
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    t.join(timeout=120)
    assert done.get("status") == 200 and done["body"]["usage"]["completion_tokens"] == 60
    assert proc.wait(timeout=60) == 0
    log = Path(server["root"] / "server.log").read_text()
    assert "Traceback" not in log, log[-3000:]
    # the server's own lines carry their time, level and logger
    line = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO caraserve\.serve: serving tiny"
    assert re.search(line, log, re.M), log[:2000]
    assert json.dumps(done["body"])  # a complete JSON body came back
