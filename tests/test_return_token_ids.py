"""vLLM's return_token_ids: the answer's prompt and output token ids, whole and streamed."""

from __future__ import annotations

import json

import httpx
import pytest
from test_server_hardening import in_process_server

from caraserve.config import AdapterConfig, EngineConfig, ServerConfig
from caraserve.engine import Engine


@pytest.fixture(scope="module")
def live():
    engine = Engine(EngineConfig(compile="false", max_batch_size=8, max_seq_len=256,
                                 adapters=AdapterConfig(dir="demo")))
    with httpx.Client(timeout=60) as client, in_process_server(engine, ServerConfig()) as (base, _):
        yield client, base, engine


def chunks(client, url, body) -> list[dict]:
    with client.stream("POST", url, json={**body, "stream": True}) as s:
        return [json.loads(ln[6:]) for ln in s.iter_lines() if ln.startswith("data: {")]


def test_completions_carry_each_prompts_ids_and_each_choices_output_ids(live):
    client, base, engine = live
    body = {"model": "demo-r8", "prompt": ["Once upon", "The cat sat on"], "n": 2, "max_tokens": 7,
            "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    answer = client.post(base + "/v1/completions", json=body).json()
    prompts = [engine.encode(p) for p in body["prompt"]]
    assert [c["prompt_token_ids"] for c in answer["choices"]] == [prompts[0]] * 2 + [prompts[1]] * 2
    for c in answer["choices"]:
        assert len(c["token_ids"]) == 7 and engine.tokenizer.decode(c["token_ids"]) == c["text"]
    assert answer["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in answer["choices"])
    streamed = chunks(client, base + "/v1/completions", body)
    for c in answer["choices"]:
        mine = [k["choices"][0] for k in streamed if k["choices"] and k["choices"][0]["index"] == c["index"]]
        assert [k["prompt_token_ids"] for k in mine if "prompt_token_ids" in k] == [c["prompt_token_ids"]]
        assert "prompt_token_ids" in mine[0]  # with the choice's first chunk
        assert [t for k in mine for t in k["token_ids"]] == c["token_ids"]
    plain = client.post(base + "/v1/completions", json={**body, "return_token_ids": False}).json()
    assert not {"token_ids", "prompt_token_ids"} & set(plain["choices"][0])


def test_chat_carries_the_prompts_ids_once_and_each_choices_output_ids(live):
    client, base, engine = live
    messages = [{"role": "user", "content": "Hello there"}]
    body = {"model": "demo-r16", "messages": messages, "n": 2, "max_tokens": 6, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    answer = client.post(base + "/v1/chat/completions", json=body).json()
    prompt = client.post(base + "/tokenize", json={"model": "demo-r16", "messages": messages}).json()["tokens"]
    assert answer["prompt_token_ids"] == prompt
    for c in answer["choices"]:
        assert len(c["token_ids"]) == 6 and engine.tokenizer.decode(c["token_ids"]) == c["message"]["content"]
    streamed = chunks(client, base + "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    assert [k["prompt_token_ids"] for k in streamed if "prompt_token_ids" in k] == [prompt]
    assert "prompt_token_ids" in streamed[0]
    for c in answer["choices"]:
        mine = [k["choices"][0] for k in streamed if k["choices"] and k["choices"][0]["index"] == c["index"]]
        assert [t for k in mine for t in k["token_ids"]] == c["token_ids"]
    assert streamed[-1]["choices"] == [] and "token_ids" not in json.dumps(streamed[-1])  # the usage chunk
