"""A thinking model's reasoning apart from its answer (vLLM's `--reasoning-parser`; here
`server.reasoning_parser`), for models that think in <think> ... </think>:

  deepseek_r1  the output starts thinking (the chat template opened <think>, which the output may
               repeat) and thinks until </think>; an output without </think> is all reasoning
               (cut short while thinking). DeepSeek-R1, QwQ, Qwen3 "Thinking-2507" and other
               models whose template opens the block.
  qwen3        the output thinks only when it opens with <think> (Qwen3's template with
               enable_thinking true; with false the template closes the block itself), until
               </think>; an output that does not open with <think> is all answer.

The answer's `reasoning` (vLLM's field, OpenAI's guidance for chat completions) is the text
inside the block, `content` what follows </think> (its leading whitespace dropped), and a tool
parser reads only the content. `OutputSplitter` reads an output as it grows, so a streamed
answer and a whole one are the same function of the text.
"""

from __future__ import annotations

from caraserve.serve.tool_parsers import Call, ToolParser

START, END = "<think>", "</think>"


def _holdback(text: str, marker: str) -> int:
    """How many characters at text's end could begin marker."""
    return max((k for k in range(1, len(marker)) if text.endswith(marker[:k])), default=0)


class ThinkStream:
    """One output's reasoning and content as its text grows: feed -> (reasoning, content) to send."""

    def __init__(self, thinks_first: bool, keep: bool = True):
        self.thinks_first = thinks_first  # deepseek_r1: thinking unless told otherwise
        self.keep = keep  # false: the reasoning is read and dropped (include_reasoning false)
        self.state = "start"  # -> "thinking" -> "after" (whitespace after </think>) -> "answer"
        self.buf = ""
        self.thought = False  # any of the output was inside the block

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        reasoning, content = self._feed(text, final)
        return (reasoning if self.keep else ""), content

    def _feed(self, text: str, final: bool) -> tuple[str, str]:
        self.buf += text
        reasoning = ""
        if self.state == "start":
            opened = self.buf.lstrip()
            if opened.startswith(START):
                self.buf, self.state = opened[len(START):], "thinking"
            elif START.startswith(opened) and not final:  # (whitespace, "<th": may still open it)
                return "", ""
            else:
                self.state = "thinking" if self.thinks_first else "answer"
        if self.state == "thinking":
            self.thought = True
            end = self.buf.find(END)
            if end < 0:
                keep = 0 if final else _holdback(self.buf, END)
                reasoning, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                return reasoning, ""
            reasoning, self.buf, self.state = self.buf[:end], self.buf[end + len(END):], "after"
        if self.state == "after":
            self.buf = self.buf.lstrip()
            if not self.buf:
                return reasoning, ""
            self.state = "answer"
        content, self.buf = self.buf, ""
        return reasoning, content


class ReasoningParser:
    """server.reasoning_parser's syntax."""

    def __init__(self, name: str, keep: bool = True):
        if name not in ("deepseek_r1", "qwen3"):
            raise ValueError(f"reasoning_parser {name!r} is not one of deepseek_r1, qwen3")
        self.name, self.keep = name, keep

    def stream(self) -> ThinkStream:
        return ThinkStream(self.name == "deepseek_r1", self.keep)

    def hidden(self) -> ReasoningParser:
        """This parser dropping the reasoning from the answer (vLLM's include_reasoning false)."""
        return ReasoningParser(self.name, keep=False)


class OutputSplitter:
    """One chat choice's text as it grows, through a reasoning parser and a tool parser (either
    may be None): feed -> (reasoning, content, calls) to send."""

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolParser | None):
        self.think = reasoning.stream() if reasoning is not None else None
        self.calls = tools.stream() if tools is not None else None

    @property
    def called(self) -> int:
        return self.calls.called if self.calls is not None else 0

    @property
    def thought(self) -> bool:
        return self.think is not None and self.think.thought

    def feed(self, text: str, final: bool = False) -> tuple[str, str, list[Call]]:
        reasoning, content = self.think.feed(text, final) if self.think is not None else ("", text)
        if self.calls is None:
            return reasoning, content, []
        content, calls = self.calls.feed(content, final)
        return reasoning, content, calls
