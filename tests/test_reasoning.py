"""server.reasoning_parser: a thinking model's <think> block as the answer's `reasoning`, apart
from its content, whole and streamed, alone and with a tool parser (caraserve.serve.reasoning)."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import httpx
import pytest
from test_server_hardening import in_process_server

from caraserve.config import REASONING_PARSERS, AdapterConfig, ConfigError, EngineConfig, ServerConfig
from caraserve.engine import Engine
from caraserve.request import FinishReason, RequestOutput
from caraserve.serve import choices
from caraserve.serve.prompts import Prompts
from caraserve.serve.protocol import ChatMessage
from caraserve.serve.reasoning import OutputSplitter, ReasoningParser
from caraserve.serve.streaming import bodies
from caraserve.serve.tool_parsers import Call, ToolParser

NOW = '<tool_call>{"name": "now", "arguments": {}}</tool_call>'

# (parser, output, reasoning, content)
CASES = [
    ("deepseek_r1", "Let me see.\n</think>\n\nIt is 4.", "Let me see.\n", "It is 4."),
    ("deepseek_r1", "<think>Hmm</think>Four.", "Hmm", "Four."),
    ("deepseek_r1", "Still thinking", "Still thinking", ""),  # cut short while thinking
    ("deepseek_r1", "</think>", "", ""),
    ("qwen3", "<think>\nsum it\n</think>\n\nFour.", "\nsum it\n", "Four."),
    ("qwen3", "  <think>a < b</think> ok", "a < b", "ok"),
    ("qwen3", "Four, without thinking.", "", "Four, without thinking."),
    ("qwen3", "<thinking is fun", "", "<thinking is fun"),  # not the tag
    ("qwen3", "<think>cut sho", "cut sho", ""),
    ("qwen3", "", "", ""),
]


def split(parser: str, pieces: list[str], tools: str | None = None):
    s = OutputSplitter(ReasoningParser(parser), ToolParser(tools) if tools else None)
    thought, content, calls = "", "", []
    for k, piece in enumerate(pieces):
        t, c, new = s.feed(piece, final=k == len(pieces) - 1)
        thought, content, calls = thought + t, content + c, calls + new
    return thought, content, calls


@pytest.mark.parametrize("parser, text, reasoning, content", CASES)
def test_reasoning_and_content_whole_and_in_any_pieces(parser, text, reasoning, content):
    assert split(parser, [text]) == (reasoning, content, [])
    rng = random.Random(len(text))
    for cut in [list(range(1, len(text)))] + [sorted(rng.sample(range(1, len(text)), min(3, max(0, len(text) - 1))))
                                              for _ in range(6)]:
        pieces = [text[a:b] for a, b in zip([0, *cut], [*cut, len(text)])] + [""]
        assert split(parser, pieces) == (reasoning, content, []), pieces


def test_text_that_may_close_the_block_waits():
    s = OutputSplitter(ReasoningParser("deepseek_r1"), None)
    assert s.feed("a </thi") == ("a ", "", [])
    assert s.feed("nk>  ") == ("", "", [])  # the answer's leading whitespace is dropped
    assert s.feed(" b") == ("", "b", [])
    q = OutputSplitter(ReasoningParser("qwen3"), None)
    assert q.feed(" <thi") == ("", "", []) and q.feed("s") == ("", " <this", [])


def test_the_tool_parser_reads_the_answer_only():
    text = f"<think>maybe {NOW}?</think>\n{NOW}"
    assert split("qwen3", [text], "hermes") == (f"maybe {NOW}?", "", [Call("now", "{}")])
    assert split("qwen3", list(text) + [""], "hermes") == (f"maybe {NOW}?", "", [Call("now", "{}")])


def outputs(text: str, step: int) -> list[RequestOutput]:
    """The engine's outputs of a request that wrote `text`, `step` characters (one token) at a time."""
    ids = list(range(10, 10 + len(range(0, len(text), step))))
    outs = []
    for k, at in enumerate(range(0, len(text), step)):
        last = at + step >= len(text)
        outs.append(RequestOutput("r", [ids[k]], ids[:k + 1], last, FinishReason.STOP if last else None,
                                  text=text[:at + step], new_text=text[at:at + step]))
    return outs


