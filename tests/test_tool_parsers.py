"""tool_choice "auto": the calls a model writes in its own syntax (caraserve.serve.tool_parsers),
whole and streamed, and on an in-process server with server.tool_call_parser."""

from __future__ import annotations

import json
import random
import re

import httpx
import pytest
from test_server_hardening import in_process_server

from caraserve.config import TOOL_CALL_PARSERS, AdapterConfig, ConfigError, EngineConfig, ServerConfig
from caraserve.engine import Engine
from caraserve.serve.tool_parsers import FORMATS, Call, ToolParser

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}'
PARIS = Call("get_weather", '{"city": "Paris", "unit": "c"}')
NOW = Call("now", "{}")

# (parser, output, content, calls): content None where the answer's content is null
CASES = [
    ("hermes", f"<tool_call>\n{WEATHER}\n</tool_call>", "", [PARIS]),
    ("hermes", f"Let me look.\n<tool_call>\n{WEATHER}\n</tool_call>\n\n<tool_call>{{\"name\": \"now\"}}</tool_call>\n",
     "Let me look.\n", [PARIS, NOW]),
    ("hermes", '<tool_call>{"name": "now", "arguments": "{}"}</tool_call> Done.', " Done.", [NOW]),  # JSON text args
    ("hermes", "No tools needed: 1 < 2.", "No tools needed: 1 < 2.", []),
    ("hermes", "\n  ", "\n  ", []),  # without calls, all of the output is content
    ("hermes", '<tool_call>{"name": "now", "argu', '<tool_call>{"name": "now", "argu', []),  # cut
    ("hermes", 'Sure.\n<tool_call>\n{"name": "now", "arguments": {}}\n', "Sure.\n", [NOW]),  # (stopped at </tool_call>)
    ("hermes", '<tool_call>{"name": "now", "arguments": null}</tool_call>', "", [NOW]),
    ("hermes", "<tool_call>" + "[" * 3000 + "</tool_call>", "<tool_call>" + "[" * 3000 + "</tool_call>", []),
    ("hermes", '<tool_call>{"name": "x", "arguments": "' + "[" * 3000 + "]" * 3000 + '"}</tool_call>',
     '<tool_call>{"name": "x", "arguments": "' + "[" * 3000 + "]" * 3000 + '"}</tool_call>', []),
    ("llama3_json", '{"a":' + "[" * 3000 + "]" * 3000 + "}", '{"a":' + "[" * 3000 + "]" * 3000 + "}", []),
    ("mistral", "[TOOL_CALLS]" + "[" * 3000 + "]" * 3000, "[TOOL_CALLS]" + "[" * 3000 + "]" * 3000, []),
    ("hermes", '<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),  # no name
    ("hermes", f'<tool_call>[1]</tool_call><tool_call>{WEATHER}</tool_call>', "<tool_call>[1]</tool_call>", [PARIS]),
    ("hermes", '<tool_call>{"name": "x", "arguments": {"v": NaN}}</tool_call>',
     '<tool_call>{"name": "x", "arguments": {"v": NaN}}</tool_call>', []),  # NaN is not JSON
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}', "", [PARIS]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}; '
     '{"name": "now", "parameters": {}}', "", [PARIS, NOW]),
    ("llama3_json", 'Here: {"name": "now", "parameters": {}}', 'Here: {"name": "now", "parameters": {}}', []),
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),  # JSON, but not a call
    ("mistral", f'[TOOL_CALLS][{WEATHER}, {{"name": "now", "arguments": {{}}}}]', "", [PARIS, NOW]),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "c"}[TOOL_CALLS]now[ARGS]{}', "",
     [PARIS, NOW]),
    ("mistral", "Sure. [TOOL_CALLS][]", "Sure. [TOOL_CALLS][]", []),
    ("mistral", "[TOOL_CALLS]two words[ARGS]{}", "[TOOL_CALLS]two words[ARGS]{}", []),
    ("llama3_json", '{"name": "say", "parameters": {"text": "a } ] \\" {é"}}', "",
     [Call("say", '{"text": "a } ] \\" {é"}')]),
    ("llama3_json", "<|python_tag|>print(1)", "<|python_tag|>print(1)", []),
    ("mistral", '[TOOL_CALLS]say[ARGS]{"text": "[ARGS] }"}', "", [Call("say", '{"text": "[ARGS] }"}')]),
    ("pythonic", "[say(text='it\\'s ] (ok')]", "", [Call("say", '{"text": "it\'s ] (ok"}')]),
    ("pythonic", '[get_weather(city="Paris", unit="c"), now()]', "", [PARIS, NOW]),
    ("pythonic", '[get_weather(city="Paris", unit="c")]\n\nShall I?', "\n\nShall I?", [PARIS]),
    ("pythonic", "[1] A footnote.", "[1] A footnote.", []),
    ("pythonic", "[f(x=open('/etc/passwd'))]", "[f(x=open('/etc/passwd'))]", []),  # only literals
    ("pythonic", "[f(1)]", "[f(1)]", []),  # positional arguments have no names
    ("pythonic", 'Use [f(a=[1, 2])]', 'Use [f(a=[1, 2])]', []),  # only as the whole output
]


