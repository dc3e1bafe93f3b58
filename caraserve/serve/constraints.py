"""What a request body asks its output to be: a structured output (OpenAI's response_format,
vLLM's structured_outputs and its older guided_* fields), or a forced tool call.

A forced tool call (tool_choice "required", or a named function, as OpenAI's and vLLM's APIs
take them) is a structured output too: the grammar makes the output the call, a JSON object of
the function's parameters (named) or a JSON list of one or more {"name", "parameters"} objects
of the listed tools (required), so no parser of the model's own tool-call syntax is needed, and
any model can be made to call. The answer then carries them as `tool_calls`. tool_choice "auto"
would need such a parser, and the protocol refuses it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from caraserve.request import RequestError
from caraserve.structured_output import StructuredOutputs

NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}  # OpenAI's: no parameters


@dataclass(frozen=True)
class ForcedTools:
    """A chat call's forced tool calls: `name` the named function's (None: tool_choice
    "required": calls of any listed tool, at most one unless `parallel`); `tools` each listed
    function's (name, parameters schema as JSON text); `new_id` makes a call's id (a tool
    parser's own form where the server has one: Mistral's templates check theirs)."""

    tools: tuple[tuple[str, str], ...]
    name: str | None
    parallel: bool = True
    new_id: Callable[[], str] = field(default=lambda: f"chatcmpl-tool-{uuid.uuid4().hex}", compare=False)

    @classmethod
    def of(cls, body, new_id: Callable[[], str] | None = None) -> ForcedTools | None:
        """The body's forced calls, None when it forces none; RequestError when its tools and
        tool_choice do not make one."""
        choice = getattr(body, "tool_choice", None)
        if choice in (None, "none", "auto"):
            return None
        name = choice["function"]["name"] if isinstance(choice, dict) else None
        tools = []
        for i, tool in enumerate(body.tools or ()):
            function = tool.get("function") if tool.get("type", "function") == "function" else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise RequestError(f"tools[{i}]: a tool is {{'type': 'function', 'function': {{'name': ..., "
                                   "'parameters': {...}}}")
            parameters = function.get("parameters", NO_PARAMETERS)
            if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
                raise RequestError(f"tools[{i}].function.parameters must be a JSON schema of an object (the "
                                   "arguments)")
            if function["name"] in dict(tools):
                raise RequestError(f"tools[{i}]: a second function named {function['name']!r}")
            tools.append((function["name"], json.dumps(parameters)))
        if not tools:
            raise RequestError(f"tool_choice {choice!r} needs tools to call")
        if name is not None and name not in dict(tools):
            raise RequestError(f"tool_choice names function {name!r}, which is not among the tools "
                               f"({', '.join(n for n, _ in tools)})")
        if getattr(body, "echo", False):
            raise RequestError("echo cannot be combined with a forced tool call (the answer is the call)")
        return cls(tuple(tools), name, getattr(body, "parallel_tool_calls", True) is not False,
                   **({} if new_id is None else {"new_id": new_id}))

    def spec(self) -> StructuredOutputs:
        """The grammar of the output: the named function's arguments, or the list of calls, whose
        functions' definitions ($defs, definitions) move to the list's root, where their
        references ("#/$defs/...") point (RequestError when two functions define one name apart)."""
        if self.name is not None:  # (compact JSON: no whitespace for a weak model to loop on)
            return StructuredOutputs(json=dict(self.tools)[self.name], disable_any_whitespace=True)
        calls, shared = [], {}
        for name, text in self.tools:
            parameters = json.loads(text)
            for key in ("$defs", "definitions"):
                for ref, schema in (parameters.pop(key, None) or {}).items():
                    if shared.setdefault(key, {}).setdefault(ref, schema) != schema:
                        raise RequestError(f"tools: two functions define {key}/{ref} differently (function {name!r})")
            calls.append({"type": "object", "properties": {"name": {"type": "string", "enum": [name]},
                                                           "parameters": parameters},
                          "required": ["name", "parameters"], "additionalProperties": False})
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}, **shared}
        if not self.parallel:
            schema["maxItems"] = 1
        return StructuredOutputs(json=schema, disable_any_whitespace=True)

    def calls(self, text: str) -> list[dict]:
        """The output's whole calls in OpenAI's form ({"id", "type": "function", "function":
        {"name", "arguments": JSON text}}): a named function's one call, its arguments as the
        model wrote them (cut short when max_tokens or a stop string cut them, as vLLM's); of
        tool_choice "required"'s list, the calls it holds whole."""
        if self.name is not None:
            pairs = [(self.name, text.strip())]
        else:
            pairs = [(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in whole_calls(text)]
        return [{"id": self.new_id(), "type": "function", "function": {"name": name, "arguments": arguments}}
                for name, arguments in pairs]

    def finish_reason(self, finish: str) -> str:
        """OpenAI's: "tool_calls" when tool_choice "required"'s list ended; a named function's
        call, and a list cut short, finish with their output's own reason ("stop", "length")."""
        return "tool_calls" if self.name is None and finish == "stop" else finish


def whole_calls(text: str) -> list[dict]:
    """The whole JSON values at the start of a JSON list's text so far ('[{...}, {...}, {"na'
    holds two): what a stream of tool_choice "required" can send, and all that a cut list holds."""
    decoder, at, values = json.JSONDecoder(), text.find("[") + 1, []
    while at > 0:
        while at < len(text) and text[at] in " \t\r\n,":
            at += 1
        try:
            value, at = decoder.raw_decode(text, at)
        except ValueError:
            break
        values.append(value)
    return values


def structured_outputs(body) -> StructuredOutputs | None:
    """The body's structured output, from whichever field names it: response_format (OpenAI's:
    type text, json_object or json_schema with json_schema.schema), structured_outputs (vLLM's),
    guided_json / guided_regex / guided_choice / guided_grammar (vLLM's older names), or a forced
    tool call (ForcedTools). More than one is a RequestError, as is a form this server does not
    serve."""
    given = {}
    if body.response_format is not None:
        kind, spec = body.response_format.get("type"), body.response_format.get("json_schema")
        if kind == "json_object":
            given["response_format"] = {"json_object": True}
        elif kind == "json_schema":
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict | bool):
                raise RequestError("response_format: type 'json_schema' needs json_schema.schema, a JSON schema")
            if spec["schema"] is False:
                raise RequestError("response_format: json_schema.schema false allows no output at all")
            given["response_format"] = {"json": spec["schema"] if spec["schema"] is not True else {}}
        elif kind != "text":
            raise RequestError(f"response_format: type {kind!r} is not supported (text, json_object, json_schema)")
    if body.structured_outputs is not None:
        given["structured_outputs"] = body.structured_outputs
    for name, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                       ("guided_grammar", "grammar")):
        if getattr(body, name) is not None:
            given[name] = {kind: getattr(body, name)}
    forced = ForcedTools.of(body)
    if forced is not None:
        given["tool_choice"] = forced.spec()
    if len(given) > 1:
        raise RequestError(f"structured outputs: give one of response_format, structured_outputs, the guided_* "
                           f"fields and a forced tool_choice (got {', '.join(given)})")
    if body.guided_decoding_backend not in (None, "auto", "xgrammar"):
        raise RequestError(f"guided_decoding_backend {body.guided_decoding_backend!r} is not served here (xgrammar)")
    return StructuredOutputs.of(next(iter(given.values()))) if given else None
