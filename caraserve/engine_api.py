"""The engine's conveniences for Python callers, as vLLM's `LLM` offers them: `generate` and
`chat` run prompts or conversations to completion, `stream` yields one request's outputs; all
over Engine.add_request / step."""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator

from caraserve.request import Request, RequestError, RequestOutput, SamplingParams, _is_int, choice_params


class EngineConveniences:
    """Engine's generate / chat / stream (a mixin: they use only its public request methods)."""

    def generate(self, prompts: list[str | list[int]] | str | list[int],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 adapters: list[str | None] | str | None = None) -> list[Request]:
        """Runs prompts to completion; returns the finished requests in input order (arguments as
        batch_inputs takes them), a prompt whose params ask n > 1 completions giving its n in a
        row (completion i samples with seed + i, as the server's; SGLang's Engine.generate
        lists them so too). A refused prompt raises; a step that raises aborts the requests
        (none stays queued for the next caller)."""
        reqs: list[Request] = []
        try:
            for p, sp, a in zip(*batch_inputs(prompts, params, adapters)):
                n, first = (sp.n if sp is not None else 1), None
                for i in range(n):
                    with self._lock:  # another thread's step may end and forget it once the lock is free
                        rid = self.add_request(p, choice_params(sp, i) if n > 1 else sp, a, after=first,
                                               final_only=True)  # (the others start once the first prefilled)
                        reqs.append(self._requests[rid])
                    first = first or rid
            while any(not r.finished for r in reqs):
                if not self.step() and self.scheduler.stalled():
                    time.sleep(0.001)  # only waiting on adapter reads or copies: leave their threads the cores
        finally:
            for r in reqs:
                self.abort(r.request_id)  # (a finished one is left alone)
        return reqs

    def stream(self, prompt, params: SamplingParams | None = None,
               adapter: str | None = None) -> Iterator[RequestOutput]:
        """Adds one request and yields its outputs as they come, stepping the engine; outputs made
        by another caller's step (streams in other threads) reach it too. Closing the generator
        early (or a step that raises) aborts the request."""
        with self._lock:
            rid = self.add_request(prompt, params, adapter)
            mine = self.outputs.watched[rid] = collections.deque()
        try:
            while True:
                while mine:
                    out = mine.popleft()
                    yield out
                    if out.finished:
                        return
                if not self.step() and self.scheduler.stalled():
                    time.sleep(0.001)
        finally:
            self.outputs.watched.pop(rid, None)
            self.abort(rid)

    def chat(self, messages: list[dict] | list[list[dict]], params: SamplingParams | list[SamplingParams] | None = None,
             adapters: list[str | None] | str | None = None, *, chat_template: str | None = None,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             tools: list[dict] | None = None, chat_template_kwargs: dict | None = None) -> list[Request]:
        """As vLLM's LLM.chat: one conversation (a list of OpenAI messages, {"role", "content"}
        and the tool fields the server takes) or a list of them, each rendered by the model's
        chat template (`chat_template`: Jinja text instead) as /v1/chat/completions renders it,
        then run as `generate` runs prompts (params and adapters as it takes them). A message
        the API would refuse raises RequestError naming it, before any conversation runs."""
        from caraserve.serve.prompts import Prompts

        # the API refuses a non-boolean flag; here "no" would be taken as true and change the prompt
        for name, flag in (("add_generation_prompt", add_generation_prompt),
                           ("continue_final_message", continue_final_message)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, not {flag!r}")
        prompts = Prompts(self, chat_template)
        ids = [prompts.render(prompts.messages(chat_messages(c, i), bool(tools)), add_generation_prompt,
                              tools=tools, continue_final_message=continue_final_message,
                              template_kwargs=chat_template_kwargs)
               for i, c in enumerate(conversations(messages))]
        return self.generate(ids, params, adapters)


def conversations(messages) -> list[list]:
    """Engine.chat's messages as a list of conversations: one conversation (a list whose first
    entry is a message) or a list of them."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TypeError("messages must be a conversation (a non-empty list of messages) or a list of them")
    one = not isinstance(messages[0], (list, tuple))
    return [list(messages)] if one else [list(c) for c in messages]


def chat_messages(conversation: list, index: int) -> list:
    """A conversation's messages as the server's protocol reads them (its checks, its errors)."""
    import pydantic

    from caraserve.serve import protocol as proto

    if not conversation:
        raise RequestError(f"conversation {index} has no messages")
    out = []
    for i, m in enumerate(conversation):
        try:
            out.append(proto.ChatMessage.model_validate(m))
        except pydantic.ValidationError as e:
            first = e.errors()[0]
            where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"])
            raise RequestError(f"conversation {index}: messages[{i}]{where}: {first['msg']}") from None
    return out


def batch_inputs(prompts, params, adapters) -> tuple[list, list[SamplingParams | None], list[str | None]]:
    """Engine.generate's arguments as lists of one entry per prompt, taken as vLLM's LLM.generate
    takes them: one prompt (a str, or a list of token ids) or a list of prompts; one
    SamplingParams (None: the defaults) for all, or a list of one per prompt; one adapter name
    (None: the base model) for all, or a list of one per prompt. Else a TypeError or ValueError."""
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and all(map(_is_int, prompts))):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a str, a list of token ids, or a list of those, not {type(prompts).__name__}")
    n = len(prompts)
    if params is None or isinstance(params, SamplingParams):
        params = [params] * n  # (None: Engine.add_request's defaults)
    elif not isinstance(params, (list, tuple)) or not all(isinstance(p, SamplingParams) for p in params):
        raise TypeError(f"params must be a SamplingParams or a list of one per prompt, not {type(params).__name__}")
    if adapters is None or isinstance(adapters, str):
        adapters = [adapters] * n
    elif not isinstance(adapters, (list, tuple)) or not all(a is None or isinstance(a, str) for a in adapters):
        raise TypeError("adapters must be an adapter's name (None: the base model) or a list of one per prompt")
    if not len(params) == len(adapters) == n:
        raise ValueError(f"generate: {n} prompts but {len(params)} params and {len(adapters)} adapters")
    return list(prompts), list(params), list(adapters)