@pytest.mark.parametrize("name, text, content, calls", CASES)
def test_a_whole_output_parses_into_its_content_and_calls(name, text, content, calls):
    assert ToolParser(name).parse(text) == (content, calls)


@pytest.mark.parametrize("name, text, content, calls", CASES)
def test_streamed_in_any_pieces_the_output_parses_the_same(name, text, content, calls):
    """Fed a character at a time, or in random pieces, the stream sends what the whole parse gives."""
    rng = random.Random(hash(text) & 0xFFFF)
    splits = [list(range(1, len(text)))] + [sorted(rng.sample(range(1, len(text)), min(len(text) - 1, k)))
                                             for k in (1, 3, 8) for _ in range(4)]
    for cut in splits:
        pieces = [text[a:b] for a, b in zip([0, *cut], [*cut, len(text)])]
        stream = ToolParser(name).stream()
        sent, got = "", []
        for piece in pieces:
            more, new = stream.feed(piece)
            sent, got = sent + more, got + new
            if got:
                assert set(got) <= set(calls)  # a call is sent only once whole
        more, new = stream.finish()
        assert (sent + more, got + new) == (content, calls), pieces


def test_text_that_may_begin_a_call_waits_and_plain_text_does_not():
    stream = ToolParser("hermes").stream()
    assert stream.feed("It is sunny <tool") == ("It is sunny ", [])
    assert stream.feed("bar> out") == ("<toolbar> out", [])
    assert stream.feed("\n\n") == ("\n\n", [])  # content already began: whitespace is content
    stream = ToolParser("llama3_json").stream()
    assert stream.feed('\n{"name": "now", ') == ("", [])
    assert stream.feed('"parameters": {}}') == ("", [NOW])
    assert stream.finish() == ("", [])


def test_parallel_tool_calls_false_keeps_the_first_call():
    text = f"<tool_call>{WEATHER}</tool_call>\n<tool_call>{{\"name\": \"now\"}}</tool_call>"
    assert ToolParser("hermes").one_call().parse(text) == ("", [PARIS])
    assert ToolParser("hermes").parse(text) == ("", [PARIS, NOW])


def test_the_answer_forms_and_ids():
    hermes, mistral = ToolParser("hermes"), ToolParser("mistral")
    call = hermes.tool_call(PARIS)
    assert call["type"] == "function" and call["function"] == {"name": "get_weather", "arguments": PARIS.arguments}
    assert call["id"].startswith("chatcmpl-tool-") and call["id"] != hermes.tool_call(PARIS)["id"]
    assert all(re.fullmatch("[A-Za-z0-9]{9}", mistral.tool_call(NOW)["id"]) for _ in range(20))  # Mistral's templates
    assert hermes.finish_reason(1, "stop") == "tool_calls" and hermes.finish_reason(0, "stop") == "stop"
    assert hermes.finish_reason(2, "length") == "length"


def test_a_marker_that_is_a_special_token_keeps_special_tokens(live):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(live[2].model_path))  # (the engine's own stays as it is)
    assert not ToolParser("mistral", tokenizer).keeps_special_tokens  # (the tiny tokenizer has no such token)
    tokenizer.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]"]})
    assert ToolParser("mistral", tokenizer).keeps_special_tokens
    assert not ToolParser("hermes", tokenizer).keeps_special_tokens


def test_the_config_names_every_parser_and_refuses_others():
    assert tuple(FORMATS) == TOOL_CALL_PARSERS
    with pytest.raises(ConfigError, match="server.tool_call_parser='json'"):
        ServerConfig(tool_call_parser="json")
    with pytest.raises(ValueError, match="'json' is not one of"):
        ToolParser("json")


# ---- on a server: the model forced (by a regex) to write hermes calls --------------------------
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "now"}}]
SAID = f'Sure.\n<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>{{"name": "now", "arguments": {{}}}}</tool_call>'
CHAT = {"model": "demo-r8", "messages": [{"role": "user", "content": "weather?"}], "tools": TOOLS,
        "max_tokens": 120, "temperature": 0, "structured_outputs": {"regex": re.escape(SAID)}}


@pytest.fixture(scope="module")
def live():
    engine = Engine(EngineConfig(compile="false", max_batch_size=4, max_seq_len=512,
                                 adapters=AdapterConfig(dir="demo")))
    with httpx.Client(timeout=60) as client, \
            in_process_server(engine, ServerConfig(tool_call_parser="hermes")) as (base, _):
        yield client, base, engine


