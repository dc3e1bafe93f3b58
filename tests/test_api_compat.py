"""OpenAI and vLLM response details clients read: stop_reason, a stop token's text, min_tokens
on chat, usage in streamed chunks, one `created` per stream, and the known fields this server
does not serve refused by name (on an in-process server)."""

from __future__ import annotations

import itertools
import json
import time

import httpx
import pytest
from test_server_hardening import in_process_server

from caraserve.config import AdapterConfig, EngineConfig, ServerConfig
from caraserve.engine import Engine


@pytest.fixture(scope="module")
def live():
    engine = Engine(EngineConfig(compile="false", max_batch_size=4, max_seq_len=256,
                                 adapters=AdapterConfig(dir="none")))
    with in_process_server(engine, ServerConfig()) as (base, _):
        yield {"base": base, "engine": engine}


def post(live, path: str, body: dict) -> httpx.Response:
    return httpx.post(live["base"] + path, json=body, timeout=60)


def chunks(live, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", live["base"] + path, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]


BODY = {"model": "tiny", "prompt": "import os\n", "max_tokens": 12, "temperature": 0, "ignore_eos": True}


def test_stop_reason_names_the_stop_string_or_token_and_the_token_text_is_left_out(live):
    free = post(live, "/v1/completions", {**BODY, "logprobs": 0}).json()["choices"][0]
    tokens = free["logprobs"]["tokens"]
    assert free["stop_reason"] is None and free["finish_reason"] == "length"
    stop = free["text"][len(tokens[0]) + 1 :][:3]
    by_str = post(live, "/v1/completions", {**BODY, "stop": [stop, "\x00never"]}).json()["choices"][0]
    assert by_str["finish_reason"] == "stop" and by_str["stop_reason"] == stop
    tok = live["engine"].tokenizer
    ids = tok(free["text"], add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == free["text"]
    stop_id = ids[2]
    for stream in (False, True):
        for keep in (False, True):
            body = {**BODY, "stop_token_ids": [stop_id], "include_stop_str_in_output": keep}
            if stream:
                got = chunks(live, "/v1/completions", body)
                text, last = "".join(c["choices"][0]["text"] for c in got), got[-1]["choices"][0]
            else:
                last = post(live, "/v1/completions", body).json()["choices"][0]
                text = last["text"]
            assert last["finish_reason"] == "stop" and last["stop_reason"] == stop_id
            assert text == tok.decode(ids[: 3 if keep else 2])  # the stop token's text only when asked
    chat = post(live, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                               "max_tokens": 8, "temperature": 0, "stop": ["\x00never"]}).json()
    assert chat["choices"][0]["stop_reason"] is None


def test_chat_takes_min_tokens_above_one(live):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 0,
            "min_tokens": 5, "max_tokens": 8}
    r = post(live, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 5
    for extra in ({"max_tokens": 3}, {"min_tokens": 10**6}, {"min_tokens": -1}):
        bad = post(live, "/v1/chat/completions", {**body, **extra})
        assert bad.status_code == 400 and "min_tokens" in bad.json()["error"]["message"]


def test_streamed_chunks_carry_one_created_and_usage_null_or_so_far(live, monkeypatch):
    clock = itertools.count(1_800_000_000)  # a clock a second further at every reading
    monkeypatch.setattr(time, "time", lambda: float(next(clock)))
    body = {**BODY, "n": 2, "seed": 3, "temperature": 1.0, "stream_options": {"include_usage": True}}
    for prompts in (BODY["prompt"], [BODY["prompt"], "def f():"]):
        got = chunks(live, "/v1/completions", {**body, "prompt": prompts})
        assert len({c["created"] for c in got}) == 1
    monkeypatch.undo()
    got = chunks(live, "/v1/completions", body)
    *texts, final = got
    assert all("usage" in c and c["usage"] is None for c in texts)
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 24
    body["stream_options"]["continuous_usage_stats"] = True
    got = chunks(live, "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": "hi"}],
                                                "prompt": None})
    *texts, final = got
    seen = {0: 0, 1: 0}
    for c in texts:
        i, u = c["choices"][0]["index"], c["usage"]
        assert u["prompt_tokens"] == final["usage"]["prompt_tokens"] and u["completion_tokens"] >= seen[i]
        seen[i] = u["completion_tokens"]
    assert seen == {0: 12, 1: 12} and final["usage"]["completion_tokens"] == 24


