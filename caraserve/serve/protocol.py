"""The OpenAI-compatible wire schema, shared by the server and the Ray ingress.

Request bodies are pydantic models (unknown fields are ignored, as OpenAI's API does); responses
are plain dicts shaped as OpenAI's and vLLM's so existing clients work unchanged.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Strict types: JSON true is not 1, "0.5" is not a number, 1.0 is not a token id (as OpenAI's
# API). Ranges are checked by SamplingParams and the engine, with the field named.
_STRICT = ConfigDict(extra="ignore", strict=True)


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: every chunk carries its choice's usage so far


class _Sampling(BaseModel):
    # Fields not declared are kept aside (model_extra), where `_only_served_options` looks for the
    # known ones this server does not serve (`_NOT_SERVED`); the others are ignored.
    model_config = ConfigDict(extra="allow", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """A field sent as JSON null takes its default, as OpenAI's and vLLM's servers read it."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    model: str | None = None  # None: the served base model (as vLLM's server takes it)
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: bool | int | None = None
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None  # token id (as a string, as OpenAI's) -> bias
    # vLLM's extensions
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    top_k: int = -1
    min_p: float = 0.0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True  # false: special tokens' text is in the output text (vLLM's)
    allowed_token_ids: list[int] | None = None
    truncate_prompt_tokens: int | None = None  # keep the prompt's last k tokens (-1: the context length)
    return_tokens_as_token_ids: bool = False  # logprobs name tokens "token_id:{id}"
    return_token_ids: bool = False  # the answer carries prompt and output token ids (serve.answer_extras)
    prompt_logprobs: int | None = None  # each prompt token's logprob, rank and k alternatives (serve.prompt_logprobs)
    cache_salt: str | None = None
    priority: int = 0  # lower first, with scheduler.policy=priority (vLLM's)
    bad_words: list[str] | None = None  # words never generated (vLLM's)
    use_beam_search: bool = False  # vLLM's: n is the beam width (caraserve.serve.beams)
    length_penalty: float = 1.0  # a beam's score is its logprob over its length ** this (beam search)
    # vLLM's, accepted and type-checked but without effect here: a fast tokenizer's decoder puts
    # nothing between special tokens (as in vLLM's detokenizer for fast tokenizers)
    spaces_between_special_tokens: bool = True
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older
    # guided_* fields (at most one of them; `structured_outputs` reads them)
    response_format: dict | None = None
    structured_outputs: dict | None = None
    guided_json: str | dict | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # xgrammar (or auto) is the one served
    # Tools (chat only; _tools_only_listed). What this server does not serve of them is refused by
    # name: a client relying on tools must not get free text back as if they had applied.
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    functions: list[dict] | None = None  # OpenAI's older form of tools
    function_call: str | dict | None = None
    best_of: int | None = None  # only as many as n: every completion made is returned

    @field_validator("function_call")
    @classmethod
    def _no_function_call(cls, value):
        if value != "none":
            raise ValueError(f"{value!r} is not supported: send tools with tool_choice 'required' or a named function "
                             "for a forced call (function_call takes only 'none')")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_form(cls, value):
        named = isinstance(value, dict) and value.get("type") == "function" and isinstance(
            value.get("function"), dict) and isinstance(value["function"].get("name"), str)
        if value not in ("none", "auto", "required") and not named:
            raise ValueError(f"{value!r} is not a tool_choice: 'none', 'auto', 'required' or "
                             "{'type': 'function', 'function': {'name': ...}}")
        return value

    @model_validator(mode="after")
    def _tools_only_listed(self) -> _Sampling:
        """Tools are taken on chat completions, where the chat template renders them into the
        prompt (as vLLM's server does): 'none', a call forced through a grammar ('required', a named
        function: caraserve.serve.constraints), or 'auto', OpenAI's default with tools, which the
        service serves when it has a parser of the model's own call syntax (server.tool_call_parser)."""
        if (self.tools or self.functions) and not isinstance(self, ChatCompletionRequest):
            raise ValueError("tools and functions are taken on chat completions only")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError(f"tool_choice {self.tool_choice!r} needs tools (as vLLM's)")
        if self.functions and self.function_call != "none":
            raise ValueError("functions are taken with function_call 'none' only (for a forced call, send tools "
                             "with tool_choice 'required' or a named function)")
        return self

    def continuous_usage(self, include_usage: bool) -> bool:
        """Whether every streamed chunk carries its choice's usage so far (vLLM's
        stream_options.continuous_usage_stats, with include_usage)."""
        return include_usage and self.stream_options is not None and self.stream_options.continuous_usage_stats

    def template_tools(self) -> list[dict] | None:
        """The tools (or the older `functions`, as tools) the chat template renders, or None."""
        if self.tools:
            return self.tools
        return [{"type": "function", "function": f} for f in self.functions] if self.functions else None

    @model_validator(mode="after")
    def _only_served_options(self) -> _Sampling:
        extra = self.model_extra or {}
        for name, (harmless, hint) in _NOT_SERVED.items():
            value = extra.get(name)
            if value is not None and value not in harmless:
                raise ValueError(f"{name} is not supported by this server{hint}")
        if self.truncate_prompt_tokens is not None and not (self.truncate_prompt_tokens == -1
                                                            or self.truncate_prompt_tokens >= 1):
            raise ValueError(f"truncate_prompt_tokens must be -1 (the context length) or >= 1, "
                             f"got {self.truncate_prompt_tokens}")
        return self

    @model_validator(mode="after")
    def _stream_options_with_stream(self) -> _Sampling:
        if self.stream_options is not None and self.stream_options.model_fields_set and not self.stream:
            raise ValueError("stream_options can only be given with stream: true")
        if self.prompt_logprobs is not None and self.stream:
            raise ValueError("prompt_logprobs are not given with stream: true (as vLLM's)")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of={self.best_of} is not supported: each of the n={self.n} completions is "
                             "returned (best_of may only equal n)")
        return self


