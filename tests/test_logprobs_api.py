"""Logprobs through the HTTP API, as OpenAI's clients read them: completions (tokens,
token_logprobs, top_logprobs, text_offset) and chat (content entries with their alternatives),
non-streamed and streamed alike, against the model's own log-softmax."""

from __future__ import annotations

import json

import httpx
import pytest
from test_server_hardening import KEY, completion, live_server, post


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with live_server(tmp_path_factory.mktemp("logprobs")) as server:
        yield server


def events(live, path: str, body: dict) -> list[dict]:
    """The data events of a streamed answer, before [DONE]."""
    out = []
    with httpx.stream("POST", live["base"] + path, json={**body, "stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[6:]))
    return out


def test_completion_logprobs_streamed_and_not(live):
    body = {"model": "demo-r8", "prompt": "def main():", "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "logprobs": 3}
    r = post(live, "/v1/completions", body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    n = len(lp["tokens"])
    assert n == 6 == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [sum(map(len, lp["tokens"][:i])) for i in range(n)]
    for token, chosen, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert 1 <= len(top) <= 4 and chosen <= 0.0  # the 3 best, and the chosen token if not among them
        best = max(top.values())
        assert top.get(token) == pytest.approx(chosen, abs=1e-6) and chosen == pytest.approx(best, abs=1e-6)
        assert sorted(top.values(), reverse=True) == list(top.values())  # best first
    chunks = events(live, "/v1/completions", body)
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
    assert [t for s in streamed for t in s["tokens"]] == lp["tokens"]
    assert [v for s in streamed for v in s["token_logprobs"]] == lp["token_logprobs"]
    assert [v for s in streamed for v in s["top_logprobs"]] == lp["top_logprobs"]
    assert [v for s in streamed for v in s["text_offset"]] == lp["text_offset"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_logprob_tokens_add_up_to_the_text_over_broken_characters(live, path):
    """Outputs of lone UTF-8 bytes (the tiny tokenizer's "ä" = 0xE4 starts a 3-byte character,
    "¸" = 0xB8 continues one, "æ" and "¨" too): the chosen tokens' texts are the engine's, so they
    add up to the text however the bytes fall (broken characters read U+FFFD, one cut off at the
    end is left out), streamed or not."""
    broken = 0
    for seed in range(8):
        body = {"model": "demo-r16", "max_tokens": 5, "temperature": 1.0, "seed": seed, "ignore_eos": True,
                "logit_bias": {"164": 40, "120": 40, "166": 40, "105": 40}}
        if path == "/v1/completions":
            body |= {"prompt": "x", "logprobs": 2}
        else:
            body |= {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 2}
        r = post(live, path, body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        chunks = [c["choices"][0] for c in events(live, path, body) if c["choices"]]
        if path == "/v1/completions":
            text, tokens = choice["text"], choice["logprobs"]["tokens"]
            assert choice["logprobs"]["text_offset"] == [sum(map(len, tokens[:i])) for i in range(len(tokens))]
            streamed = [t for c in chunks if c["logprobs"] for t in c["logprobs"]["tokens"]]
            streamed_text = "".join(c["text"] for c in chunks)
        else:
            text = choice["message"]["content"]
            tokens = [e["token"] for e in choice["logprobs"]["content"]]
            joined = b"".join(bytes(e["bytes"]) for e in choice["logprobs"]["content"])
            assert joined.decode("utf-8") == text
            streamed = [e["token"] for c in chunks if c.get("logprobs") for e in c["logprobs"]["content"]]
            streamed_text = "".join(c["delta"].get("content", "") for c in chunks)
        assert len(tokens) == 5 and not text.endswith("\ufffd")
        broken += "\ufffd" in text
        assert "".join(tokens) == text == streamed_text and streamed == tokens, (seed, text, tokens)
    assert broken  # some outputs hold broken characters


def test_completion_logprobs_zero_gives_the_chosen_tokens_only(live):
    r = completion(live, logprobs=0)
    lp = r.json()["choices"][0]["logprobs"]  # as OpenAI's: the chosen token is always among the alternatives
    assert len(lp["token_logprobs"]) == 8
    assert lp["top_logprobs"] == [{t: v} for t, v in zip(lp["tokens"], lp["token_logprobs"])]
    assert completion(live).json()["choices"][0]["logprobs"] is None


def test_chat_logprobs_streamed_and_not(live):
    body = {"model": "demo-r16", "messages": [{"role": "user", "content": "import os"}], "max_tokens": 5,
            "temperature": 0, "ignore_eos": True, "logprobs": True, "top_logprobs": 2}
    r = post(live, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == 5 and "".join(e["token"] for e in content) == choice["message"]["content"]
    for e in content:
        assert e["bytes"] == list(e["token"].encode()) and len(e["top_logprobs"]) == 2
        assert e["top_logprobs"][0]["logprob"] == pytest.approx(e["logprob"], abs=1e-6)  # greedy: the best
        assert e["top_logprobs"][0]["logprob"] >= e["top_logprobs"][1]["logprob"]
    chunks = events(live, "/v1/chat/completions", body)
    streamed = [e for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
                for e in c["choices"][0]["logprobs"]["content"]]
    assert streamed == content
    plain = post(live, "/v1/chat/completions", {**body, "logprobs": False, "top_logprobs": None})
    assert plain.json()["choices"][0]["logprobs"] is None


def test_logprobs_of_the_model_not_of_the_sampling(live):
    """Sampled at a temperature with a logit bias: the logprobs reported are still the model's
    own, so the same token at the same position has the same logprob as under greedy decoding."""
    greedy = completion(live, model="demo-r8", logprobs=1).json()["choices"][0]["logprobs"]
    biased = completion(live, model="demo-r8", logprobs=1, temperature=0.8, seed=3,
                        logit_bias={"11": 100}).json()["choices"][0]["logprobs"]
    best = next(iter(greedy["top_logprobs"][0].items()))  # position 0: the same context in both
    assert next(iter(biased["top_logprobs"][0].items())) == best
    forced = live["engine"].tokenizer.decode([11])  # token 11, forced by the bias
    assert biased["tokens"][0] == forced and biased["top_logprobs"][0][forced] == biased["token_logprobs"][0]
    assert biased["token_logprobs"][0] <= best[1]


def test_echo_with_logprobs_scores_the_prompt(live):
    """The legacy scoring form (echo + logprobs, as evaluation harnesses send): the prompt's tokens
    first, the first without a logprob, each other one's logprob the model's given what precedes
    it; streamed, the first chunk carries them. The prefix cache does not skip any of them."""
    engine = live["engine"]
    prompt = "def fibonacci(n):\n    return n"
    ids = engine.encode(prompt)
    body = {"model": "demo-r32", "prompt": prompt, "max_tokens": 2, "temperature": 0, "ignore_eos": True,
            "echo": True, "logprobs": 1}
    for attempt in range(2):  # the second finds the prompt's blocks in the prefix cache
        r = post(live, "/v1/completions", body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(ids) + 2 and choice["text"].startswith(prompt)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert all(v is not None and v <= 0 for v in lp["token_logprobs"][1:])
        assert lp["text_offset"] == [sum(map(len, lp["tokens"][:i])) for i in range(len(lp["tokens"]))]
        if attempt == 0:
            first = lp
        else:
            assert lp == first
    # position 5 of the prompt sees the distribution a generation from its first 5 tokens samples from
    gen = completion(live, model="demo-r32", prompt=ids[:5], max_tokens=1, logprobs=1).json()["choices"][0]
    best = gen["logprobs"]["tokens"][0]  # greedy: the most likely token, also the prompt position's best
    assert first["top_logprobs"][5][best] == pytest.approx(gen["logprobs"]["token_logprobs"][0], abs=1e-5)
    chunks = events(live, "/v1/completions", body)
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
    assert [t for s in streamed for t in s["tokens"]] == first["tokens"]
    assert [v for s in streamed for v in s["token_logprobs"]] == first["token_logprobs"]
    assert [v for s in streamed for v in s["text_offset"]] == first["text_offset"]


@pytest.mark.parametrize("path,extra,says", [
    ("/v1/completions", {"logprobs": True}, "logprobs must be a number"),
    ("/v1/completions", {"logprobs": 21}, "logprobs must be in [0, 20]"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs needs logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs must be in [0, 20]"),
])
def test_bad_logprobs_requests_get_400(live, path, extra, says):
    body = {"model": "tiny", "max_tokens": 2, **extra}
    body.update({"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]})
    r = post(live, path, body)
    assert r.status_code == 400 and says in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("prompt", ["café au lait, ünïcödé \U0001F98A", [1, 43, 1675]], ids=("non-ascii", "ids"))
def test_echoed_tokens_add_up_to_the_text_and_offsets_point_into_it(live, prompt):
    r = completion(live, prompt=prompt, max_tokens=4, logprobs=1, echo=True)
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"]
    assert all(choice["text"][o:].startswith(t) for t, o in zip(lp["tokens"], lp["text_offset"]))


def test_echo_with_max_tokens_zero_scores_the_prompt_and_generates_nothing(live):
    """lm-eval-harness's and OpenAI's legacy scoring call (echo, logprobs, max_tokens 0): the
    prompt with its tokens' logprobs, no completion token, streamed or not; the scores are the
    ones a call that also generates gives its prompt."""
    prompt = "def fibonacci(n):\n    return n"
    body = {"model": "demo-r16", "prompt": prompt, "temperature": 0, "echo": True, "logprobs": 2}
    r = post(live, "/v1/completions", {**body, "max_tokens": 0})
    assert r.status_code == 200, r.text
    choice, usage = r.json()["choices"][0], r.json()["usage"]
    n = len(live["engine"].encode(prompt))
    assert choice["text"] == prompt and usage["completion_tokens"] == 0 and usage["prompt_tokens"] == n
    scored = choice["logprobs"]
    assert len(scored["tokens"]) == n and "".join(scored["tokens"]) == prompt
    generating = post(live, "/v1/completions", {**body, "max_tokens": 3, "ignore_eos": True}).json()["choices"][0]
    assert {k: v[:n] for k, v in generating["logprobs"].items()} == scored
    chunks = events(live, "/v1/completions", {**body, "max_tokens": 0, "stream_options": {"include_usage": True}})
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == prompt
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
    assert [t for s in streamed for t in s["tokens"]] == scored["tokens"]
    assert chunks[-1]["usage"]["completion_tokens"] == 0
    plain = post(live, "/v1/completions", {"model": "tiny", "prompt": prompt, "echo": True, "max_tokens": 0})
    assert plain.status_code == 200 and plain.json()["choices"][0]["text"] == prompt
    assert plain.json()["choices"][0]["logprobs"] is None


@pytest.mark.parametrize("extra,says", [
    ({}, "0 only with echo"),
    ({"echo": True, "min_tokens": 1}, "min_tokens must be 0 when max_tokens is 0"),
])
def test_max_tokens_zero_needs_echo(live, extra, says):
    r = post(live, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0, **extra})
    assert r.status_code == 400 and says in r.json()["error"]["message"], r.text


def test_the_stop_token_reads_as_its_own_text_among_its_alternatives(live):
    """A request ended by a stop token id leaves its text out of the output, but its logprob entry
    names it as its alternatives do: one key for one token (lm-eval's is-greedy check)."""
    body = {"model": "demo-r8", "prompt": "def main():", "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "logprobs": 2, "return_tokens_as_token_ids": True}
    free = post(live, "/v1/completions", body).json()["choices"][0]["logprobs"]["tokens"]
    stop = int(free[3].removeprefix("token_id:"))
    r = post(live, "/v1/completions", {**body, "return_tokens_as_token_ids": False, "stop_token_ids": [stop]})
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop and len(lp["tokens"]) == 4
    last, alternatives = lp["tokens"][-1], lp["top_logprobs"][-1]
    assert last and len(alternatives) == 2 and alternatives[last] == lp["token_logprobs"][-1]
    assert max(alternatives.values()) == alternatives[last]  # greedy: the chosen one is the best
