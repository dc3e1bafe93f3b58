"""What an answer carries beside its text when asked (vLLM's fields): return_token_ids (the
prompt's and the output's token ids, whole and streamed) and prompt_logprobs."""

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
    with_prompt = [k for k in streamed if "prompt_token_ids" in k]  # each choice's role chunk (as vLLM's)
    assert [(k["choices"][0]["index"], k["choices"][0]["delta"].get("role")) for k in with_prompt] == [
        (0, "assistant"), (1, "assistant")] and all(k["prompt_token_ids"] == prompt for k in with_prompt)
    for c in answer["choices"]:
        mine = [k["choices"][0] for k in streamed if k["choices"] and k["choices"][0]["index"] == c["index"]]
        assert [t for k in mine for t in k["token_ids"]] == c["token_ids"]
    assert streamed[-1]["choices"] == [] and "token_ids" not in json.dumps(streamed[-1])  # the usage chunk


def test_prompt_logprobs_score_the_prompt_as_echo_does(live):
    client, base, engine = live
    body = {"model": "demo-r32", "prompt": "The cat sat on the mat", "max_tokens": 2, "temperature": 0,
            "prompt_logprobs": 3}
    choice = client.post(base + "/v1/completions", json=body).json()["choices"][0]
    echoed = client.post(base + "/v1/completions", json={**body, "prompt_logprobs": None, "echo": True,
                                                          "logprobs": 3, "max_tokens": 0}).json()["choices"][0]
    ids = engine.encode(body["prompt"])
    scores = choice["prompt_logprobs"]
    assert len(scores) == len(ids) and scores[0] is None
    echo = echoed["logprobs"]  # (echo's scores are checked against transformers + peft elsewhere)
    for p in range(1, len(ids)):
        mine = scores[p][str(ids[p])]
        assert mine["logprob"] == pytest.approx(echo["token_logprobs"][p], abs=1e-5)
        assert mine["decoded_token"] == echo["tokens"][p]
        # both hold the 3 most likely tokens and the prompt's own (OpenAI's echo: up to logprobs + 1)
        assert {v["decoded_token"]: v["logprob"] for v in scores[p].values()} == \
            pytest.approx(echo["top_logprobs"][p], abs=1e-5)
        assert sorted(v["rank"] for k, v in scores[p].items() if k != str(ids[p]))[:3] in ([1, 2, 3], [1, 2], [1])
        assert (mine["rank"] == 1) == (max(echo["top_logprobs"][p].values()) <= echo["token_logprobs"][p] + 1e-6)
    messages = [{"role": "user", "content": "Hello there"}]
    chat = client.post(base + "/v1/chat/completions", json={"model": "demo-r32", "messages": messages,
                                                             "max_tokens": 2, "prompt_logprobs": 0}).json()
    prompt = client.post(base + "/tokenize", json={"model": "demo-r32", "messages": messages}).json()["tokens"]
    assert len(chat["prompt_logprobs"]) == len(prompt) and chat["prompt_logprobs"][0] is None
    assert all(list(e) == [str(t)] for e, t in zip(chat["prompt_logprobs"][1:], prompt[1:]))  # k 0: its own only


@pytest.mark.parametrize("extra, says", [
    ({"stream": True}, "stream"),
    ({"echo": True, "logprobs": 2}, "same number"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"prompt_logprobs": 21}, "max_logprobs"),
])
def test_prompt_logprobs_refusals(live, extra, says):
    client, base, _ = live
    body = {"model": "tiny", "prompt": "hi there", "max_tokens": 2, "prompt_logprobs": 3, **extra}
    r = client.post(base + "/v1/completions", json=body)
    assert r.status_code == 400 and says in r.json()["error"]["message"], r.text
