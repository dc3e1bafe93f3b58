"""The OpenAI-compatible HTTP app: completions, chat, models, adapter management, health, metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse

from caraserve.config import ServerConfig
from caraserve.lora.checkpoint import AdapterError, check_name
from caraserve.request import ErrorCause, RequestError, RequestOutput, SamplingParams
from caraserve.serve import protocol as proto
from caraserve.serve.async_engine import AsyncEngine, EngineUnavailableError, QueueFullError
from caraserve.serve.http import ApiError, Guard, install_error_handlers
from caraserve.serve.metrics import ServerMetrics

log = logging.getLogger(__name__)


def build_app(service: AsyncEngine, server: ServerConfig, served_name: str, adapter_roots: list[Path]) -> FastAPI:
    engine = service.engine
    metrics = ServerMetrics(service)
    service.on_output = metrics.observe
    app = FastAPI(title="CaraServe", version="0.1.0")

    install_error_handlers(app)

    def resolve_model(name: str) -> str | None:
        if name == served_name:
            return None
        if service.is_serving(name):
            return name
        metrics.rejected("unknown_model")
        raise ApiError(404, f"The model `{name}` does not exist.", "not_found_error")

    limits = engine.config.limits
    # Tokenizing and templating a large input takes a while: it runs on this thread, off the event
    # loop, one input at a time (the tokenizer's state is not shared with other threads here).
    tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="caraserve-tokenize")

    def sampling(body: proto._Sampling, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        if logprobs is not None and not 0 <= logprobs <= limits.max_logprobs:
            raise ApiError(400, f"logprobs must be in [0, {limits.max_logprobs}], got {logprobs}",
                           "invalid_request_error")
        try:
            params = SamplingParams(
                max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                seed=body.seed, stop=body.stop or (), stop_token_ids=tuple(body.stop_token_ids or ()),
                ignore_eos=body.ignore_eos, n=body.n, logprobs=bool(logprobs),
            )
            engine.check_params(params)
            return params
        except RequestError as e:
            raise ApiError(400, str(e), "invalid_request_error") from e

    async def off_loop(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(tokenizer_thread, fn, *args)

    async def encode(prompt) -> list[int]:
        try:
            if isinstance(prompt, str) and len(prompt) > 1024:
                return await off_loop(engine.encode, prompt)
            return engine.encode(prompt)
        except RequestError as e:
            raise ApiError(400, str(e), "invalid_request_error") from e

    async def start(prompt_ids, params, adapter, rid) -> asyncio.Queue:
        try:
            return await service.submit(prompt_ids, params, adapter, rid)
        except QueueFullError as e:
            metrics.rejected("queue_full")
            raise ApiError(503, str(e), "server_overloaded") from e
        except EngineUnavailableError as e:
            raise ApiError(503, str(e), "engine_unavailable") from e
        except RequestError as e:
            metrics.rejected("bad_request")
            status = 404 if "unknown adapter" in str(e) else 400
            raise ApiError(status, str(e), "invalid_request_error" if status == 400 else "not_found_error") from e

    async def next_output(http: Request, rid: str, queue: asyncio.Queue, final: bool) -> RequestOutput:
        """The next output (the final one when `final`); a client that goes away aborts the request."""
        while True:
            try:
                out = await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    service.abort(rid)
                    raise ApiError(499, "client disconnected", "client_closed") from None
                continue
            if out.finished or not final:
                return out

    async def stream(http: Request, rid: str, queue: asyncio.Queue, chunk, final_usage: bool):
        """Server-sent events. The response starts with the first output, so a request that fails
        before its first token (e.g. its adapter's weights are refused on first read) gets its
        HTTP status instead of a 200 with an error event."""
        first = await next_output(http, rid, queue, final=False)
        if first.finished and not first.output_ids:
            check_finished(first)

        async def events():
            done = False
            try:
                out = first
                while True:
                    done = out.finished
                    finish = out.finish_reason.openai if done else None
                    if out.new_text or done:
                        yield f"data: {json.dumps(chunk(out.new_text, finish))}\n\n"
                    if done and out.error is not None:
                        status, type_ = error_kind(out)
                        yield f"data: {json.dumps(proto.error_body(out.error, type_, status))}\n\n"
                    if done and final_usage:
                        body = chunk("", None)
                        body["choices"] = []
                        body["usage"] = proto.usage(out.prompt_tokens, len(out.output_ids))
                        yield f"data: {json.dumps(body)}\n\n"
                    if done:
                        break
                    out = await queue.get()
                yield "data: [DONE]\n\n"
            finally:
                if not done:  # client went away mid-stream: free its slot
                    service.abort(rid)

        return StreamingResponse(events(), media_type="text/event-stream")

    def request_id(http: Request, prefix: str) -> str:
        """The caller's X-Request-Id when given (a router uses it to match its requests with the
        replica's /v1/state), else a fresh id."""
        rid = http.headers.get("x-request-id")
        if rid is None:
            return proto.new_id(prefix)
        if not proto.valid_request_id(rid):
            raise ApiError(400, "X-Request-Id must be 1-128 characters of letters, digits, '-', '_', '.' or ':'",
                           "invalid_request_error")
        return rid

    def error_kind(out: RequestOutput) -> tuple[int, str]:
        """(HTTP status, error type) of a request that ended with an error. A request whose own
        part of a step failed is told so (type request_failed): a router must not retry it
        elsewhere or hold it against this replica. An adapter refused on first read is a 400."""
        if out.error_cause is ErrorCause.ADAPTER:  # the adapter the caller named cannot be used
            return 400, "invalid_request_error"
        return 500, "request_failed" if out.error_cause is ErrorCause.REQUEST else "internal_error"

    def check_finished(out: RequestOutput):
        if out.error is not None:
            status, type_ = error_kind(out)
            headers = {proto.FAULT_HEADER: "request"} if type_ == "request_failed" else None
            raise ApiError(status, out.error, type_, headers)

    def include_usage(raw: dict) -> bool:
        opts = raw.get("stream_options") or {}
        return bool(isinstance(opts, dict) and opts.get("include_usage"))

    @app.get("/health")
    async def health():
        if not service.healthy:
            raise ApiError(503, f"the engine is not serving ({service.fault or 'stopped'})", "engine_unavailable")
        return {"status": "ok"}

    @app.get("/metrics")
    async def get_metrics():
        return PlainTextResponse(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/state")
    async def state():
        """Live state for a router: the typed EngineState (see Engine.snapshot) as JSON."""
        return dataclasses.replace(await service.call(engine.snapshot), model=served_name).to_dict()

    @app.get("/v1/models")
    async def models():
        cards = [proto.model_card(served_name, str(engine.model_path), max_model_len=engine.max_seq_len)]
        for info in engine.adapters():
            if service.is_serving(info.name):
                cards.append(proto.model_card(info.name, info.path, parent=served_name, rank=info.rank,
                                              resident=engine.adapter_state(info.name) == "resident"))
        return {"object": "list", "data": cards}

    @app.post("/v1/completions")
    async def completions(body: proto.CompletionRequest, http: Request):
        adapter = resolve_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise ApiError(400, "batched prompts are not supported: send one prompt per request",
                               "invalid_request_error")
            prompt = prompt[0]
        if body.echo:
            raise ApiError(400, "echo is not supported", "invalid_request_error")
        logprobs = int(body.logprobs) if body.logprobs is not None else None
        params = sampling(body, body.max_tokens if body.max_tokens is not None else 16, logprobs)
        ids = await encode(prompt)
        rid = request_id(http, "cmpl")
        queue = await start(ids, params, adapter, rid)
        if body.stream:
            return await stream(http, rid, queue, lambda text, fin: proto.completion_chunk(rid, body.model, text, fin),
                                include_usage(await http.json()))
        out = await next_output(http, rid, queue, final=True)
        check_finished(out)
        logprobs = None
        if body.logprobs and out.logprobs is not None:
            tokens = [engine.tokenizer.decode([t]) if engine.tokenizer else str(t) for t in out.output_ids]
            logprobs = {"tokens": tokens, "token_logprobs": out.logprobs, "top_logprobs": None, "text_offset": None}
        return proto.completion_response(rid, body.model, out.text, out.finish_reason.openai, len(ids),
                                         len(out.output_ids), logprobs)

    @app.post("/v1/chat/completions")
    async def chat(body: proto.ChatCompletionRequest, http: Request):
        adapter = resolve_model(body.model)
        if engine.tokenizer is None or not getattr(engine.tokenizer, "chat_template", None):
            raise ApiError(400, "this model has no chat template: use /v1/completions", "invalid_request_error")
        if len(body.messages) > limits.max_chat_messages:
            raise ApiError(400, f"messages: at most {limits.max_chat_messages} messages, got {len(body.messages)}",
                           "invalid_request_error")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            size = sum(len(m["content"].encode()) + len(m["role"].encode()) for m in messages)
        except UnicodeEncodeError as e:
            raise ApiError(400, f"messages: not valid Unicode ({e.reason})", "invalid_request_error") from None
        if size > limits.max_prompt_bytes:  # checked before templating and tokenizing, as for prompts
            raise ApiError(400, f"messages: {size} bytes is more than {limits.max_prompt_bytes} "
                           "(limits.max_prompt_bytes)", "invalid_request_error")
        if body.logprobs is not None and not isinstance(body.logprobs, bool):
            raise ApiError(400, "logprobs must be true or false for chat (top_logprobs says how many)",
                           "invalid_request_error")
        if body.top_logprobs is not None and not 0 <= body.top_logprobs <= limits.max_logprobs:
            raise ApiError(400, f"top_logprobs must be in [0, {limits.max_logprobs}], got {body.top_logprobs}",
                           "invalid_request_error")
        wanted = (body.top_logprobs or 0) if body.logprobs else None
        sampling(body, 1, wanted)  # bad parameters are refused before the template runs

        def render() -> list[int]:
            try:
                text = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as e:  # template errors (e.g. an unsupported role) are the caller's
                raise RequestError(f"cannot apply the chat template: {e}") from e
            return engine.encode(engine.tokenizer(text, add_special_tokens=False)["input_ids"])

        try:
            ids = await off_loop(render)
        except RequestError as e:
            raise ApiError(400, str(e), "invalid_request_error") from e
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = sampling(body, limit if limit is not None else max(1, engine.max_seq_len - len(ids)), wanted)
        rid = request_id(http, "chatcmpl")
        queue = await start(ids, params, adapter, rid)
        if body.stream:
            first = [True]

            def chunk(text, fin):
                delta = {"role": "assistant", "content": text} if first[0] else ({"content": text} if text else {})
                first[0] = False
                return proto.chat_chunk(rid, body.model, delta, fin)

            return await stream(http, rid, queue, chunk, include_usage(await http.json()))
        out = await next_output(http, rid, queue, final=True)
        check_finished(out)
        return proto.chat_response(rid, body.model, out.text, out.finish_reason.openai, len(ids), len(out.output_ids))

    @app.post("/v1/load_lora_adapter")
    async def load_lora(body: proto.LoadLoraRequest):
        try:
            check_name(body.lora_name)
        except AdapterError as e:
            raise ApiError(400, str(e), "invalid_request_error") from e
        try:
            resolved = Path(body.lora_path).expanduser().resolve()
        except (OSError, ValueError, RuntimeError) as e:  # NUL bytes, symlink loops, unknown ~user
            raise ApiError(400, f"lora_path {body.lora_path!r} is not a usable path ({e})",
                           "invalid_request_error") from e
        if not any(resolved == root or resolved.is_relative_to(root) for root in adapter_roots):
            raise ApiError(400, f"lora_path {body.lora_path!r} is outside the allowed adapter roots",
                           "invalid_request_error")
        if body.lora_name == served_name:
            raise ApiError(400, f"{body.lora_name!r} is the base model's name", "invalid_request_error")
        try:
            info = await asyncio.get_running_loop().run_in_executor(
                None, engine.register_adapter, body.lora_name, resolved)
        except AdapterError as e:
            raise ApiError(400, str(e), "invalid_request_error") from e
        except (OSError, ValueError) as e:  # unreadable files of the caller's choosing
            raise ApiError(400, f"adapter {body.lora_name!r} cannot be read ({type(e).__name__}: {e})",
                           "invalid_request_error") from e
        return {"status": "ok", "lora_name": info.name, "rank": info.rank}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(body: proto.UnloadLoraRequest):
        if not service.is_serving(body.lora_name):
            raise ApiError(404, f"adapter {body.lora_name!r} is not loaded", "not_found_error")
        try:
            await service.retire_adapter(body.lora_name, server.unload_timeout_s)
        except (TimeoutError, AdapterError) as e:  # still in use: the caller may retry later
            raise ApiError(409, f"cannot unload adapter {body.lora_name!r}: {e}", "conflict_error") from e
        return {"status": "ok", "lora_name": body.lora_name}

    return Guard(app, server.api_key, server.max_body_bytes, server.admin_api_key, server.allow_runtime_lora)
