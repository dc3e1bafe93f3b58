"""From what a caller sends to token ids and back: chat messages through the chat template, and
vLLM's /tokenize and /detokenize. Every input is checked (limits, Unicode, the vocabulary) before
the template or the tokenizer runs; a refusal is a RequestError naming the problem."""

from __future__ import annotations

import json

from caraserve.input_checks import check_prompt_text
from caraserve.request import RequestError
from caraserve.serve import protocol as proto

# apply_chat_template's own arguments: chat_template_kwargs may not set them
_TEMPLATE_ARGS = frozenset({"conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
                            "continue_final_message", "tokenize", "padding", "truncation", "max_length",
                            "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
                            "sanitize_control_tokens"})


def _message(i: int, m: proto.ChatMessage) -> dict:
    """Message i as chat templates take it, as vLLM hands it to them: {"role", "content"} (a text,
    "" for none), with the "name", "tool_call_id" and "tool_calls" a conversation with tools
    carries, each call's arguments read from their JSON text into an object, and an assistant
    turn's thinking as "reasoning" and "reasoning_content"."""
    msg = {"role": m.role, "content": m.text()}
    if m.name is not None:
        msg["name"] = m.name
    if m.tool_call_id is not None:
        msg["tool_call_id"] = m.tool_call_id
    if m.reasoning is not None or m.reasoning_content is not None:  # (templates read either name)
        msg["reasoning"] = msg["reasoning_content"] = m.reasoning if m.reasoning is not None else m.reasoning_content
    if m.tool_calls:
        calls = []
        for j, call in enumerate(m.tool_calls):
            try:
                arguments = json.loads(call.function.arguments)
            except (ValueError, RecursionError) as e:
                raise RequestError(f"messages[{i}].tool_calls[{j}].function.arguments is not JSON text ({e})") from None
            calls.append({"id": call.id, "type": call.type,
                          "function": {"name": call.function.name, "arguments": arguments}})
        msg["tool_calls"] = calls
    return msg


def loops_over_content(template: str) -> bool:
    """Whether a Jinja chat template loops over a message's content: `for part in m['content']` or
    `m.content` (filtered or not), m a name (the loop variable of the messages), or over a name
    set to it first (`set content = m['content']`)."""
    import jinja2
    from jinja2 import nodes

    def content_of_a_name(node) -> bool:
        while isinstance(node, nodes.Filter):
            node = node.node
        if isinstance(node, nodes.Getattr):
            return node.attr == "content" and isinstance(node.node, nodes.Name)
        return (isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and node.arg.value == "content"
                and isinstance(node.node, nodes.Name))

    try:
        ast = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except jinja2.TemplateSyntaxError:
        return False  # (applying it says what is wrong)
    named = {a.target.name for a in ast.find_all(nodes.Assign)
             if isinstance(a.target, nodes.Name) and content_of_a_name(a.node)}
    return any(content_of_a_name(loop.iter) or (isinstance(loop.iter, nodes.Name) and loop.iter.name in named)
               for loop in ast.find_all(nodes.For))


def _extra_bytes(msg: dict) -> int:
    """The size of a message's fields besides its role and content (their JSON text)."""
    extra = {k: v for k, v in msg.items() if k not in ("role", "content")}
    return len(json.dumps(extra, ensure_ascii=False).encode()) if extra else 0


