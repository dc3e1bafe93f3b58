"""OpenAI's batch file format for offline jobs (as `vllm run-batch` takes it): each input line
{"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body"} is
one call to the server's own app, made in-process, so a line gets what the same call to
`python -m caraserve.serve` answers (chat templates, tools, reasoning, structured outputs,
every error). Its output line is OpenAI's {"id", "custom_id", "response": {"status_code",
"request_id", "body"}, "error": null}; a line that cannot become a call (not JSON, another method
or url, a streamed body) has "response": null and "error": {"code", "message"}."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import httpx

from caraserve.config import ServerConfig
from caraserve.offline import LineError, OfflineSummary, parse_json_line
from caraserve.serve.api import adapter_roots, build_app, served_name_of
from caraserve.serve.async_engine import AsyncEngine

URLS = ("/v1/completions", "/v1/chat/completions")
FIELDS = frozenset({"custom_id", "method", "url", "body"})
# The server settings a batch job's calls answer by (conf/generate.yaml's `server` section)
SERVER_KEYS = ("served_model_name", "chat_template", "tool_call_parser", "reasoning_parser", "max_queue")


def is_batch_file(lines: Iterable[str]) -> bool:
    """Whether a job's lines are OpenAI batch lines: its first line that is a JSON object has a
    "custom_id" (which CaraServe's own lines never carry). A broken line before it is passed
    over: it fails alone either way, and must not turn every other line of the file into one of
    the other format."""
    for line in lines:
        try:
            obj = json.loads(line) if line.strip() else None
        except (ValueError, RecursionError):
            continue
        if isinstance(obj, dict):
            return "custom_id" in obj
    return False


@dataclass(frozen=True)
class BatchCall:
    custom_id: str
    url: str
    body: dict
    weight: int  # engine requests the call queues at once (its n): what it takes of server.max_queue


def parse_batch_line(line: str, number: int) -> BatchCall:
    """The call of the 1-based line `number`, or a LineError (carrying the custom_id when the
    line gives one) naming what is wrong."""
    try:
        obj = parse_json_line(line, number)
    except LineError as e:  # no custom_id to name it: the output's place tells the line
        raise LineError(None, str(e)) from None
    custom_id = obj.get("custom_id") if isinstance(obj, dict) else None
    cid = custom_id if isinstance(custom_id, str) else None

    def bad(msg: str) -> LineError:
        return LineError(cid, f"line {number}: {msg}")

    if not isinstance(obj, dict):
        raise bad("must be a JSON object")
    unknown = sorted(set(obj) - FIELDS)
    if unknown:
        raise bad(f"unknown field(s) {unknown} (a batch line has {sorted(FIELDS)})")
    if not isinstance(custom_id, str) or not custom_id:
        raise bad("'custom_id' must be a non-empty string")
    if obj.get("method") != "POST":
        raise bad(f"'method' must be \"POST\", got {obj.get('method')!r}")
    if obj.get("url") not in URLS:
        raise bad(f"'url' must be one of {list(URLS)}, got {obj.get('url')!r}")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise bad("'body' must be a JSON object (the endpoint's request)")
    if body.get("stream"):
        raise bad("'body.stream' must be false: a batch line's answer is written whole")
    return BatchCall(custom_id, obj["url"], body, _weight(obj["url"], body))


def _weight(url: str, body: dict) -> int:
    """The engine requests a call queues at once, as the server counts them: n per prompt, and a
    completions call's prompt may be a list of prompts (texts or token-id lists). A body the
    server will refuse weighs 1."""
    n = body.get("n")
    n = n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1
    prompt = body.get("prompt")
    many = url == "/v1/completions" and isinstance(prompt, list) and prompt and not all(
        isinstance(p, int) and not isinstance(p, bool) for p in prompt)
    return n * (len(prompt) if many else 1)


def _output(custom_id, response: dict | None, error: dict | None) -> dict:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": response, "error": error}


class _Slots:
    """server.max_queue as a budget the calls in flight share (a call takes its weight, at most
    the whole budget), so no call meets a full queue: each waits its turn instead of a 503.
    Waiters are served first come, first served, and a give wakes only those it lets in: waking
    every waiter per finished call would cost the event loop time quadratic in the job's lines."""

    def __init__(self, total: int):
        self.total, self.free = total, total
        self.waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    async def take(self, weight: int) -> int:
        weight = min(weight, self.total)
        if not self.waiters and self.free >= weight:
            self.free -= weight
            return weight
        turn = asyncio.get_running_loop().create_future()
        self.waiters.append((weight, turn))
        try:
            await turn
        except asyncio.CancelledError:
            if not turn.cancelled():  # let in, then cancelled: its share goes back
                self.free += weight
            turn.cancel()  # (a cancelled turn in the queue is passed over, not searched for)
            self._wake()  # (a big call leaving the head may let the smaller ones behind it in)
            raise
        return weight

    async def give(self, weight: int) -> None:
        self.free += weight
        self._wake()

    def _wake(self) -> None:
        while self.waiters and (self.waiters[0][1].cancelled() or self.waiters[0][0] <= self.free):
            w, turn = self.waiters.popleft()
            if turn.cancelled():
                continue
            self.free -= w
            turn.set_result(None)


class _Job:
    """The calls of one job, run on an event loop of their own thread."""

    def __init__(self, app, calls: list[BatchCall | LineError], max_queue: int, progress):
        self.app, self.calls, self.max_queue, self.progress = app, calls, max_queue, progress
        self.results: list[dict | None] = [None] * len(calls)
        self.tokens = 0
        self.tasks: list[asyncio.Task] = []

    async def run(self) -> None:
        slots = _Slots(self.max_queue)
        transport = httpx.ASGITransport(app=self.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://batch", timeout=None) as client:
            self.tasks = [asyncio.ensure_future(self._one(client, slots, i, c)) for i, c in enumerate(self.calls)]
            await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _one(self, client: httpx.AsyncClient, slots: _Slots, i: int, call) -> None:
        try:
            if isinstance(call, LineError):
                self.results[i] = _output(call.rid, None, {"code": "invalid_request", "message": str(call)})
                return
            weight = await slots.take(call.weight)
            try:
                rid = f"batch-{i + 1}-{uuid.uuid4().hex[:12]}"
                resp = await client.post(call.url, json=call.body, headers={"X-Request-Id": rid})
            finally:
                await slots.give(weight)
            body = resp.json()
            if resp.status_code == 200:
                self.tokens += body.get("usage", {}).get("completion_tokens", 0)
            self.results[i] = _output(call.custom_id, {"status_code": resp.status_code, "request_id": rid,
                                                       "body": body}, None)
        except asyncio.CancelledError:  # the job was interrupted: the call's requests are aborted
            cid = call.rid if isinstance(call, LineError) else call.custom_id
            self.results[i] = _output(cid, None, {"code": "interrupted", "message": "interrupted before it finished"})
        except Exception as e:  # whatever one call meets, it fails alone
            self.results[i] = _output(call.custom_id, None, {"code": "internal_error",
                                                              "message": f"{type(e).__name__}: {e}"})
        finally:
            if self.progress is not None:
                self.progress.update(1)

    def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()


def run_openai_batch(engine, server: ServerConfig, lines: Iterable[str], progress=None) -> tuple[
        list[dict], OfflineSummary]:
    """Runs every batch line through the server's app over `engine` at once (at most
    server.max_queue engine requests queued); one output line per non-blank input line, in input
    order. Interrupted (KeyboardInterrupt), it returns what finished and an "interrupted" error
    for the others, whose requests are aborted."""
    calls: list[BatchCall | LineError] = []
    blank = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            blank += 1
            continue
        try:
            calls.append(parse_batch_line(line, number))
        except LineError as e:
            calls.append(e)
    if progress is not None:
        progress.reset(total=len(calls))
    logging.getLogger("httpx").setLevel(logging.WARNING)  # its line per call would bury the job's own
    service = AsyncEngine(engine, server.max_queue, heap_trim_s=0)
    app = build_app(service, server, served_name_of(engine, server), adapter_roots(engine))
    service.start()
    loop = asyncio.new_event_loop()
    looper = threading.Thread(target=loop.run_forever, name="caraserve-batch", daemon=True)
    looper.start()
    # calls in flight within the app's own limit too (server.limit_concurrency: past it, a 503)
    job, interrupted = _Job(app, calls, min(server.max_queue, server.limit_concurrency), progress), False
    try:
        service.wait_ready()  # the engine thread compiles first with engine.compile=true
        t0 = time.perf_counter()
        done = asyncio.run_coroutine_threadsafe(job.run(), loop)
        try:
            while not _finished(done):
                pass
        except KeyboardInterrupt:
            interrupted = True
            loop.call_soon_threadsafe(job.cancel)
            while not _finished(done, shielded=True):
                pass
        seconds = time.perf_counter() - t0
    finally:
        service.stop()
        loop.call_soon_threadsafe(loop.stop)
        looper.join(timeout=10)
    errors = sum(1 for r in job.results if r["error"] is not None or r["response"]["status_code"] != 200)
    return job.results, OfflineSummary(len(calls), errors, job.tokens, seconds, blank, interrupted)


def _finished(done, shielded: bool = False) -> bool:
    """Whether the job's future is done, after waiting for it a moment. The main thread waits in
    short turns so Ctrl-C lands here; shielded, a second Ctrl-C (as people press it) is ignored
    while the cancelled calls end."""
    try:
        done.result(timeout=0.1)
        return True
    except concurrent.futures.TimeoutError:
        return False
    except KeyboardInterrupt:
        if shielded:
            return False
        raise
