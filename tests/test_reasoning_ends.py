"""Reasoning-parser ends of output the main cases leave out: an
output that ends while it may still open or close the <think> block keeps that text, and the
tool parser after the reasoning parser is told the output ended."""

from __future__ import annotations

import pytest
from test_reasoning import split


@pytest.mark.parametrize("parser, text, reasoning, content", [
    ("qwen3", "<th", "", "<th"),  # ended before the tag was whole: it is the answer
    ("qwen3", "  ", "", "  "),
    ("qwen3", " <think", "", " <think"),
    ("deepseek_r1", "<th", "<th", ""),  # thinking from the start: it is reasoning
    ("deepseek_r1", "  ", "  ", ""),
])
def test_an_output_that_ends_as_it_may_open_the_block_keeps_its_text(parser, text, reasoning, content):
    assert split(parser, [text]) == (reasoning, content, [])
    assert split(parser, list(text) + [""]) == (reasoning, content, [])


@pytest.mark.parametrize("parser, text, reasoning", [
    ("deepseek_r1", "so x </th", "so x </th"),
    ("deepseek_r1", "hmm <", "hmm <"),
    ("qwen3", "<think>a </think", "a </think"),
])
def test_an_output_that_ends_as_it_may_close_the_block_keeps_its_reasoning(parser, text, reasoning):
    assert split(parser, [text]) == (reasoning, "", [])
    assert split(parser, list(text) + [""]) == (reasoning, "", [])


@pytest.mark.parametrize("text, content", [
    ("Sure <tool", "Sure <tool"),  # could have begun a call: sent once the output ended
    ("<think>x</think>ok <tool_ca", "ok <tool_ca"),
    ('<think>x</think><tool_call>{"name": "now", "argu', '<tool_call>{"name": "now", "argu'),  # cut call
    ("\n", "\n"),  # no calls: whitespace too is content
])
def test_with_a_tool_parser_the_end_of_the_output_reaches_it(text, content):
    reasoning = "x" if text.startswith("<think>") else ""
    assert split("qwen3", [text], "hermes") == (reasoning, content, [])
    assert split("qwen3", list(text) + [""], "hermes") == (reasoning, content, [])


def test_a_whole_call_cut_before_its_closing_tag_is_a_call_after_the_reasoning():
    from caraserve.serve.tool_parsers import Call

    text = '<think>x</think><tool_call>{"name": "now", "arguments": {}}'
    assert split("qwen3", [text], "hermes") == ("x", "", [Call("now", "{}")])