@pytest.mark.parametrize("field, value, says", [
    ("response_format", {"type": "structural_tag"}, "response_format"),
    ("tools", [{"type": "function", "function": {"name": "f"}}], "tools"),  # tool_choice "auto" by default
    ("tool_choice", "required", "tool_choice"),
    ("tool_choice", "auto", "tool_choice"),
    ("guided_decoding_backend", "outlines", "guided_decoding_backend"),
    ("guided_whitespace_pattern", " ", "guided_whitespace_pattern"),
    ("structured_outputs", {"structural_tag": "{}"}, "structural_tag"),
    ("stream_options", {"include_usage": True}, "stream_options"),
    ("functions", [{"name": "f", "parameters": {}}], "functions"),
    ("function_call", "auto", "function_call"),
    ("best_of", 3, "best_of"),
])
def test_fields_this_server_does_not_serve_are_refused_by_name(live, field, value, says):
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = post(live, "/v1/chat/completions", {**chat, field: value})
    assert r.status_code == 400 and says in r.json()["error"]["message"], r.text


def test_echo_with_no_tokens_reports_no_stop(live):
    """echo with max_tokens 0 generates nothing: no stop reason, even when the token the engine
    ran for is a stop token."""
    free = post(live, "/v1/completions", {**BODY, "max_tokens": 1}).json()["choices"][0]
    tok = live["engine"].tokenizer
    (first,) = tok(free["text"], add_special_tokens=False)["input_ids"][:1]
    body = {**BODY, "max_tokens": 0, "echo": True, "stop_token_ids": [first]}
    for got in (post(live, "/v1/completions", body).json()["choices"][0],
                chunks(live, "/v1/completions", body)[-1]["choices"][0]):
        assert got["finish_reason"] == "length" and got["stop_reason"] is None


def test_fields_at_their_neutral_values_are_taken(live):
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for extra in ({"response_format": {"type": "text"}}, {"tools": []}, {"tool_choice": "none"}, {"tools": None},
                  {"stream_options": {}}):
        assert post(live, "/v1/chat/completions", {**chat, **extra}).status_code == 200, extra
    assert post(live, "/v1/completions", {**BODY, "best_of": 1}).status_code == 200
    assert post(live, "/v1/completions", {**BODY, "best_of": 2, "n": 2, "seed": 1,
                                          "temperature": 1.0}).status_code == 200
    bad = post(live, "/v1/completions", {**BODY, "best_of": 3})
    assert bad.status_code == 400 and "best_of" in bad.json()["error"]["message"]