def test_auto_answers_with_the_calls_the_model_wrote(live):
    client, base, _ = live
    for extra in ({}, {"tool_choice": "auto"}):  # "auto" is the default with tools
        r = client.post(base + "/v1/chat/completions", json={**CHAT, **extra})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        message = choice["message"]
        assert message["content"] == "Sure.\n" and choice["finish_reason"] == "tool_calls"
        assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"]))
                for c in message["tool_calls"]] == [("function", "get_weather", {"city": "Paris", "unit": "c"}),
                                                    ("function", "now", {})]


def test_auto_without_calls_is_plain_text(live):
    client, base, _ = live
    body = {**CHAT, "structured_outputs": {"regex": "No tools <needed>\\."}}
    r = client.post(base + "/v1/chat/completions", json=body)
    choice = r.json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "No tools <needed>."}
    assert choice["finish_reason"] == "stop"
    r = client.post(base + "/v1/chat/completions", json={**CHAT, "tool_choice": "none"})  # tools not parsed
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": SAID}


def test_auto_streamed_adds_up_to_the_whole_answer(live):
    client, base, _ = live
    body = {**CHAT, "logprobs": True, "n": 2}
    whole = client.post(base + "/v1/chat/completions", json=body).json()["choices"]
    with client.stream("POST", base + "/v1/chat/completions", json={**body, "stream": True}) as s:
        chunks = [json.loads(ln[6:])["choices"][0] for ln in s.iter_lines() if ln.startswith("data: {")]
    for index in (0, 1):
        mine = [c for c in chunks if c["index"] == index]
        content = "".join(c["delta"].get("content") or "" for c in mine)
        calls = [part for c in mine for part in c["delta"].get("tool_calls") or ()]
        assert content == whole[index]["message"]["content"]
        assert [p["index"] for p in calls] == [0, 1] and all(p["id"] and p["type"] == "function" for p in calls)
        assert [p["function"] for p in calls] == [c["function"] for c in whole[index]["message"]["tool_calls"]]
        streamed = [e for c in mine if c.get("logprobs") for e in c["logprobs"]["content"]]
        assert [e["token"] for e in streamed] == [e["token"] for e in whole[index]["logprobs"]["content"]]
        assert mine[-1]["finish_reason"] == "tool_calls" and mine[-1]["delta"] == {}
        assert all(c["finish_reason"] is None for c in mine[:-1])


def test_a_marker_that_is_a_special_token_reaches_the_parser(live):
    """The service asks for special tokens' text when the parser's marker is one."""
    from caraserve.serve.protocol import ChatCompletionRequest
    from caraserve.serve.service import EngineService

    class Engine_:  # just what EngineService reads of its engine here
        def __init__(self, engine):
            self.engine, self.on_output = engine, None

    service = EngineService(Engine_(live[2]), "tiny", [], 1.0, tool_call_parser="hermes")
    body = ChatCompletionRequest(**CHAT)
    service._chat_checks(body)
    assert body.skip_special_tokens  # "<tool_call>" is text to the tiny tokenizer
    service.tool_parser.keeps_special_tokens = True
    service._chat_checks(body)
    assert not body.skip_special_tokens


def test_forced_calls_take_the_parsers_ids():
    """With server.tool_call_parser=mistral, tool_choice "required" and named calls get Mistral's
    9-character ids too (its templates refuse others when the calls come back)."""
    engine = Engine(EngineConfig(compile="false", max_batch_size=2, max_seq_len=512,
                                 adapters=AdapterConfig(dir="demo")))
    body = {**CHAT, "tools": TOOLS[1:], "structured_outputs": None, "max_tokens": 60}  # (now(): a short call)
    with httpx.Client(timeout=60) as client, \
            in_process_server(engine, ServerConfig(tool_call_parser="mistral")) as (base, _):
        for choice in ("required", {"type": "function", "function": {"name": "now"}}):
            r = client.post(base + "/v1/chat/completions", json={**body, "tool_choice": choice})
            calls = r.json()["choices"][0]["message"]["tool_calls"]
            assert calls and all(re.fullmatch("[A-Za-z0-9]{9}", c["id"]) for c in calls), r.text
            with client.stream("POST", base + "/v1/chat/completions",
                               json={**body, "tool_choice": choice, "stream": True}) as s:
                ids = [p["id"] for ln in s.iter_lines() if ln.startswith("data: {")
                       for p in json.loads(ln[6:])["choices"][0]["delta"].get("tool_calls") or () if "id" in p]
            assert ids and all(re.fullmatch("[A-Za-z0-9]{9}", i) for i in ids)


def test_parallel_tool_calls_false_makes_auto_one_call(live):
    client, base, _ = live
    r = client.post(base + "/v1/chat/completions", json={**CHAT, "parallel_tool_calls": False})
    assert [c["function"]["name"] for c in r.json()["choices"][0]["message"]["tool_calls"]] == ["get_weather"]
