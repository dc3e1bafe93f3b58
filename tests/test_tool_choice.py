"""Forced tool calls (tool_choice "required" or a named function): the grammar of the call, the
answer's tool_calls (whole and streamed), and what is refused, on an in-process server."""

from __future__ import annotations

import json

import httpx
import pytest
import xgrammar as xgr
from test_server_hardening import in_process_server

from caraserve.config import AdapterConfig, EngineConfig, ServerConfig
from caraserve.engine import Engine
from caraserve.request import FinishReason, RequestError, RequestOutput
from caraserve.serve import choices
from caraserve.serve.constraints import ForcedTools
from caraserve.serve.protocol import ChatCompletionRequest

WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "now"}}]  # no parameters: an empty object
NAMED = {"type": "function", "function": {"name": "get_weather"}}
CHAT = {"model": "demo-r8", "messages": [{"role": "user", "content": "weather?"}], "tools": TOOLS,
        "max_tokens": 60, "temperature": 0}


def forced(**body) -> ForcedTools:
    return ForcedTools.of(ChatCompletionRequest(**{**CHAT, **body}))


@pytest.fixture(scope="module")
def live():
    engine = Engine(EngineConfig(compile="false", max_batch_size=4, max_seq_len=512,
                                 adapters=AdapterConfig(dir="demo")))
    with httpx.Client(timeout=60) as client, in_process_server(engine, ServerConfig()) as (base, _):
        yield client, base, engine


def test_required_grammar_takes_exactly_lists_of_calls_of_the_tools(live):
    _, _, engine = live
    compiled = engine.grammars.compile(forced(tool_choice="required").spec())
    good = ['[{"name": "now", "parameters": {}}]',
            '[{"name": "get_weather", "parameters": {"city": "Rome", "unit": "f"}}, {"name": "now", "parameters": {}}]']
    bad = ['[]', '[{"name": "now", "parameters": {"x": 1}}]', '[{"name": "sleep", "parameters": {}}]',
           '[{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "c"}}]',
           '{"name": "now", "parameters": {}}']
    for text, want in [(t, True) for t in good] + [(t, False) for t in bad]:
        m = xgr.GrammarMatcher(compiled)
        assert (m.accept_string(text) and m.is_completed()) == want, text


def test_calls_of_a_whole_output_and_the_whole_ones_of_a_cut_one():
    required = forced(tool_choice="required")
    text = '[{"name": "get_weather", "parameters": {"city": "Rome", "unit": "c"}}, {"name": "now", "parameters": {}}]'
    calls = required.calls(text)
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("function", "get_weather", {"city": "Rome", "unit": "c"}), ("function", "now", {})]
    assert len({c["id"] for c in calls}) == 2 and required.finish_reason("stop") == "tool_calls"
    assert [c["function"]["name"] for c in required.calls(text[:-20])] == ["get_weather"]  # cut: the whole ones
    assert required.calls('[{"name": "now", "param') == [] and required.finish_reason("length") == "length"
    named = forced(tool_choice=NAMED)
    (call,) = named.calls('{"city": "Paris", "unit": "f"}')
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "f"}'}
    assert named.finish_reason("stop") == "stop"  # OpenAI's: a named call finishes as "stop"
    assert named.calls('{"city": "Par')[0]["function"]["arguments"] == '{"city": "Par'  # cut, as vLLM's


def test_definitions_move_to_the_lists_root_and_parallel_calls_can_be_one(live):
    _, _, engine = live
    point = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    move = {"type": "object", "properties": {"to": {"$ref": "#/$defs/Point"}}, "required": ["to"],
            "$defs": {"Point": point}}
    tools = [{"type": "function", "function": {"name": "move", "parameters": move}}, *TOOLS]
    spec = forced(tool_choice="required", tools=tools, parallel_tool_calls=False).spec()
    schema = json.loads(spec.json)
    assert schema["$defs"] == {"Point": point} and schema["maxItems"] == 1
    compiled = engine.grammars.compile(spec)
    for text, want in [('[{"name": "move", "parameters": {"to": {"x": 3}}}]', True),
                       ('[{"name": "move", "parameters": {"to": {"y": 3}}}]', False),
                       ('[{"name": "now", "parameters": {}}, {"name": "now", "parameters": {}}]', False)]:
        m = xgr.GrammarMatcher(compiled)
        assert (m.accept_string(text) and m.is_completed()) == want, text
    other = {**move, "$defs": {"Point": {"type": "string"}}}
    clash = [*tools, {"type": "function", "function": {"name": "jump", "parameters": other}}]
    with pytest.raises(RequestError, match="define \\$defs/Point differently"):
        forced(tool_choice="required", tools=clash).spec()


@pytest.mark.parametrize("body, says", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
    ({"tool_choice": "required", "tools": [{"type": "function", "function": {"parameters": {}}}]},
     "tools\\[0\\]: a tool is"),
    ({"tool_choice": "required", "tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]},
     "parameters must be a JSON schema"),
    ({"tool_choice": "required", "echo": True}, "echo"),
    ({"tool_choice": "required", "tools": TOOLS + TOOLS[:1]}, "a second function named 'get_weather'"),
    ({"tool_choice": "required", "tools": [{"type": "function", "function": {"name": "f",
                                                                            "parameters": {"type": "string"}}}]},
     "of an object"),
])
def test_forced_calls_that_cannot_be_made_are_refused(body, says):
    with pytest.raises(RequestError, match=says):
        forced(**body)