# Fields of vLLM's and OpenAI's APIs that would change the answer and are not served here:
# field -> (the values that ask for nothing this server lacks, a hint for the others). Those that
# change no answer (prediction) are ignored.
_NOT_SERVED = {
    "logits_processors": (([],), ""),
    "vllm_xargs": (({},), ""),
    "kv_transfer_params": (({},), ""),
    "mm_processor_kwargs": (({},), " (this model reads text)"),
    "chat_template": ((), ": the server's template applies (server.chat_template)"),
    "documents": (([],), ""),
    "prompt_embeds": ((), ": send the prompt as text or token ids"),
    "detokenize": ((True,), " (answers always carry their text)"),
    "modalities": ((["text"],), " other than [\"text\"] (this model writes text)"),
    "audio": ((), " (this model writes text)"),
    "web_search_options": ((), " (no web search here)"),
    "guided_whitespace_pattern": ((), ": JSON's whitespace is xgrammar's (structured_outputs.disable_any_whitespace "
                                      "takes it out)"),
}


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    suffix: str | None = None  # refused when given (as vLLM's): no insertion model here
    add_special_tokens: bool = True  # a text prompt's BOS (vLLM's)

    @model_validator(mode="after")
    def _one_prompt_scoring(self) -> CompletionRequest:
        """echo with logprobs scores the prompt with `logprobs` alternatives; prompt_logprobs may only agree."""
        if self.echo and self.logprobs is not None and self.prompt_logprobs not in (None, self.logprobs):
            raise ValueError(f"prompt_logprobs={self.prompt_logprobs} with echo and logprobs={self.logprobs}: the "
                             "prompt is scored once, so give them the same number (or leave prompt_logprobs out)")
        return self


class ContentPart(BaseModel):
    model_config = _STRICT

    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> ContentPart:
        if self.type != "text":
            raise ValueError(f"content parts of type {self.type!r} are not supported: this model reads text parts")
        if self.text is None:
            raise ValueError("a text content part needs its 'text'")
        return self


class FunctionCall(BaseModel):
    model_config = _STRICT

    name: str
    arguments: str  # JSON text, as OpenAI's API sends it


