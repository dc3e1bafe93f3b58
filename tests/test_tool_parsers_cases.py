"""Tool-call parsing cases beyond the main cases': hermes reads a
call's "parameters" as its arguments, a Mistral list with one item that is not a call stays
content whole, and a pythonic call with **kwargs (no argument names) is no call."""

from __future__ import annotations

import random

import pytest

from caraserve.serve.tool_parsers import Call, ToolParser


def parsed(name: str, text: str) -> tuple[str, list[Call]]:
    """The whole parse, checked to equal the streamed one in pieces of every size."""
    whole = ToolParser(name).parse(text)
    rng = random.Random(len(text))
    for cut in [list(range(1, len(text)))] + [sorted(rng.sample(range(1, len(text)), k)) for k in (1, 3, 8)]:
        stream, sent, got = ToolParser(name).stream(), "", []
        for a, b in zip([0, *cut], [*cut, len(text)]):
            more, new = stream.feed(text[a:b])
            sent, got = sent + more, got + new
        more, new = stream.finish()
        assert (sent + more, got + new) == whole, cut
    return whole


def test_hermes_takes_parameters_as_the_arguments():
    text = '<tool_call>{"name": "get_weather", "parameters": {"city": "Paris"}}</tool_call>'
    assert parsed("hermes", text) == ("", [Call("get_weather", '{"city": "Paris"}')])
    # "arguments" wins when both are there
    both = '<tool_call>{"name": "now", "arguments": {"a": 1}, "parameters": {"b": 2}}</tool_call>'
    assert parsed("hermes", both) == ("", [Call("now", '{"a": 1}')])


@pytest.mark.parametrize("bad_item", ['{"arguments": {}}', "5", '{"name": "x", "arguments": [1]}'])
def test_a_mistral_list_with_an_item_that_is_no_call_stays_content_whole(bad_item):
    text = f'[TOOL_CALLS][{{"name": "now", "arguments": {{}}}}, {bad_item}]'
    assert parsed("mistral", text) == (text, [])


@pytest.mark.parametrize("text", ["[f(**{'a': 1})]", "[now(), f(**{'city': 'Paris'})]"])
def test_a_pythonic_call_with_unnamed_keyword_arguments_is_content(text):
    assert parsed("pythonic", text) == (text, [])