def test_chat_echo_begins_the_answer_with_the_assistants_last_message(live):
    """vLLM's chat echo: the last message's content comes first when it is the assistant's (the
    reply continues it), streamed in the first chunk; with another role last, nothing is echoed,
    unless there is no generation prompt (the reply then continues that message, whatever its role)."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure: "}]
    body = {"model": "tiny", "messages": messages, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    plain = post(live, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
    echoed = post(live, "/v1/chat/completions", {**body, "echo": True}).json()["choices"][0]["message"]["content"]
    assert echoed == "Sure: " + plain
    got = chunks(live, "/v1/chat/completions", {**body, "echo": True})
    assert got[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}  # the role alone, as OpenAI's
    assert got[1]["choices"][0]["delta"]["content"].startswith("Sure: ")
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in got) == echoed
    user_last = {**body, "messages": messages[:1], "echo": True}
    assert post(live, "/v1/chat/completions", user_last).json()["choices"][0]["message"]["content"] == \
        post(live, "/v1/chat/completions", {**user_last, "echo": False}).json()["choices"][0]["message"]["content"]
    continued = {**user_last, "add_generation_prompt": False}
    assert post(live, "/v1/chat/completions", continued).json()["choices"][0]["message"]["content"] == "hi" + \
        post(live, "/v1/chat/completions", {**continued, "echo": False}).json()["choices"][0]["message"]["content"]


def test_a_body_without_model_is_for_the_served_base_model(live):
    """vLLM's server takes a missing (or null) `model` as the base model: same tokens, and the
    answer names the served model."""
    want = post(live, "/v1/completions", BODY).json()
    for model in ({}, {"model": None}):
        body = {**{k: v for k, v in BODY.items() if k != "model"}, **model}
        got = post(live, "/v1/completions", body).json()
        assert got["model"] == want["model"] == "tiny"
        assert got["choices"][0]["text"] == want["choices"][0]["text"]
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
    with_model = post(live, "/v1/chat/completions", {**chat, "model": "tiny"}).json()
    without = post(live, "/v1/chat/completions", chat).json()
    assert without["model"] == "tiny" and without["choices"] == with_model["choices"]
    assert {c["model"] for c in chunks(live, "/v1/chat/completions", chat)} == {"tiny"}
    assert post(live, "/tokenize", {"prompt": "import os"}).json()["tokens"] == \
        post(live, "/tokenize", {"model": "tiny", "prompt": "import os"}).json()["tokens"]
    assert post(live, "/v1/completions", {**BODY, "model": "nope"}).status_code == 404


def test_tools_with_tool_choice_none_are_rendered_by_the_chat_template():
    """As vLLM's server: tools the model is told not to call (tool_choice "none") go to the chat
    template; anywhere else they are refused (no tool calls are parsed here)."""
    template = ("{% for t in tools or [] %}[tool {{ t.function.name }}]{% endfor %}"
                "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    engine = Engine(EngineConfig(compile="false", max_batch_size=2, max_seq_len=256,
                                 adapters=AdapterConfig(dir="none")))
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
    with in_process_server(engine, ServerConfig(chat_template=template)) as (base, _):
        live = {"base": base}

        def prompt_tokens(body):
            r = post(live, "/v1/chat/completions", body)
            assert r.status_code == 200, r.text
            return r.json()["usage"]["prompt_tokens"]

        def count(text):
            return len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])

        want = count("[tool lookup]user: hi\n")
        assert prompt_tokens({**chat, "tools": tools, "tool_choice": "none"}) == want
        assert prompt_tokens({**chat, "functions": [tools[0]["function"]], "function_call": "none"}) == want
        assert prompt_tokens(chat) == count("user: hi\n") < want
        tokenized = post(live, "/tokenize", {"messages": chat["messages"], "tools": tools}).json()
        assert tokenized["count"] == want
        for refused in ({**chat, "tools": tools}, {**chat, "tools": tools, "tool_choice": "auto"},
                        {**chat, "tools": ["lookup"], "tool_choice": "none"}):
            r = post(live, "/v1/chat/completions", refused)
            assert r.status_code == 400 and "tool" in r.json()["error"]["message"], r.text
        r = post(live, "/v1/completions", {**BODY, "tools": tools, "tool_choice": "none"})
        assert r.status_code == 400 and "tools" in r.json()["error"]["message"], r.text


def test_each_chat_choice_streams_its_role_alone_first(live):
    """As OpenAI's and vLLM's servers: every choice's first chunk is {"role": "assistant",
    "content": ""} (no logprobs, 0 completion tokens so far), then its text without the role."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "n": 2, "seed": 1,
            "temperature": 1.0, "logprobs": True, "stream_options": {"include_usage": True,
                                                                      "continuous_usage_stats": True}}
    got = chunks(live, "/v1/chat/completions", body)
    for index in (0, 1):
        mine = [c for c in got if c["choices"] and c["choices"][0]["index"] == index]
        first, rest = mine[0], mine[1:]
        assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert first["choices"][0]["logprobs"] is None and first["usage"]["completion_tokens"] == 0
        assert rest and not any("role" in c["choices"][0]["delta"] for c in rest)
    whole = post(live, "/v1/chat/completions", {**body, "stream": False, "stream_options": None}).json()
    streamed = ["".join(c["choices"][0]["delta"].get("content", "") for c in got
                        if c["choices"] and c["choices"][0]["index"] == i) for i in (0, 1)]
    assert streamed == [c["message"]["content"] for c in whole["choices"]]


