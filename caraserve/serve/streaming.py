"""Server-sent events of one API request's engine requests (the n choices of each of its prompts).

Each choice's outputs become chunks tagged with its `index`, in the order the engine produced
them; choices interleave. A choice that ends with an error ends the stream: its error event
follows its last chunk and the other choices are aborted (the caller asked for one response).
The usage chunk (`stream_options.include_usage`) comes last and counts every choice's tokens
sent, those of choices an error cut short included, and each prompt once; before it, every
chunk has `"usage": null`, as OpenAI's, or with `continuous_usage_stats` (vLLM's) its choice's
usage so far.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable

from caraserve.request import ErrorCause, RequestOutput
from caraserve.serve import protocol as proto
from caraserve.serve.choices import usage_counts

log = logging.getLogger(__name__)

# chunker(index) -> chunk(output, finish_reason) -> the chunk's JSON body (or a list of bodies), or
# None when the output has nothing to send yet (its text held back); chunk(None, None) is an empty
# chunk (one body), the usage
# chunk's form. One function per choice, so a choice's chunks can carry what only its first does
# (the chat role, an echoed prompt) and what earlier outputs left (their tokens' logprobs).
Chunker = Callable[[int], Callable[[RequestOutput | None, str | None], dict | list[dict] | None]]


def error_kind(out: RequestOutput) -> tuple[int, str]:
    """(HTTP status, error type) of a request that ended with an error. A request whose own part
    of a step failed is told so (type request_failed): a router must not retry it elsewhere or
    hold it against this replica. An adapter whose weights were refused, or settings that leave
    nothing to sample, are the caller's (400); a
    request the server's shutdown ended is a 503."""
    if out.error_cause in (ErrorCause.ADAPTER, ErrorCause.PARAMS):
        return 400, "invalid_request_error"
    if out.error_cause is ErrorCause.SHUTDOWN:  # (a client or router may send it again elsewhere)
        return 503, "service_unavailable"
    return 500, "request_failed" if out.error_cause is ErrorCause.REQUEST else "internal_error"


def bodies(body: dict | list[dict] | None) -> list[dict]:
    """A chunker's answer as the chunks to send (none, one, or several: a forced tool call's last
    call and, apart, its finish reason)."""
    return [] if body is None else body if isinstance(body, list) else [body]


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


async def events(runs: list[tuple[str, asyncio.Queue]], first: RequestOutput, chunker: Chunker,
                 final_usage: bool, abort: Callable[[str, asyncio.Queue], None], per_prompt: int | None = None,
                 continuous: bool = False, role: str | None = None) -> AsyncIterator[str]:
    """The SSE lines of `runs` ((request id, output queue) per choice, in index order, with
    `per_prompt` choices per prompt: default all of them); `first` is the first output of choice
    0, already taken from its queue. With a `role` (chat), each choice's first chunk is
    `{"role": role, "content": ""}` alone, as OpenAI's and vLLM's servers send it. Requests still
    running when the consumer goes away are aborted."""
    merged: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()
    merged.put_nowait((0, first))

    async def pump(i: int, queue: asyncio.Queue, done: bool) -> None:
        while not done:
            out = await queue.get()
            merged.put_nowait((i, out))
            done = out.finished

    pumps = [asyncio.ensure_future(pump(i, q, i == 0 and first.finished)) for i, (_, q) in enumerate(runs)]
    chunks = [chunker(i) for i in range(len(runs))]
    finished: dict[int, RequestOutput] = {}
    latest: dict[int, RequestOutput] = {}  # each choice's last output: what the client has been sent
    try:
        while len(finished) < len(runs):
            i, out = await merged.get()
            if role is not None and i not in latest:
                body = chunks[i](None, None)
                body["choices"][0]["delta"] = {"role": role, "content": ""}
                if final_usage:
                    body["usage"] = proto.usage(out.prompt_tokens, 0, out.cached_tokens) if continuous else None
                yield _sse(body)
            latest[i] = out
            finish = out.finish_reason.openai if out.finished else None
            try:
                sent = bodies(chunks[i](out, finish))
            except Exception:  # (a bug in forming the answer: the client is told, the other choices end)
                log.exception("forming a streamed chunk failed")
                yield _sse(proto.error_body("the server failed to form this answer", "internal_error", 500))
                break
            for body in sent:
                if final_usage:
                    body["usage"] = proto.usage(out.prompt_tokens, len(out.output_ids), out.cached_tokens) \
                        if continuous else None
                yield _sse(body)
            if not out.finished:
                continue
            finished[i] = out
            if out.error is not None:
                status, type_ = error_kind(out)
                yield _sse(proto.error_body(out.error, type_, status))
                break
        if final_usage:
            body = chunks[0](None, None)
            body["choices"] = []
            outs = [latest.get(i) for i in range(len(runs))]
            body["usage"] = proto.usage(*usage_counts(outs, per_prompt or len(runs)))
            yield _sse(body)
        yield "data: [DONE]\n\n"
    finally:
        for p in pumps:
            p.cancel()
        for i, (rid, queue) in enumerate(runs):
            if i not in finished:  # the consumer went away, or another choice failed
                abort(rid, queue)
