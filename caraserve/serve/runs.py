"""A call's engine requests and their outputs, under the service layer (caraserve.serve.service):
starting them (with the HTTP status of a refusal), reading their outputs (aborting those whose
caller went away), and answering them whole or as a stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from caraserve.request import CapacityError, RequestError, RequestOutput, SamplingParams, choice_params
from caraserve.serve import protocol as proto
from caraserve.serve.async_engine import AsyncEngine, EngineUnavailableError, QueueFullError
from caraserve.serve.http import (
    AdapterCapacity,
    ApiError,
    BadRequest,
    ClientClosed,
    EngineUnavailable,
    NotFound,
    Overloaded,
)
from caraserve.serve.streaming import Chunker, error_kind, events

Disconnected = Callable[[], Awaitable[bool]]
Run = tuple[str, asyncio.Queue]  # (engine request id, its output queue): one choice of a call


class Runs:
    """The engine requests of API calls, on one AsyncEngine."""

    def __init__(self, async_engine: AsyncEngine):
        self.async_engine = async_engine

    async def start(self, prompt_ids, params, adapter, rid, after: str | None = None, final_only: bool = False,
                    call_size: int = 1, joins_call: bool = False, arrival_s: float | None = None) -> asyncio.Queue:
        """The request's output queue (every step's output; with final_only, a non-streamed
        call's, only the last). call_size, joins_call, arrival_s: AsyncEngine.submit's."""
        try:
            return await self.async_engine.submit(prompt_ids, params, adapter, rid, after, final_only, call_size,
                                                  joins_call, arrival_s)
        except QueueFullError as e:
            raise Overloaded(str(e)) from e
        except EngineUnavailableError as e:
            raise EngineUnavailable(str(e)) from e
        except CapacityError as e:
            raise AdapterCapacity(str(e)) from e
        except RequestError as e:
            if adapter is not None and not self.async_engine.is_serving(adapter):  # unloaded meanwhile
                raise NotFound(str(e)) from e
            raise BadRequest(str(e)) from e

    async def next(self, rid: str, queue: asyncio.Queue, disconnected: Disconnected | None) -> RequestOutput:
        """The request's next output; a caller that goes away meanwhile aborts the request."""
        while True:
            try:
                return await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.CancelledError:  # the caller went away (e.g. a Ray ingress cancelled the call)
                self.async_engine.abort(rid, queue)
                raise
            except asyncio.TimeoutError:
                if disconnected is not None and await disconnected():
                    self.async_engine.abort(rid, queue)
                    raise ClientClosed("client disconnected", admitted=True) from None
                if self.async_engine.ended and queue.empty():  # (no output will come)
                    raise EngineUnavailable("the engine is not serving (its thread has ended)") from None

    async def start_n(self, ids, params: SamplingParams, adapter, rid: str, queue: asyncio.Queue,
                      n: int, final_only: bool = False, arrival_s: float | None = None) -> list[Run]:
        """The call's n choices of one prompt: the first already started (`queue`, request `rid`)
        and n - 1 more (`_choices`), all queued to the engine at once."""
        return await self._join([(rid, queue)], self._choices(ids, params, rid, n, 0), adapter, final_only,
                                arrival_s)

    async def start_prompts(self, encoded: list[list[int]], params: SamplingParams, adapter, rid: str, n: int,
                            final_only: bool, arrival_s: float | None = None, call_size: int | None = None,
                            joins_call: bool = False) -> list[Run]:
        """Every prompt's n requests, in choice order: prompt k's completion j is choice k * n + j,
        as in OpenAI's API. The first request admits the call whole (AsyncEngine.submit), the
        others are queued to the engine at once: each its own wait for a step would stall a call
        of many choices for as many steps. A refusal of any of them aborts those already started.
        call_size: the call's size when it is more than these requests (a beam search admits its
        widest step at its first); joins_call: a call admitted before (its later steps)."""
        first = await self.start(encoded[0], params, adapter, rid, final_only=final_only,
                                 call_size=call_size or len(encoded) * n, joins_call=joins_call,
                                 arrival_s=arrival_s)
        later = self._choices(encoded[0], params, rid, n, 0)
        for k, ids in enumerate(encoded[1:], 1):
            later += [(ids, params, f"{rid}#{k * n}", None), *self._choices(ids, params, rid, n, k * n)]
        return await self._join([(rid, first)], later, adapter, final_only, arrival_s)

    @staticmethod
    def _choices(ids, params: SamplingParams, rid: str, n: int, base: int) -> list[tuple]:
        """(prompt ids, params, request id, the request it waits for) of choices base + 1 ..
        base + n - 1 of call `rid`, whose choice `base` starts the prompt: `{rid}#{i}` (a caller's
        X-Request-Id cannot hold '#', so no caller's id is ever one of them), admitted once that
        first one has prefilled so they share its prompt's KV blocks; with a seed, completion i of
        the prompt samples with seed + i (they differ, reproducibly)."""
        first = rid if base == 0 else f"{rid}#{base}"
        return [(ids, choice_params(params, i), f"{rid}#{base + i}", first)
                for i in range(1, n)]

    async def _join(self, runs: list[Run], later: list[tuple], adapter, final_only: bool,
                    arrival_s: float | None = None) -> list[Run]:
        """runs plus the runs of `later` requests of the same call, submitted together (queued to
        the engine thread in this order, so a choice's first request is there before it)."""
        try:
            started = await asyncio.gather(*(self.start(ids, p, adapter, sid, after, final_only, joins_call=True,
                                                        arrival_s=arrival_s)
                                             for ids, p, sid, after in later), return_exceptions=True)
        except BaseException:  # cancelled: the later ones not admitted yet abort themselves
            # (AsyncEngine.submit), those admitted are aborted here (an abort finds nothing where
            # the add never ran, and runs after the add where it is still queued)
            self.abort(runs + [(spec[2], None) for spec in later])
            raise
        runs = runs + [(spec[2], q) for spec, q in zip(later, started) if not isinstance(q, BaseException)]
        error = next((e for e in started if isinstance(e, BaseException)), None)
        if error is not None:
            if isinstance(error, ApiError):  # the first request was admitted: its abort is what the metrics count
                error.admitted = True
            self.abort(runs)
            raise error
        return runs

    def abort(self, runs: list[Run]) -> None:
        for sid, queue in runs:
            self.async_engine.abort(sid, queue)

    async def all_of(self, runs: list[Run], disconnected: Disconnected | None) -> list[RequestOutput]:
        """The final outputs of every run; a failure aborts the ones still running."""
        try:
            outs = []
            for sid, q in runs:
                out = await self.collect(sid, q, disconnected)
                self.check_finished(out)
                outs.append(out)
            return outs
        except BaseException:
            self.abort(runs)
            raise

    async def collect(self, rid: str, queue: asyncio.Queue, disconnected: Disconnected | None) -> RequestOutput:
        """Waits for the final output."""
        while True:
            out = await self.next(rid, queue, disconnected)
            if out.finished:
                return out

    async def stream(self, runs: list[Run], chunker: Chunker, final_usage: bool,
                     disconnected: Disconnected | None, per_prompt: int | None = None,
                     continuous: bool = False, role: str | None = None) -> AsyncIterator[str]:
        """The stream of every run's outputs (caraserve.serve.streaming), once the first run's
        first output is there: a request that fails before its first token gets its HTTP status
        (ApiError) instead of a stream, as a non-streamed one would."""
        try:
            first = await self.next(*runs[0], disconnected)
            if first.finished and not first.output_ids:
                self.check_finished(first)
        except BaseException:
            self.abort(runs)
            raise
        return events(runs, first, chunker, final_usage, self.async_engine.abort, per_prompt, continuous, role)

    @staticmethod
    def check_finished(out: RequestOutput) -> None:
        """Raises the ApiError of a request that ended with an error."""
        if out.error is not None:
            status, type_ = error_kind(out)
            headers = {proto.FAULT_HEADER: "request"} if type_ == "request_failed" else None
            raise ApiError(status, out.error, type_, headers, admitted=True)