@pytest.mark.parametrize("parser, tools, text", [
    ("deepseek_r1", None, "I should add.</think>\n\nFour."),
    ("qwen3", "hermes", f"<think>call it</think>Calling. {NOW}"),
    ("qwen3", "hermes", "no thinking, no calls"),
    ("deepseek_r1", "hermes", "thinking until cut"),
])
def test_streamed_chunks_add_up_to_the_whole_message(parser, tools, text):
    reasoning, tool_parser = ReasoningParser(parser), ToolParser(tools) if tools else None
    texts = choices.TokenTexts(None)
    for step in (1, 3, 7):
        outs = outputs(text, step)
        whole, finish, _, _ = choices.chat_choice(outs[-1], texts, [1], tools=tool_parser, reasoning=reasoning)
        chunk = choices.parsed_chat_chunker("r", "m", texts, [1], tool_parser, reasoning)(0)
        sent = [b for o in outs for b in bodies(chunk(o, o.finish_reason.openai if o.finished else None))]
        deltas = [b["choices"][0]["delta"] for b in sent]
        assert "".join(d.get("reasoning", "") for d in deltas) == (whole["reasoning"] or "")
        assert "".join(d.get("content", "") for d in deltas) == (whole["content"] or "")
        calls = [c["function"] for d in deltas for c in d.get("tool_calls", ())]
        assert calls == [c["function"] for c in whole.get("tool_calls", ())]
        assert sent[-1]["choices"][0]["finish_reason"] == finish


def test_an_assistant_turns_reasoning_reaches_the_template(live):
    engine = live[2]
    template = ("{% for m in messages %}[{{ m.role }}|{{ m.reasoning_content or '-' }}|{{ m.reasoning or '-' }}|"
                "{{ m.content }}]{% endfor %}")
    prompts = Prompts(engine, template)
    sent = [ChatMessage(role="user", content="q"), ChatMessage(role="assistant", content="a", reasoning="r1"),
            ChatMessage(role="assistant", content="b", reasoning_content="r2")]
    text = engine.tokenizer.decode(prompts.render(prompts.messages(sent), False))
    assert text == "[user|-|-|q][assistant|r1|r1|a][assistant|r2|r2|b]"


def test_the_config_names_every_parser_and_refuses_others():
    assert set(REASONING_PARSERS) == {"deepseek_r1", "qwen3"}
    for name in REASONING_PARSERS:
        ReasoningParser(name)
    with pytest.raises(ConfigError, match="server.reasoning_parser='r1'"):
        ServerConfig(reasoning_parser="r1")


@pytest.fixture(scope="module")
def live():
    engine = Engine(EngineConfig(compile="false", max_batch_size=4, max_seq_len=512,
                                 adapters=AdapterConfig(dir="demo")))
    with httpx.Client(timeout=60) as client, \
            in_process_server(engine, ServerConfig(reasoning_parser="deepseek_r1")) as (base, _):
        yield client, base, engine


def test_on_a_server_the_answer_carries_its_reasoning(live):
    client, base, _ = live
    body = {"model": "demo-r8", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12,
            "temperature": 0}
    message = client.post(base + "/v1/chat/completions", json=body).json()["choices"][0]["message"]
    # the tiny model never closes a <think> block: deepseek_r1 reads its whole output as reasoning
    assert message["content"] is None and message["reasoning"]
    with client.stream("POST", base + "/v1/chat/completions", json={**body, "stream": True}) as s:
        deltas = [json.loads(ln[6:])["choices"][0]["delta"] for ln in s.iter_lines() if ln.startswith("data: {")]
    assert "".join(d.get("reasoning", "") for d in deltas) == message["reasoning"]
    assert not any(d.get("content") for d in deltas)
    constrained = {**body, "structured_outputs": {"regex": "[a-z]{5}"}}  # a grammar's output is all answer
    message = client.post(base + "/v1/chat/completions", json=constrained).json()["choices"][0]["message"]
    assert len(message["content"]) == 5 and "reasoning" not in message


def test_include_reasoning_false_and_content_of_an_output_that_did_not_think(live):
    client, base, _ = live
    body = {"model": "demo-r8", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0}
    message = client.post(base + "/v1/chat/completions", json={**body, "include_reasoning": False}).json()
    assert message["choices"][0]["message"] == {"role": "assistant", "content": None, "reasoning": None}
    texts = choices.TokenTexts(None)
    empty = RequestOutput("r", [5], [5], True, FinishReason.STOP, text="", new_text="")
    plain, *_ = choices.chat_choice(empty, texts, [1], reasoning=ReasoningParser("qwen3"))
    assert plain == {"content": "", "reasoning": None}  # nothing thought: an empty answer is "", as without a parser
    cut, *_ = choices.chat_choice(replace(empty, text="<think>x"), texts, [1], reasoning=ReasoningParser("qwen3"))
    assert cut == {"content": None, "reasoning": "x"}