class ToolCall(BaseModel):
    """A tool call of an earlier assistant turn, as a client sends the history back."""

    model_config = _STRICT

    id: str
    type: str = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = _STRICT

    role: str
    content: str | list[ContentPart] | None = None
    # a conversation with tools: an assistant turn's calls, a tool turn's answer to one of them
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    reasoning: str | None = None  # an assistant turn's thinking, sent back (vLLM's; older: reasoning_content)
    reasoning_content: str | None = None

    def text(self) -> str:
        """The message's text (the text parts of a multi-part content, one a line, as vLLM joins them)."""
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    top_logprobs: int | None = None
    echo: bool = False  # vLLM's: the answer begins with the last message's content when it is the assistant's
    # vLLM's: how the chat template renders the messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # the answer continues the last (assistant) message
    chat_template_kwargs: dict[str, Any] | None = None  # more variables for the template
    reasoning_effort: str | None = None  # OpenAI's; a template variable (as vLLM passes it)
    include_reasoning: bool = True  # vLLM's: false leaves a reasoning parser's reasoning out of the answer
    parallel_tool_calls: bool = True  # false: tool_choice "required" makes one call
    add_special_tokens: bool = False  # the template writes BOS itself

    @model_validator(mode="after")
    def _one_way_to_end(self) -> ChatCompletionRequest:
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError("continue_final_message: true needs add_generation_prompt: false (the answer continues "
                             "the last message rather than starting a new one)")
        return self


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages through the chat template."""

    model_config = _STRICT

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[dict] | None = None  # with messages: rendered by the chat template (as vLLM's)
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages (as vLLM's)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False  # each token's string too (the tokenizer's own pieces), as vLLM's

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either 'prompt' or 'messages'")
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError("continue_final_message: true needs add_generation_prompt: false (the answer continues "
                             "the last message rather than starting a new one)")
        return self


class DetokenizeRequest(BaseModel):
    model_config = _STRICT

    model: str | None = None
    tokens: list[int]


class LoadLoraRequest(BaseModel):
    model_config = _STRICT

    lora_name: str
    lora_path: str


class UnloadLoraRequest(BaseModel):
    model_config = _STRICT

    lora_name: str


# Set on a 5xx caused by the request itself (its own part of a step failed): a router returns it
# to the client as is, without retrying elsewhere or counting it against the replica.
FAULT_HEADER = "x-caraserve-fault"


def error_body(message: str, type_: str, code: int, param: str | None = None) -> dict:
    """OpenAI's error object; `param`: the request field at fault, where one is."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


_REQUEST_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


def valid_request_id(rid: str) -> bool:
    return _REQUEST_ID.fullmatch(rid) is not None


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; cached_tokens: prompt tokens served from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_response(rid: str, model: str, choices: list[tuple[str, str | None, dict | None, str | int | None]],
                        prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """choices: (text, finish_reason, logprobs, stop_reason) of each of the n completions
    (stop_reason: vLLM's, the stop string or stop token id that ended the completion)."""
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": text, "finish_reason": finish, "logprobs": logprobs,
                         "stop_reason": stop_reason}
                        for i, (text, finish, logprobs, stop_reason) in enumerate(choices)],
            "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}


def completion_chunk(rid: str, model: str, text: str, finish: str | None, index: int = 0,
                     logprobs: dict | None = None, created: int | None = None,
                     stop_reason: str | int | None = None) -> dict:
    """created: the stream's (one value for all its chunks, as OpenAI's); default now."""
    return {"id": rid, "object": "text_completion", "created": int(time.time()) if created is None else created,
            "model": model,
            "choices": [{"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs,
                         "stop_reason": stop_reason}]}


def chat_response(rid: str, model: str, choices: list[tuple], prompt_tokens: int, completion_tokens: int,
                  cached_tokens: int = 0) -> dict:
    """choices: (message, finish_reason, logprobs, stop_reason) of each of the n completions; a
    message is {"content"} and maybe "tool_calls" and "reasoning" (content may then be None)."""
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", **message},
                         "finish_reason": finish, "logprobs": logprobs, "stop_reason": stop_reason}
                        for i, (message, finish, logprobs, stop_reason) in enumerate(choices)],
            "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None, index: int = 0,
               logprobs: dict | None = None, created: int | None = None,
               stop_reason: str | int | None = None) -> dict:
    """created: the stream's (one value for all its chunks, as OpenAI's); default now."""
    return {"id": rid, "object": "chat.completion.chunk",
            "created": int(time.time()) if created is None else created, "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs,
                         "stop_reason": stop_reason}]}


def model_card(name: str, root: str, parent: str | None = None, **extra) -> dict:
    card: dict[str, Any] = {"id": name, "object": "model", "created": 0, "owned_by": "caraserve",
                            "root": root, "parent": parent}
    card.update(extra)
    return card

