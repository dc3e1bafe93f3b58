"""The service layer under the HTTP routes: what an OpenAI-compatible front does, without HTTP.

`Service` is the interface the route modules (caraserve.serve.routes) call; two implement it:
`EngineService` here (one engine, the plain server; also what each Ray replica runs) and the Ray
ingress's service (caraserve.ray_serve.ingress), which routes each call to a replica. A call
answers a dict (a JSON body), an async iterator of SSE lines (a stream), or raises ApiError,
whose type carries its HTTP status.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from caraserve.config_checks import inline_template
from caraserve.input_checks import with_bad_words_ids
from caraserve.model.generation_config import with_defaults
from caraserve.request import CapacityError, RequestError, SamplingParams
from caraserve.serve import answer_extras, beams, choices
from caraserve.serve import protocol as proto
from caraserve.serve.adapter_admin import AdapterAdmin
from caraserve.serve.async_engine import AsyncEngine, EngineUnavailableError
from caraserve.serve.constraints import ForcedTools, structured_outputs
from caraserve.serve.gateway_metrics import add_gateway_metrics
from caraserve.serve.http import AdapterCapacity, ApiError, BadRequest, EngineUnavailable, NotFound
from caraserve.serve.metrics import ServerMetrics
from caraserve.serve.prompts import Prompts
from caraserve.serve.reasoning import ReasoningParser
from caraserve.serve.runs import Disconnected, Runs
from caraserve.serve.tool_parsers import ToolParser, auto_tool_parser
from caraserve.state import EngineState

log = logging.getLogger(__name__)

Answer = dict | AsyncIterator[str]


class Service(Protocol):
    """What the routes need. disconnected: tells whether the client went away (a non-streamed
    call aborts its request then); a stream's consumer going away aborts it by closing it.
    answer_id: the answer's id when it is not the request's (a router's retry: the caller's id)."""

    async def completion(self, body: proto.CompletionRequest, rid: str, include_usage: bool,
                         disconnected: Disconnected | None = None, answer_id: str | None = None) -> Answer: ...

    async def chat(self, body: proto.ChatCompletionRequest, rid: str, include_usage: bool,
                   disconnected: Disconnected | None = None, answer_id: str | None = None) -> Answer: ...

    async def models(self) -> list[dict]: ...

    async def tokenize(self, body: proto.TokenizeRequest) -> dict: ...

    async def detokenize(self, body: proto.DetokenizeRequest) -> dict: ...

    async def load_adapter(self, body: proto.LoadLoraRequest) -> dict: ...

    async def unload_adapter(self, body: proto.UnloadLoraRequest) -> dict: ...

    async def health(self) -> dict: ...

    async def metrics(self) -> tuple[bytes, str]: ...

    async def state(self) -> dict: ...


class EngineService:
    """One engine behind the OpenAI API (see the module docstring)."""

    def __init__(self, async_engine: AsyncEngine, served_name: str, adapter_roots: list[Path],
                 unload_timeout_s: float, chat_template: str = "", log_requests: bool = False,
                 tool_call_parser: str = "", reasoning_parser: str = ""):
        self.async_engine, self.engine = async_engine, async_engine.engine
        # server.chat_template: a file's text, or the template itself ("" = the tokenizer's)
        file = chat_template and not inline_template(chat_template)
        self.chat_template = Path(chat_template).read_text() if file else chat_template or None
        self.served_name, self.adapter_roots, self.unload_timeout_s = served_name, adapter_roots, unload_timeout_s
        self.limits = self.engine.config.limits
        self.token_texts = {skip: choices.TokenTexts(self.engine.tokenizer, skip) for skip in (True, False)}  # logprobs
        self.token_ids = choices.TokenIds()  # for logprobs with return_tokens_as_token_ids
        self.prompts = Prompts(self.engine, self.chat_template)
        # tool_choice "auto" (server.tool_call_parser): the calls are read from the model's own syntax
        self.tool_parser = ToolParser(tool_call_parser, self.engine.tokenizer) if tool_call_parser else None
        self.reasoning = ReasoningParser(reasoning_parser) if reasoning_parser else None  # server.reasoning_parser
        self.metrics_ = ServerMetrics(async_engine, served_name, log_requests)
        self.runs = Runs(async_engine)
        self.admin = AdapterAdmin(async_engine, served_name, adapter_roots, unload_timeout_s)
        add_gateway_metrics(self.metrics_.registry, async_engine, served_name)
        async_engine.on_output = self.metrics_.observe
        # inputs are tokenized and templated here, off the event loop, one at a time (a tokenizer is not shared)
        self._tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="caraserve-tokenize")
        # structured outputs' grammars compile here: a few slow compiles wait for each other
        # rather than taking every thread of the loop's default executor (adapter reads, resolves)
        self._grammar_threads = ThreadPoolExecutor(max_workers=2, thread_name_prefix="caraserve-grammar")

    def count_rejection(self, reason: str) -> None:
        """A generation request refused before it reached the engine (http.install_error_handlers)."""
        self.metrics_.rejected(reason)

    async def resolve_model(self, body) -> str | None:
        """The adapter a request's `model` names (None: the base model); an adapter not registered
        yet is looked up in adapters.resolve_dirs (a disk read, off the event loop). A body without
        `model` is for the base model, and its answer names the served model."""
        if body.model is None:
            body.model = self.served_name
        name = body.model
        if name == self.served_name:
            return None
        if self.async_engine.is_serving(name):
            return name
        if self.engine.config.adapters.resolve_dirs:
            try:
                found = await asyncio.get_running_loop().run_in_executor(None, self.engine.resolve_adapter, name)
            except CapacityError as e:  # found, but the registry is full
                raise AdapterCapacity(str(e)) from e
            except RequestError as e:  # found, but refused: the caller named a broken adapter
                raise BadRequest(str(e)) from e
            if found and self.async_engine.is_serving(name):
                return name
        refused = self.engine.catalog.errors.get(name)  # in adapters.dir, but refused at start
        why = f" Its adapter folder was refused at start: {refused}" if refused else ""
        raise NotFound(f"The model `{name}` does not exist.{why}")

    async def sampling(self, body: proto._Sampling, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """The params of each of the body's `n` engine requests (n is the service's to fan out);
        logprobs: None for none, else each token's with this many alternatives. A structured
        output is compiled here, off the event loop, so the engine thread finds it compiled."""
        if logprobs is not None and not 0 <= logprobs <= self.limits.max_logprobs:
            raise BadRequest(f"logprobs must be in [0, {self.limits.max_logprobs}], got {logprobs}")
        if not 1 <= body.n <= self.limits.max_n:
            raise BadRequest(f"n must be in [1, {self.limits.max_n}] (limits.max_n), got {body.n}")
        values = dict(
            max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
            min_p=body.min_p, include_stop_str_in_output=body.include_stop_str_in_output,
            seed=body.seed, stop=() if body.stop is None else body.stop,
            stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=body.ignore_eos,
            logprobs=logprobs is not None, top_logprobs=logprobs or 0,
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty, min_tokens=body.min_tokens,
            logit_bias=body.logit_bias or (), allowed_token_ids=body.allowed_token_ids,
            cache_salt=body.cache_salt, skip_special_tokens=body.skip_special_tokens,
            prompt_logprobs=body.prompt_logprobs, priority=body.priority, bad_words=tuple(body.bad_words or ()))
        try:  # what the body leaves out of the model's sampling defaults comes from them
            values["structured_outputs"] = structured_outputs(body)
            params = SamplingParams(**with_defaults(values, body.model_fields_set, self.engine.sampling_defaults))
            self.engine.check_params(params)
            if params.bad_words:  # tokenized once for the call's n requests, off the event loop
                params = await self._off_loop(with_bad_words_ids, params, self.engine.tokenizer, self.limits,
                                              self.engine.model.args.vocab_size)
            if params.structured_outputs is not None:
                await asyncio.get_running_loop().run_in_executor(self._grammar_threads, self.engine.grammars.compile,
                                                                 params.structured_outputs)
            return params
        except RequestError as e:
            raise BadRequest(str(e)) from e

    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, fn, *args)

    async def _encode(self, prompt, add_special_tokens: bool = True) -> list[int]:
        try:
            if isinstance(prompt, str) and len(prompt) > 1024:
                return await self._off_loop(self.engine.encode, prompt, add_special_tokens)
            return self.engine.encode(prompt, add_special_tokens)
        except RequestError as e:
            raise BadRequest(str(e)) from e

    def _keep(self, body: proto._Sampling) -> int | None:
        """How many of the prompt's last tokens vLLM's truncate_prompt_tokens keeps (-1: the
        context length); None: all of them."""
        k = body.truncate_prompt_tokens
        if k is not None and k > self.engine.max_seq_len:
            raise BadRequest(f"truncate_prompt_tokens={k} is more than the context length {self.engine.max_seq_len}")
        return None if k is None else self.engine.max_seq_len if k == -1 else k

    def _texts(self, body: proto._Sampling) -> choices.TokenTexts:
        return self.token_ids if body.return_tokens_as_token_ids else self.token_texts[body.skip_special_tokens]

    # ---- the API ------------------------------------------------------------------------------

    async def completion(self, body: proto.CompletionRequest, rid: str, include_usage: bool,
                         disconnected: Disconnected | None = None, answer_id: str | None = None) -> Answer:
        received = time.perf_counter()  # TTFT counts from here
        adapter = await self.resolve_model(body)
        prompts = self._completion_prompts(body.prompt)
        if isinstance(body.logprobs, bool):
            raise BadRequest("logprobs must be a number for completions (how many alternatives with each token)")
        if body.suffix:
            raise BadRequest("suffix is not supported")
        prompt_only = body.echo and body.max_tokens == 0  # score (or echo) the prompt, generate nothing
        if body.max_tokens == 0 and not body.echo:
            raise BadRequest("max_tokens must be at least 1 (0 only with echo: the prompt echoed, nothing generated)")
        if prompt_only and body.min_tokens:
            raise BadRequest(f"min_tokens must be 0 when max_tokens is 0, got {body.min_tokens}")
        max_tokens = 1 if prompt_only else body.max_tokens if body.max_tokens is not None else 16
        params = await self.sampling(body, max_tokens, body.logprobs)
        scored = body.echo and body.logprobs is not None  # the echoed prompt's tokens get logprobs too
        if scored:
            params = replace(params, prompt_logprobs=body.logprobs)
        encoded = [await self._prompt_ids(prompt, params, k if len(prompts) > 1 else None, body)
                   for k, prompt in enumerate(prompts)]
        if body.use_beam_search:
            return await beams.completion(self, body, encoded, max_tokens, adapter, answer_id or rid, disconnected)
        # echo: the prompt's text comes before the completion's (the first streamed chunk carries it)
        if body.truncate_prompt_tokens is not None:  # the part of the prompt that was kept
            prompts = encoded
        echoed = [self._prompt_text(prompt, ids, body.skip_special_tokens) if body.echo else ""
                  for prompt, ids in zip(prompts, encoded)]
        texts = self._texts(body)
        final_only = not body.stream  # a non-streamed call reads the last output only
        n = body.n
        runs = await self.runs.start_prompts(encoded, params, adapter, rid, n, final_only, received)
        if prompt_only:
            runs = [(sid, choices.MappedQueue(q, choices.prompt_only)) for sid, q in runs]
        if body.stream:
            created = int(time.time())  # one value for every chunk of the call, as OpenAI's
            chunkers = [choices.completion_chunker(answer_id or rid, body.model, texts, ids, text, scored, created)
                        for ids, text in zip(encoded, echoed)]

            def chunker(index: int):
                return chunkers[index // n](index)
            if body.return_token_ids:
                chunker = answer_extras.streamed(chunker, lambda c: encoded[c // n], chat=False)
            return await self.runs.stream(runs, chunker, include_usage, disconnected, n,
                                          body.continuous_usage(include_usage))
        outs = await self.runs.all_of(runs, disconnected)
        answers = [(echoed[c // n] + o.text, o.finish_reason.openai,
                    choices.completion_logprobs(texts, o, encoded[c // n], echo=scored), o.stop_reason)
                   for c, o in enumerate(outs)]
        answer = proto.completion_response(answer_id or rid, body.model, answers, *choices.usage_counts(outs, n))
        return answer_extras.add(answer, outs, body, texts, lambda c: encoded[c // n], chat=False)

    async def _prompt_ids(self, prompt, params: SamplingParams, index: int | None,
                          body: proto.CompletionRequest) -> list[int]:
        """The prompt's ids (as the body asks: BOS, truncation), checked to fit with
        params.max_tokens: a call of several prompts is refused whole, before any of them starts
        (the message names the prompt by its index)."""
        try:
            keep = self._keep(body)
            if keep is not None and isinstance(prompt, list):  # cut before the context-length check
                prompt = prompt[-keep:]
            ids = await self._encode(prompt, body.add_special_tokens)
            ids = ids if keep is None else ids[-keep:]
            self.engine.check_fits(len(ids), params)
            return ids
        except ApiError as e:
            if index is not None:
                e.message = f"prompt {index}: {e.message}"
            raise
        except RequestError as e:
            raise BadRequest(str(e) if index is None else f"prompt {index}: {e}") from e

    def _completion_prompts(self, prompt) -> list:
        """The call's prompts: one (text or token ids) or a list of them (limits.max_prompts)."""
        if not (isinstance(prompt, list) and prompt and not isinstance(prompt[0], int)):
            return [prompt]
        if len(prompt) > self.limits.max_prompts:
            raise BadRequest(f"{len(prompt)} prompts in one request; at most {self.limits.max_prompts} "
                           "(limits.max_prompts)")
        return prompt

    def _prompt_text(self, prompt, ids: list[int], skip_special_tokens: bool) -> str:
        """The prompt as text, for echo: token-id prompts decoded as outputs are (ids without a tokenizer)."""
        if isinstance(prompt, str):
            return prompt
        tok = self.engine.tokenizer
        return choices.decode(tok, ids, skip_special_tokens) if tok is not None else " ".join(map(str, ids))

    def _chat_checks(self, body: proto.ChatCompletionRequest) -> list[dict]:
        limits = self.limits
        try:
            messages = self.prompts.messages(body.messages, bool(body.template_tools()))
        except RequestError as e:
            raise BadRequest(str(e)) from e
        if body.logprobs is not None and not isinstance(body.logprobs, bool):
            raise BadRequest("logprobs must be true or false for chat (top_logprobs says how many)")
        if body.top_logprobs is not None and not body.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true")
        if body.top_logprobs is not None and not 0 <= body.top_logprobs <= limits.max_logprobs:
            raise BadRequest(f"top_logprobs must be in [0, {limits.max_logprobs}], got {body.top_logprobs}")
        if auto_tool_parser(body, self.tool_parser) and self.tool_parser.keeps_special_tokens:
            body.skip_special_tokens = False  # the parser reads the call's marker, a special token here
        return messages

    async def chat(self, body: proto.ChatCompletionRequest, rid: str, include_usage: bool,
                   disconnected: Disconnected | None = None, answer_id: str | None = None) -> Answer:
        received = time.perf_counter()  # TTFT counts from here
        adapter = await self.resolve_model(body)
        messages = self._chat_checks(body)
        engine = self.engine
        wanted = (body.top_logprobs or 0) if body.logprobs else None  # None: no logprobs
        # bad parameters are refused before the template runs (max_tokens as small as they allow)
        await self.sampling(body, max(1, min(body.min_tokens, engine.max_seq_len)), wanted)

        keep = self._keep(body)
        try:
            tools = body.template_tools()
            variables = body.chat_template_kwargs
            if body.reasoning_effort is not None:  # a variable of reasoning models' templates (as vLLM's)
                variables = {"reasoning_effort": body.reasoning_effort, **(variables or {})}
            ids = await self._off_loop(lambda: engine.encode(self.prompts.render(
                messages, body.add_generation_prompt, body.add_special_tokens, tools, body.continue_final_message,
                variables)[-keep if keep is not None else 0:]))  # cut before the length check
        except RequestError as e:
            raise BadRequest(str(e)) from e
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if body.max_completion_tokens is not None and body.max_completion_tokens < 1:
            raise BadRequest(f"max_completion_tokens must be an integer >= 1, got {body.max_completion_tokens}")
        params = await self.sampling(body, limit if limit is not None else max(1, engine.max_seq_len - len(ids)),
                                     wanted)
        if body.use_beam_search:
            return await beams.chat(self, body, ids, params.max_tokens, adapter, answer_id or rid, disconnected)
        final_only = not body.stream  # a non-streamed call reads the last output only
        first = await self.runs.start(ids, params, adapter, rid, final_only=final_only, call_size=body.n,
                                      arrival_s=received)
        runs = await self.runs.start_n(ids, params, adapter, rid, first, body.n, final_only, received)
        last = body.messages[-1]  # echo (vLLM's): the assistant's, or any role's without a generation prompt
        echoed = last.text() if body.echo and (last.role == "assistant" or not body.add_generation_prompt) else ""
        parser, texts = auto_tool_parser(body, self.tool_parser), self._texts(body)  # (checked above)
        forced = ForcedTools.of(body, self.tool_parser.fmt.call_id if self.tool_parser is not None else None)
        # a structured output's text is all answer: a grammar leaves no room to think
        thinks = self.reasoning if params.structured_outputs is None else None
        thinks = thinks.hidden() if thinks is not None and not body.include_reasoning else thinks
        if body.stream:
            aid = answer_id or rid
            chunker = choices.tool_call_chunker(aid, body.model, texts, ids, forced) if forced is not None else \
                choices.parsed_chat_chunker(aid, body.model, texts, ids, parser, thinks, echoed) if parser or thinks \
                else choices.chat_chunker(aid, body.model, texts, ids, echoed)
            if body.return_token_ids:
                chunker = answer_extras.streamed(chunker, lambda _: ids, chat=True)
            return await self.runs.stream(runs, chunker, include_usage, disconnected,
                                          continuous=body.continuous_usage(include_usage), role="assistant")
        outs = await self.runs.all_of(runs, disconnected)
        answers = [choices.chat_choice(o, texts, ids, echoed, forced, parser, thinks) for o in outs]
        answer = proto.chat_response(answer_id or rid, body.model, answers, len(ids),
                                     sum(len(o.output_ids) for o in outs), max(o.cached_tokens for o in outs))
        return answer_extras.add(answer, outs, body, texts, lambda _: ids, chat=True)

    async def tokenize(self, body: proto.TokenizeRequest) -> dict:
        await self.resolve_model(body)
        return await self._tokenizer_call(self.prompts.tokenize, body)

    async def detokenize(self, body: proto.DetokenizeRequest) -> dict:
        await self.resolve_model(body)
        return await self._tokenizer_call(self.prompts.detokenize, body)

    async def _tokenizer_call(self, fn, body) -> dict:
        try:
            return await self._off_loop(fn, body)
        except RequestError as e:
            raise BadRequest(str(e)) from e

    async def models(self) -> list[dict]:
        engine = self.engine
        cards = [proto.model_card(self.served_name, str(engine.model_path), max_model_len=engine.max_seq_len)]
        for info in engine.adapters():
            if self.async_engine.is_serving(info.name):
                cards.append(proto.model_card(info.name, info.path, parent=self.served_name, rank=info.rank,
                                              resident=engine.adapter_state(info.name) == "resident"))
        return cards

    async def load_adapter(self, body: proto.LoadLoraRequest) -> dict:
        return await self.admin.load(body)

    async def unload_adapter(self, body: proto.UnloadLoraRequest) -> dict:
        return await self.admin.unload(body)

    async def health(self) -> dict:
        if not self.async_engine.healthy:
            raise EngineUnavailable(f"the engine is not serving ({self.async_engine.fault or 'stopped'})")
        if not self.async_engine.ready:
            raise EngineUnavailable("the engine is warming up (compiling its decode step)")
        if self.async_engine.stalled is not None:
            raise EngineUnavailable(self.async_engine.stalled)
        return {"status": "ok"}

    async def metrics(self) -> tuple[bytes, str]:
        return self.metrics_.render(), self.metrics_.content_type

    async def engine_state(self) -> EngineState:
        """The typed EngineState (Engine.snapshot) with the served model's name."""
        try:
            return replace(await self.async_engine.state(), model=self.served_name)
        except EngineUnavailableError as e:
            raise EngineUnavailable(str(e)) from e

    async def state(self) -> dict:
        """The EngineState's wire form (/v1/state)."""
        return (await self.engine_state()).to_dict()
