"""Tool calls written in a model's own syntax, for tool_choice "auto" (vLLM's
`--tool-call-parser`; here `server.tool_call_parser`). The model is free to answer in text or to
call; the parser finds the calls in what it wrote:

  hermes       <tool_call>{"name": ..., "arguments": {...}}</tool_call>, any number, anywhere
               (Hermes 2/3, Qwen 2.5/3 and most models fine-tuned on their template)
  llama3_json  {"name": ..., "parameters": {...}} at the start of the output (after Llama 3.1's
               <|python_tag|> when the text keeps it), several separated by ";"
  mistral      [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...], or the newer
               [TOOL_CALLS]name[ARGS]{...} per call; ids of 9 letters and digits, as Mistral's
               templates check when the calls come back in the conversation
  pythonic     [get_weather(city="Paris"), now()] as the whole output (Llama 3.2/4 and others)

One `CallStream` reads an output's text as it grows and tells what is content and what is calls,
so a streamed answer and a whole one are the same function of the text (`parse` feeds it the
whole text at once). The rules: text before a call's start, between calls and after them is
content, but a stretch of only whitespace (and, for llama3_json, ";") beside a call is not;
text that may still become a call's start is held back; a call that does not parse (bad JSON, no
name, arguments not an object, cut by max_tokens) stays content, as the model wrote it, so no
text is lost. A hermes block the output ended in before </tool_call> (a stop string on it, EOS)
is a call when its JSON is whole, as vLLM's reads it.
"""

from __future__ import annotations

import ast
import copy
import json
import re
import secrets
import string
import uuid
from dataclasses import dataclass

from caraserve.serve.http import BadRequest


@dataclass(frozen=True)
class Call:
    name: str
    arguments: str  # JSON text of an object


def _call(name, arguments) -> Call | None:
    """A call from a parsed name and arguments (an object, JSON text of one, or null: none), or None."""
    try:
        if isinstance(arguments, str):
            arguments = json.loads(arguments)
        arguments = {} if arguments is None else arguments
        if not isinstance(name, str) or not name or not isinstance(arguments, dict):
            return None
        return Call(name, json.dumps(arguments, ensure_ascii=False, allow_nan=False))
    except (ValueError, RecursionError):  # not JSON, NaN / Infinity (JSON has not), nested past Python's stack
        return None


class Closing:
    """Where the bracket that opens a growing text's value (at `at`) closes: one scan, resumed as
    the text grows (quoted strings and their escapes skipped), so each character of a call is
    read once however many pieces it comes in. The value is then parsed once."""

    def __init__(self, at: int, quotes: str = '"'):
        self.pos, self.depth, self.quote, self.escaped, self.quotes = at, 0, "", False, quotes

    def end(self, text: str) -> int | None:
        """Just past the closing bracket, or None while the value is still open."""
        for i in range(self.pos, len(text)):
            c = text[i]
            if self.quote:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == self.quote:
                    self.quote = ""
            elif c in self.quotes:
                self.quote = c
            elif c in "[{(":
                self.depth += 1
            elif c in "]})":
                self.depth -= 1
                if self.depth <= 0:
                    self.pos = i + 1
                    return i + 1
        self.pos = len(text)
        return None


def _skip(text: str, at: int) -> int:
    while at < len(text) and text[at] in " \t\r\n":
        at += 1
    return at


class Format:
    """One syntax. `start` finds where a call starts; `take` reads the call at the start of a text
    as (characters it spans, its calls, or None when they do not parse), or None while the text
    may still grow into it (final: the output has ended; memo: a dict of this call's, for a scan
    to resume where the text given before ended)."""

    markers: tuple[str, ...] = ()  # text that starts a call; may be special tokens of a tokenizer
    separators = " \t\r\n"  # between calls: not content

    def start(self, text: str, clean: bool) -> int:
        """Where the first call in text starts (-1: none). clean: nothing but separators came
        since the output's start or the last call."""
        found = [i for i in (text.find(m) for m in self.markers) if i >= 0]
        return min(found, default=-1)

    def holdback(self, text: str, clean: bool) -> int:
        """How many characters at text's end could begin a call's start."""
        return max((k for m in self.markers for k in range(1, len(m)) if text.endswith(m[:k])), default=0)

    def take(self, text: str, final: bool, memo: dict) -> tuple[int, list[Call] | None] | None:
        raise NotImplementedError

    def call_id(self) -> str:
        return f"chatcmpl-tool-{uuid.uuid4().hex}"

    @staticmethod
    def _value(text: str, at: int, final: bool, memo: dict, opener: str, quotes: str = '"'):
        """(end, the value's text) of the bracketed value at text[at] (after whitespace); (at,
        None) when something else is there; None while it may still come."""
        at = _skip(text, at)
        if at == len(text):
            return (at, None) if final else None
        if text[at] != opener:
            return at, None
        end = memo.setdefault("closing", Closing(at, quotes)).end(text)
        if end is None:
            return (len(text), None) if final else None
        return end, text[at:end]