# a template that writes what a conversation with tools carries: calls, their answers, names
TOOLS_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}"
                  "{% for c in m.tool_calls or [] %}<call {{ c.id }}>{{ c.function.name }}"
                  "{{ c.function.arguments | tojson }}{% endfor %}"
                  "{% if m.tool_call_id %}<answers {{ m.tool_call_id }}>{% endif %}"
                  "{% if m.name %}<name {{ m.name }}>{% endif %}\n{% endfor %}"
                  "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_a_conversation_with_tool_calls_reaches_the_template_as_transformers_renders_it():
    """An assistant turn's tool_calls (arguments read from their JSON text, as vLLM hands them
    over), a tool turn's tool_call_id and a message's name all reach the chat template."""
    engine = Engine(EngineConfig(compile="false", max_batch_size=2, max_seq_len=512,
                                 adapters=AdapterConfig(dir="none")))
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [{"role": "user", "content": "Weather in Paris?", "name": "ann"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 21}'}]
    as_template_takes = [messages[0], {"role": "assistant", "content": "", "tool_calls": [
        {**call, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}, messages[2]]
    text = engine.tokenizer.apply_chat_template(as_template_takes, chat_template=TOOLS_TEMPLATE, tokenize=False,
                                                add_generation_prompt=True)
    assert '<call call_1>get_weather{"city": "Paris"}' in text and "<answers call_1>" in text and "<name ann>" in text
    with in_process_server(engine, ServerConfig(chat_template=TOOLS_TEMPLATE)) as (base, _):
        r = httpx.post(base + "/tokenize", json={"messages": messages}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["tokens"] == engine.tokenizer(text, add_special_tokens=False)["input_ids"]
        bad = [messages[0], {**messages[1], "tool_calls": [{**call, "function": {"name": "f", "arguments": "{oops"}}]}]
        r = httpx.post(base + "/v1/chat/completions", json={"messages": bad, "max_tokens": 2}, timeout=60)
        assert r.status_code == 400 and "messages[1].tool_calls[0].function.arguments is not JSON" in r.text
        deep = "[" * 5000 + "]" * 5000  # past the JSON reader's nesting depth
        bad[1]["tool_calls"][0]["function"]["arguments"] = deep
        r = httpx.post(base + "/v1/chat/completions", json={"messages": bad, "max_tokens": 2}, timeout=60)
        assert r.status_code == 400 and "arguments is not JSON" in r.text


PARTS_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{% for c in m['content'] %}"
                  "{% if c['type'] == 'text' %}{{ c['text'] }}|{% endif %}{% endfor %}{% endfor %}"
                  "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_a_template_that_loops_over_content_parts_gets_them():
    """A template reading OpenAI's content parts (multimodal models' templates do) gets each
    message's content as a list of text parts, a plain text as one part (vLLM detects the form
    the same way); a template reading text gets text."""
    from caraserve.serve.prompts import loops_over_content

    assert loops_over_content(PARTS_TEMPLATE) and not loops_over_content(TOOLS_TEMPLATE)
    assert loops_over_content("{% for m in messages %}{% for c in m.content | list %}{{ c.text }}{% endfor %}"
                              "{% endfor %}")
    assert loops_over_content("{% for m in messages %}{% set c = m['content'] %}{% for p in c %}{{ p.text }}"
                              "{% endfor %}{% endfor %}")
    assert not loops_over_content("{% for t in tools %}{% for x in t.function.content %}{{ x }}{% endfor %}"
                                  "{% endfor %}")  # a loop over something else's content
    engine = Engine(EngineConfig(compile="false", max_batch_size=2, max_seq_len=256,
                                 adapters=AdapterConfig(dir="none")))
    messages = [{"role": "system", "content": ""},
                {"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}]},
                {"role": "assistant", "content": "yes"}]
    as_parts = [{"role": "system", "content": [{"type": "text", "text": ""}]},  # an empty text: one empty part
                messages[1], {"role": "assistant", "content": [{"type": "text", "text": "yes"}]}]
    text = engine.tokenizer.apply_chat_template(as_parts, chat_template=PARTS_TEMPLATE, tokenize=False,
                                                add_generation_prompt=True)
    assert text == "<system>|<user>hello|world|<assistant>yes|<assistant>"
    with in_process_server(engine, ServerConfig(chat_template=PARTS_TEMPLATE)) as (base, _):
        r = httpx.post(base + "/tokenize", json={"messages": messages}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["tokens"] == engine.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_named_templates_are_read_as_transformers_picks_them():
    """A tokenizer with named chat templates: with tools, transformers applies "tool_use" (here a
    template reading content parts), else "default" (reading text): each gets its form."""
    engine = Engine(EngineConfig(compile="false", max_batch_size=2, max_seq_len=256,
                                 adapters=AdapterConfig(dir="none")))
    engine.tokenizer.chat_template = {"default": TOOLS_TEMPLATE, "tool_use": PARTS_TEMPLATE}
    messages = [{"role": "user", "content": "hello"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    as_parts = [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    texts = [engine.tokenizer.apply_chat_template(m, tools=t, tokenize=False, add_generation_prompt=True)
             for m, t in ((messages, None), (as_parts, tools))]
    assert texts[1] == "<user>hello|<assistant>" and texts[0] != texts[1]
    with in_process_server(engine, ServerConfig()) as (base, _):
        for extra, text in zip(({}, {"tools": tools}), texts):
            r = httpx.post(base + "/tokenize", json={"messages": messages, **extra}, timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["tokens"] == engine.tokenizer(text, add_special_tokens=False)["input_ids"], extra