def test_a_named_call_whole_and_streamed(live):
    client, base, _ = live
    r = client.post(base + "/v1/chat/completions", json={**CHAT, "tool_choice": NAMED})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    (call,) = choice["message"]["tool_calls"]
    assert choice["message"]["content"] is None and choice["finish_reason"] == "stop"
    assert call["function"]["name"] == "get_weather" and call["id"].startswith("chatcmpl-tool-")
    assert json.loads(call["function"]["arguments"])["city"] in ("Paris", "Rome")
    with httpx.stream("POST", base + "/v1/chat/completions", json={**CHAT, "tool_choice": NAMED, "stream": True},
                      timeout=60) as s:
        deltas = [json.loads(ln[6:])["choices"][0] for ln in s.iter_lines() if ln.startswith("data: {")]
    parts = [c["delta"]["tool_calls"][0] for c in deltas if c["delta"].get("tool_calls")]
    assert parts[0]["id"].startswith("chatcmpl-tool-") and parts[0]["function"]["name"] == "get_weather"
    assert "".join(p["function"]["arguments"] for p in parts) == call["function"]["arguments"]
    assert deltas[-1]["finish_reason"] == "stop"


def test_required_calls_stream_whole_at_the_end_and_a_cut_list_is_content():
    required = forced(tool_choice="required")
    chunk = choices.tool_call_chunker("r", "m", choices.TokenTexts(None, True), [1], required)(0)
    text = '[{"name": "now", "parameters": {}}]'
    outs = [RequestOutput("r", [5], [5], False, None, text[:10], text[:10]),
            RequestOutput("r", [6], [5, 6], False, None, text, text[10:]),
            RequestOutput("r", [2], [5, 6, 2], True, FinishReason.EOS, text, "")]
    assert chunk(outs[0], None) is None  # held until the call is whole
    call = chunk(outs[1], None)["choices"][0]
    assert call["delta"]["tool_calls"][0]["function"] == {"name": "now", "arguments": "{}"}
    assert call["finish_reason"] is None
    last = chunk(outs[2], "stop")["choices"][0]  # the finish reason in a chunk of its own (OpenAI's)
    assert last["delta"] == {} and last["finish_reason"] == "tool_calls"
    cut = choices.tool_call_chunker("r", "m", choices.TokenTexts(None, True), [1], required)(0)
    both = cut(RequestOutput("r", [5, 6], [5, 6], True, FinishReason.LENGTH, text + ", {", text + ", {"), "length")
    assert [b["choices"][0]["finish_reason"] for b in both] == [None, "length"]
    assert both[0]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "now"


def test_required_over_the_api_is_constrained_to_calls(live):
    client, base, _ = live
    r = client.post(base + "/v1/chat/completions", json={**CHAT, "tool_choice": "required", "max_tokens": 12}).json()
    choice = r["choices"][0]
    assert choice["message"]["content"] is None and choice["finish_reason"] in ("tool_calls", "length")
    assert all(c["function"]["name"] in ("get_weather", "now") for c in choice["message"]["tool_calls"])


@pytest.mark.parametrize("tool_choice", ["required", NAMED])
@pytest.mark.parametrize("max_tokens", [60, 7])  # 7: cut short
def test_streamed_calls_and_logprobs_add_up_to_the_whole_answer(live, tool_choice, max_tokens):
    client, base, _ = live
    body = {**CHAT, "tool_choice": tool_choice, "max_tokens": max_tokens, "logprobs": True}
    whole = client.post(base + "/v1/chat/completions", json=body).json()["choices"][0]
    with httpx.stream("POST", base + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as s:
        chunks = [json.loads(ln[6:])["choices"][0] for ln in s.iter_lines() if ln.startswith("data: {")]
    calls: dict[int, dict] = {}
    for delta in (c["delta"].get("tool_calls") or () for c in chunks):
        for part in delta:
            call = calls.setdefault(part["index"], {"name": "", "arguments": ""})
            call["name"] += part.get("function", {}).get("name", "")
            call["arguments"] += part.get("function", {}).get("arguments", "")
    assert [calls[i] for i in sorted(calls)] == [c["function"] for c in whole["message"]["tool_calls"]]
    streamed_logprobs = [e for c in chunks if c.get("logprobs") for e in c["logprobs"]["content"]]
    assert len(streamed_logprobs) == len(whole["logprobs"]["content"])
    assert chunks[-1]["finish_reason"] == whole["finish_reason"] and chunks[-1]["delta"] == {}


@pytest.mark.parametrize("extra, says", [
    ({"tool_choice": "auto"}, "server.tool_call_parser"),  # (a server without a parser)
    ({}, "server.tool_call_parser"),  # OpenAI's default with tools
    ({"tool_choice": "required", "tools": []}, "needs tools"),
    ({"tool_choice": "auto", "tools": None}, "needs tools"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format, tool_choice"),
    ({"tool_choice": "sometimes"}, "is not a tool_choice"),
])
def test_tool_choices_not_served_are_a_400(live, extra, says):
    client, base, _ = live
    r = client.post(base + "/v1/chat/completions", json={**CHAT, **extra})
    assert r.status_code == 400 and says in r.json()["error"]["message"], r.text