class Hermes(Format):
    markers, end = ("<tool_call>",), "</tool_call>"

    def take(self, text, final, memo):
        j = text.find(self.end, memo.get("pos", len(self.markers[0])))
        if j < 0:
            memo["pos"] = max(len(self.markers[0]), len(text) - len(self.end))
            if not final:
                return None
            j = len(text)  # an output that ended (a stop string, EOS) before the closing tag: its call if whole
        body = _json(text[len(self.markers[0]):j])
        call = _call(body.get("name"), body.get("arguments", body.get("parameters", {}))) \
            if isinstance(body, dict) else None
        return min(j + len(self.end), len(text)), None if call is None else [call]


def _json(value: str | None):
    try:
        return None if value is None else json.loads(value)
    except (ValueError, RecursionError):
        return None


class Llama3Json(Format):
    markers, separators = ("<|python_tag|>",), " \t\r\n;"

    def start(self, text, clean):
        if clean:  # a call's JSON object can only open the output, or follow a call
            stripped = text.lstrip(self.separators)
            if stripped.startswith("{"):
                return len(text) - len(stripped)
        return super().start(text, clean)

    def take(self, text, final, memo):
        taken = self._value(text, len(self.markers[0]) if text.startswith(self.markers[0]) else 0, final, memo, "{")
        if taken is None:
            return None
        end, body = taken[0], _json(taken[1])
        call = _call(body.get("name"), body.get("parameters", body.get("arguments", {}))) \
            if isinstance(body, dict) else None
        return end, None if call is None else [call]


class Mistral(Format):
    markers, args = ("[TOOL_CALLS]",), "[ARGS]"

    def take(self, text, final, memo):
        at = _skip(text, len(self.markers[0]))
        if at == len(text) and not final:
            return None
        if text[at:at + 1] == "[":  # [TOOL_CALLS][{"name": ..., "arguments": ...}, ...]
            taken = self._value(text, at, final, memo, "[")
            if taken is None:
                return None
            body = _json(taken[1])
            calls = [_call(c.get("name"), c.get("arguments", {})) if isinstance(c, dict) else None
                     for c in (body if isinstance(body, list) else [None])]
            return taken[0], None if not calls or None in calls else calls
        k = text.find(self.args, memo.get("pos", at))  # [TOOL_CALLS]name[ARGS]{...}
        if k < 0:
            memo["pos"] = max(at, len(text) - len(self.args))
            return (len(text), None) if final else None
        taken = self._value(text, k + len(self.args), final, memo, "{")
        if taken is None:
            return None
        name = text[at:k].strip()
        call = _call(name, _json(taken[1])) if re.fullmatch(r"[\w.\-]+", name) else None
        return taken[0], None if call is None else [call]

    def call_id(self) -> str:  # Mistral's templates refuse a tool_call_id that is not 9 letters/digits
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))


class Pythonic(Format):
    def start(self, text, clean):
        stripped = text.lstrip()
        return len(text) - len(stripped) if clean and stripped.startswith("[") else -1

    def take(self, text, final, memo):
        taken = self._value(text, 0, final, memo, "[", quotes="\"'")
        if taken is None or taken[1] is None:
            return taken
        try:
            return taken[0], _python_calls(ast.parse(taken[1], mode="eval").body)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return taken[0], None


def _python_calls(tree: ast.expr) -> list[Call] | None:
    """[f(a=1), g()]'s calls, None unless every item is a call of a name with literal keyword arguments."""
    if not isinstance(tree, ast.List) or not tree.elts:
        return None
    calls = []
    for item in tree.elts:
        if not (isinstance(item, ast.Call) and isinstance(item.func, ast.Name) and not item.args
                and all(k.arg is not None for k in item.keywords)):
            return None
        try:
            arguments = {k.arg: ast.literal_eval(k.value) for k in item.keywords}
            calls.append(Call(item.func.id, json.dumps(arguments, ensure_ascii=False, allow_nan=False)))
        except (ValueError, TypeError, SyntaxError, RecursionError):  # not a literal, or not JSON's
            return None
    return calls


# (config.TOOL_CALL_PARSERS names these, for the config's check)
FORMATS: dict[str, type[Format]] = {"hermes": Hermes, "llama3_json": Llama3Json, "mistral": Mistral,
                                    "pythonic": Pythonic}