class Prompts:
    def __init__(self, engine, chat_template: str | None):
        self.engine, self.chat_template = engine, chat_template  # chat_template None: the tokenizer's
        self.limits = engine.config.limits
        self._parts: dict[bool, bool] = {}  # _reads_parts, once known (without and with tools)

    def messages(self, messages: list[proto.ChatMessage], with_tools: bool = False) -> list[dict]:
        """The messages as the template takes them (`_message`; with_tools: the request gives
        tools), checked: a template to apply, at most limits.max_chat_messages, valid Unicode
        within limits.max_prompt_bytes."""
        tok, limits = self.engine.tokenizer, self.limits
        if tok is None or not (self.chat_template or getattr(tok, "chat_template", None)):
            raise RequestError("this model has no chat template: use /v1/completions or set server.chat_template")
        if len(messages) > limits.max_chat_messages:
            raise RequestError(f"messages: at most {limits.max_chat_messages} messages, got {len(messages)}")
        out = [_message(i, m) for i, m in enumerate(messages)]
        try:
            size = sum(len(m["content"].encode()) + len(m["role"].encode()) + _extra_bytes(m) for m in out)
        except UnicodeEncodeError as e:
            raise RequestError(f"messages: not valid Unicode ({e.reason})") from None
        if size > limits.max_prompt_bytes:  # checked before templating and tokenizing, as for prompts
            raise RequestError(f"messages: {size} bytes is more than {limits.max_prompt_bytes} "
                               "(limits.max_prompt_bytes)")
        if self._reads_parts(with_tools):
            for msg, m in zip(out, messages):
                msg["content"] = [{"type": "text", "text": part.text} for part in m.content] if isinstance(
                    m.content, list) else [{"type": "text", "text": m.content}] if m.content is not None else []
        return out

    def _reads_parts(self, with_tools: bool) -> bool:
        """Whether the chat template `render` applies reads a message's content as OpenAI's list
        of parts (it loops over it) rather than as a text: then messages carry their parts, as
        vLLM detects and hands them over (its "openai" content format); a text is one part.
        Decided once (per whether tools are given: named templates have one for them)."""
        if with_tools not in self._parts:
            template = self.chat_template or getattr(self.engine.tokenizer, "chat_template", None)
            if isinstance(template, dict):  # named templates: the one transformers applies
                template = template.get("tool_use" if with_tools and "tool_use" in template else "default")
            self._parts[with_tools] = isinstance(template, str) and loops_over_content(template)
        return self._parts[with_tools]

    def render(self, messages: list[dict], add_generation_prompt: bool = True, add_special_tokens: bool = False,
               tools: list[dict] | None = None, continue_final_message: bool = False,
               template_kwargs: dict | None = None) -> list[int]:
        """Token ids of checked messages (`messages`) through the chat template, with `tools`
        (JSON schemas the template may render) and `template_kwargs` (more variables for it, vLLM's
        chat_template_kwargs) counted into limits.max_prompt_bytes."""
        tok = self.engine.tokenizer
        for what, value in (("tools", tools), ("chat_template_kwargs", template_kwargs)):
            if value:
                self._check_json(what, value)
        taken = sorted(set(template_kwargs or ()) & _TEMPLATE_ARGS)
        if taken:
            raise RequestError(f"chat_template_kwargs: {', '.join(taken)} cannot be set there (the request's own "
                               "fields set the template's arguments)")
        if continue_final_message and messages[-1]["role"] != "assistant":
            raise RequestError("continue_final_message: the last message must be the assistant's (the answer "
                               f"continues it), got {messages[-1]['role']!r}")
        try:
            text = tok.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                           add_generation_prompt=add_generation_prompt, tools=tools or None,
                                           continue_final_message=continue_final_message, **(template_kwargs or {}))
        except Exception as e:  # template errors (e.g. an unsupported role) are the caller's
            raise RequestError(f"cannot apply the chat template: {e}") from e
        return tok(text, add_special_tokens=add_special_tokens)["input_ids"]

    def _check_json(self, what: str, value) -> None:
        try:
            size = len(json.dumps(value).encode())
        except (TypeError, ValueError, UnicodeEncodeError) as e:
            raise RequestError(f"{what}: not JSON text ({e})") from None
        if size > self.limits.max_prompt_bytes:
            raise RequestError(f"{what}: {size} bytes is more than {self.limits.max_prompt_bytes} "
                               "(limits.max_prompt_bytes)")

    def tokenize(self, body: proto.TokenizeRequest) -> dict:
        """vLLM's /tokenize answer: the ids, their count and the context length."""
        if body.messages is not None:
            ids = self.render(self.messages(body.messages, bool(body.tools)), body.add_generation_prompt,
                              bool(body.add_special_tokens), body.tools, body.continue_final_message,
                              body.chat_template_kwargs)
        else:
            check_prompt_text(body.prompt, self.engine.tokenizer, self.limits)
            add = body.add_special_tokens is None or body.add_special_tokens
            ids = self.engine.tokenizer(body.prompt, add_special_tokens=add)["input_ids"]
        strs = self.engine.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": self.engine.max_seq_len, "tokens": ids, "token_strs": strs}

    def detokenize(self, body: proto.DetokenizeRequest) -> dict:
        """vLLM's /detokenize answer: the ids' text (special tokens included)."""
        tok, vocab = self.engine.tokenizer, self.engine.model.args.vocab_size
        if tok is None:
            raise RequestError("this model has no tokenizer")
        if not all(0 <= t < vocab for t in body.tokens):
            raise RequestError(f"tokens must be token ids in [0, {vocab})")
        return {"prompt": tok.decode(body.tokens)}
