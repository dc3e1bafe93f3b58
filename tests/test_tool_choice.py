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


def test_calls_of_a_whole_output_and_none_of_a_cut_one():
    required = forced(tool_choice="required")
    calls = required.calls('[{"name": "get_weather", "parameters": {"city": "Rome", "unit": "c"}}, '
                           '{"name": "now", "parameters": {}}]')
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("function", "get_weather", {"city": "Rome", "unit": "c"}), ("function", "now", {})]
    assert len({c["id"] for c in calls}) == 2 and required.finish_reason("stop", calls) == "tool_calls"
    assert required.calls('[{"name": "now", "param') is None and required.finish_reason("length", None) == "length"
    named = forced(tool_choice=NAMED)
    (call,) = named.calls('{"city": "Paris", "unit": "f"}')
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "f"}'}
    assert named.finish_reason("stop", [call]) == "stop"  # OpenAI's: a named call finishes as "stop"


@pytest.mark.parametrize("body, says", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
    ({"tool_choice": "required", "tools": [{"type": "function", "function": {"parameters": {}}}]},
     "tools\\[0\\]: a tool is"),
    ({"tool_choice": "required", "tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]},
     "parameters must be a JSON schema"),
    ({"tool_choice": "required", "echo": True}, "echo"),
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
            RequestOutput("r", [6], [5, 6], True, FinishReason.EOS, text, text[10:])]
    assert chunk(outs[0], None) is None  # held until the list is whole
    last = chunk(outs[1], "stop")["choices"][0]
    assert last["finish_reason"] == "tool_calls"
    assert last["delta"]["tool_calls"][0]["function"] == {"name": "now", "arguments": "{}"}
    cut = choices.tool_call_chunker("r", "m", choices.TokenTexts(None, True), [1], required)(0)
    last = cut(RequestOutput("r", [5], [5], True, FinishReason.LENGTH, text[:10], text[:10]), "length")
    assert last["choices"][0]["delta"] == {"content": text[:10]} and last["choices"][0]["finish_reason"] == "length"


def test_required_over_the_api_is_constrained_to_calls(live):
    client, base, _ = live
    r = client.post(base + "/v1/chat/completions", json={**CHAT, "tool_choice": "required", "max_tokens": 12}).json()
    choice = r["choices"][0]
    if choice["finish_reason"] == "tool_calls":  # a whole list within the tokens
        assert all(c["function"]["name"] in ("get_weather", "now") for c in choice["message"]["tool_calls"])
    else:  # cut short: the text so far, which is the start of a list of calls
        assert choice["finish_reason"] == "length" and choice["message"]["content"].startswith('[{"name": "')


@pytest.mark.parametrize("extra, says", [
    ({"tool_choice": "auto"}, "tool_choice 'auto'"),
    ({}, "tool_choice 'auto'"),  # OpenAI's default with tools
    ({"tool_choice": "required", "tools": []}, "needs tools"),
    ({"tool_choice": "auto", "tools": None}, "needs tools"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format, tool_choice"),
    ({"tool_choice": "sometimes"}, "is not a tool_choice"),
])
def test_tool_choices_not_served_are_a_400(live, extra, says):
    client, base, _ = live
    r = client.post(base + "/v1/chat/completions", json={**CHAT, **extra})
    assert r.status_code == 400 and says in r.json()["error"]["message"], r.text