class CallStream:
    """One output's text, fed as it grows: `feed` and, at the end, `finish` each answer (content
    to send, calls to send). See the module docstring for what is which."""

    def __init__(self, fmt: Format, max_calls: int | None = None):
        self.fmt, self.max_calls = fmt, max_calls  # calls past max_calls are dropped (parallel_tool_calls false)
        self.buf = ""  # text read and not decided yet
        self.in_call = False  # buf starts at a call's start
        self.clean = True  # the current stretch (since the output's start or the last call) is only separators
        self.held = ""  # that stretch so far: content only if more than separators follows
        self.called = 0
        self.memo: dict = {}  # the current call's (Format.take)

    def feed(self, text: str, final: bool = False) -> tuple[str, list[Call]]:
        self.buf += text
        content, calls = [], []
        while self.buf:
            if self.in_call:
                taken = self.fmt.take(self.buf, final, self.memo)
                if taken is None:
                    break
                n, got = taken
                raw, self.buf, self.in_call = self.buf[:n], self.buf[n:], False
                if got:
                    got = got if self.max_calls is None else got[:max(0, self.max_calls - self.called)]
                    calls += got
                    self.called += len(got)
                    self.clean, self.held = True, ""
                else:
                    content.append(self._content(raw, force=True))
                continue
            i = self.fmt.start(self.buf, self.clean)
            if i < 0:
                keep = 0 if final else self.fmt.holdback(self.buf, self.clean)
                content.append(self._content(self.buf[:len(self.buf) - keep]))
                self.buf = self.buf[len(self.buf) - keep:]
                break
            content.append(self._content(self.buf[:i]))
            self.buf, self.in_call, self.memo = self.buf[i:], True, {}
        if final and not self.called:  # an output without calls is all content, whitespace too
            content.append(self.held)
            self.held = ""
        return "".join(content), calls

    def finish(self) -> tuple[str, list[Call]]:
        return self.feed("", final=True)

    def _content(self, text: str, force: bool = False) -> str:
        """What of text is sent as content now (a stretch of separators waits)."""
        if not self.clean:
            return text
        if force or text.strip(self.fmt.separators):
            sent, self.held, self.clean = self.held + text, "", False
            return sent
        self.held += text
        return ""


class ToolParser:
    """server.tool_call_parser's syntax, with what it needs of the tokenizer."""

    def __init__(self, name: str, tokenizer=None):
        if name not in FORMATS:
            raise ValueError(f"tool_call_parser {name!r} is not one of {', '.join(FORMATS)}")
        self.name, self.fmt, self.max_calls = name, FORMATS[name](), None
        # a marker the tokenizer holds as a special token is dropped from text that skips them
        self.keeps_special_tokens = tokenizer is not None and any(_special(tokenizer, m) for m in self.fmt.markers)

    def stream(self) -> CallStream:
        return CallStream(self.fmt, self.max_calls)

    def one_call(self) -> ToolParser:
        """This parser keeping an output's first call only (parallel_tool_calls false, as vLLM's)."""
        parser = copy.copy(self)
        parser.max_calls = 1
        return parser

    def parse(self, text: str) -> tuple[str, list[Call]]:
        """(content, calls) of a whole output."""
        s = self.stream()
        content, calls = s.feed(text)
        more, last = s.finish()
        return content + more, calls + last

    @staticmethod
    def finish_reason(called: int, finish: str) -> str:
        """OpenAI's: "tool_calls" when an output that made calls ended by itself; one cut short
        keeps its own reason ("length")."""
        return "tool_calls" if called and finish == "stop" else finish

    def tool_call(self, call: Call) -> dict:
        """A call in OpenAI's form."""
        return {"id": self.fmt.call_id(), "type": "function",
                "function": {"name": call.name, "arguments": call.arguments}}


def _special(tokenizer, text: str) -> bool:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.decode(ids, skip_special_tokens=True) != tokenizer.decode(ids, skip_special_tokens=False)


def auto_tool_parser(body, parser: ToolParser | None) -> ToolParser | None:
    """The parser of a chat call (protocol.ChatCompletionRequest) with tool_choice "auto"
    (OpenAI's default with tools) on a server with `parser` (server.tool_call_parser), None for
    another call; BadRequest when the server has no parser."""
    if not body.tools or body.tool_choice not in (None, "auto"):
        return None
    if parser is None:
        raise BadRequest("tool_choice 'auto' (the default with tools) needs a parser of the model's tool-call "
                         "syntax: start the server with server.tool_call_parser=hermes|llama3_json|mistral|"
                         "pythonic (vLLM's --tool-call-parser). Or send tool_choice 'required' or a named "
                         "function (the output is constrained to the call), or 'none' (the tools reach the "
                         "chat template only)")
    return parser if body.parallel_tool_calls else parser.one_call()
