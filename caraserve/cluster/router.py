"""The router: one OpenAI-compatible front over several caraserve.serve replicas.

Routing. Each request goes where the policy (caraserve.cluster.policies) puts it, judged on a
`ReplicaState` per replica built from two sources:
  - the replica's live state, read from its /v1/state every `poll_interval_s`: running and queued
    requests with their ranks and remaining output tokens, resident adapters, the latency model
    its scheduler keeps refitting;
  - the router's own accounting between two reads: every request it sends carries an
    X-Request-Id with this router's prefix, so a request sent after the last read counts as
    queued there, and one that finished since no longer counts although the read still shows it.
A replica without a latency model of its own is judged with `perf_model` (or the paper-like
linear model). When every replica is full, the request waits (at most `max_wait_s`) until a
request finishes or a read shows room.

Failures. A replica that refuses the connection, answers 5xx, or has not sent the first token
within `first_token_timeout_s` (not streaming: the whole answer within `request_timeout_s`) is
given up for that request, which goes to another replica (up to `max_attempts`; nothing has
reached the client yet, so a retry is invisible to it). A streamed answer that breaks after its
first token cannot be replayed: the client gets an error event and [DONE]. `max_failures`
consecutive failures mark a replica down; a down replica gets no requests and is probed on
/health every `probe_interval_s` until it answers.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

import httpx
import numpy as np
from fastapi.responses import Response, StreamingResponse

from caraserve.cluster.config import RouterServiceConfig
from caraserve.cluster.policies import PolicyParams, ReplicaState, RequestView, make_policy
from caraserve.perf.model import PerfModel
from caraserve.serve import protocol as proto
from caraserve.serve.http import ApiError

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 32  # until a replica's first state read says otherwise


class ReplicaFailed(Exception):
    """This replica could not serve this request; another one may."""

    def __init__(self, message: str, counts: bool = True):
        super().__init__(message)
        self.counts = counts  # towards marking the replica down (an overloaded replica is not broken)


class Replica:
    """One caraserve.serve replica as the router sees it."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.up = True
        self.failures = 0  # consecutive
        self.snapshot: dict | None = None  # the last /v1/state
        self.perf: PerfModel | None = None  # the latency model in that state, if any
        self.inflight: dict[str, RequestView] = {}  # request id -> view, for requests this router sent

    def adapters(self) -> dict[str, int]:
        return (self.snapshot or {}).get("adapters", {})

    def state(self, prefix: str, fallback: PerfModel) -> ReplicaState:
        """The last read merged with the router's own accounting since (see the module docstring)."""
        snap = self.snapshot or {}
        seen: set[str] = set()

        def views(items) -> list[RequestView]:
            out = []
            for v in map(RequestView.from_dict, items):
                seen.add(v.request_id)
                if v.request_id.startswith(prefix) and v.request_id not in self.inflight:
                    continue  # ours, and finished since the read
                out.append(v)
            return out

        running = views(snap.get("running", ()))
        queued = views(snap.get("queued", ())) + [v for rid, v in self.inflight.items() if rid not in seen]
        return ReplicaState(tuple(running), tuple(queued), int(snap.get("max_batch_size", DEFAULT_MAX_BATCH)),
                            frozenset(snap.get("resident_adapters", ())), self.perf or fallback)


def estimate_prompt_tokens(path: str, body: dict) -> int:
    """The router has no tokenizer: token ids are counted, text is taken at ~4 bytes a token."""
    if path.endswith("/chat/completions"):
        chars = 0
        for m in body.get("messages") or ():
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            chars += len(str(content or "").encode()) + 16  # role and template tokens
        return max(1, chars // 4)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return len(prompt)
    if isinstance(prompt, list) and prompt:
        prompt = prompt[0]
    return max(1, len(str(prompt or "").encode()) // 4)


class Router:
    def __init__(self, cfg: RouterServiceConfig, transport: httpx.AsyncBaseTransport | None = None):
        self.cfg = cfg
        self.replicas = [Replica(u) for u in cfg.replicas]
        params = PolicyParams(cfg.slo_ms / 1e3, cfg.avg_output_tokens, cfg.resident_discount)
        self.policy = make_policy(cfg.policy, params, np.random.default_rng(cfg.seed))
        self.fallback = PerfModel.load(cfg.perf_model) if cfg.perf_model else PerfModel.linear()
        self.prefix = f"rt{uuid.uuid4().hex[:8]}-"
        self._ids = itertools.count()
        self._transport = transport
        self._headers = {"Authorization": f"Bearer {cfg.replica_api_key}"} if cfg.replica_api_key else {}
        self.client: httpx.AsyncClient | None = None
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.waiting = 0  # requests waiting for a replica with room
        self.on_event = None  # on_event(kind, replica_url): "sent" | "retry" | "failed" | "down" | "up"

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self.client is not None:
            return
        self.client = httpx.AsyncClient(transport=self._transport, headers=self._headers,
                                        timeout=httpx.Timeout(self.cfg.request_timeout_s, connect=5.0))
        await asyncio.gather(*(self._read_state(r) for r in self.replicas))
        self._tasks = [asyncio.create_task(self._watch(r)) for r in self.replicas]
        log.info("routing over %d replicas (%d answering) with policy %s", len(self.replicas),
                 sum(r.snapshot is not None for r in self.replicas), self.cfg.policy)

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    def _wake(self) -> None:
        """Wakes requests waiting for room (a request finished or a state read came in)."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _emit(self, kind: str, rep: Replica) -> None:
        if self.on_event is not None:
            self.on_event(kind, rep.url)

    # ---- replica health -----------------------------------------------------------------------

    async def _watch(self, rep: Replica) -> None:
        while True:
            if rep.up:
                await asyncio.sleep(self.cfg.poll_interval_s)
                await self._read_state(rep)
            else:
                await asyncio.sleep(self.cfg.probe_interval_s)
                await self._probe(rep)

    async def _read_state(self, rep: Replica) -> None:
        try:
            # A replica answers between two engine steps: a long prefill delays the answer, and a
            # slow answer is not a failure (the last state and the router's own accounting serve).
            r = await self.client.get(rep.url + "/v1/state", timeout=self.cfg.first_token_timeout_s)
            r.raise_for_status()
            snap = r.json()
            perf = PerfModel.from_dict(snap["perf_model"]) if snap.get("perf_model") else None
        except httpx.TimeoutException:
            log.debug("replica %s: state read timed out", rep.url)
            return
        except (httpx.HTTPError, ValueError, KeyError) as e:
            self._failed(rep, f"state read failed: {type(e).__name__}: {e}")
            return
        rep.snapshot, rep.perf = snap, perf
        self._wake()

    async def _probe(self, rep: Replica) -> None:
        try:
            r = await self.client.get(rep.url + "/health", timeout=2.0)
            healthy = r.status_code == 200
        except httpx.HTTPError:
            healthy = False
        if healthy:
            rep.up, rep.failures = True, 0
            log.info("replica %s is back", rep.url)
            self._emit("up", rep)
            await self._read_state(rep)

    def _failed(self, rep: Replica, why: str, counts: bool = True) -> None:
        log.warning("replica %s: %s", rep.url, why)
        if not counts:
            return
        rep.failures += 1
        if rep.up and rep.failures >= self.cfg.max_failures:
            rep.up = False
            log.error("replica %s marked down after %d failures; probing it every %.1f s", rep.url,
                      rep.failures, self.cfg.probe_interval_s)
            self._emit("down", rep)

    # ---- routing ------------------------------------------------------------------------------

    def base_model(self) -> str | None:
        return next((r.snapshot["model"] for r in self.replicas if r.snapshot and "model" in r.snapshot), None)

    def adapter_rank(self, name: str) -> int | None:
        return next((r.adapters()[name] for r in self.replicas if name in r.adapters()), None)

    def resolve(self, model) -> tuple[str | None, int]:
        """(adapter or None for the base model, its rank); 404 for a model no replica serves."""
        base = self.base_model()
        if base is None:
            raise ApiError(503, "no replica has answered yet; retry later", "server_overloaded")
        if not isinstance(model, str):
            raise ApiError(400, "model: a string is required", "invalid_request_error")
        if model == base:
            return None, 0
        rank = self.adapter_rank(model)
        if rank is None:
            raise ApiError(404, f"The model `{model}` does not exist.", "not_found_error")
        return model, rank

    async def pick(self, view: RequestView, rid: str, tried: list[Replica]) -> Replica:
        """The policy's replica for the request (not one already tried while others are up); waits
        while every candidate is full. Records the request as in flight there."""
        deadline = time.monotonic() + self.cfg.max_wait_s
        self.waiting += 1
        try:
            while True:
                serving = [r for r in self.replicas if r.up and r.snapshot is not None
                           and (not view.adapter or view.adapter in r.adapters())]
                candidates = [r for r in serving if r not in tried] or serving
                if candidates:
                    states = [r.state(self.prefix, self.fallback) for r in candidates]
                    i = self.policy.choose(view, states)
                    if i is not None:
                        rep = candidates[i]
                        rep.inflight[rid] = view
                        return rep
                left = deadline - time.monotonic()
                if left <= 0:
                    why = "every replica is full" if candidates else "no replica that serves this model is up"
                    raise ApiError(503, f"{why} (waited {self.cfg.max_wait_s:.0f} s); retry later",
                                   "server_overloaded")
                try:
                    await asyncio.wait_for(self._changed.wait(), timeout=min(left, self.cfg.probe_interval_s))
                except asyncio.TimeoutError:
                    pass
        finally:
            self.waiting -= 1

    def _done(self, rep: Replica, rid: str) -> None:
        if rep.inflight.pop(rid, None) is not None:
            self._wake()

    async def forward(self, path: str, body: dict, disconnected=None) -> Response:
        """Routes one completion / chat request; retries on another replica until the first token.
        disconnected: an async callable telling whether the client went away (non-streaming)."""
        adapter, rank = self.resolve(body.get("model"))
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if not isinstance(limit, int) or limit < 1:
            limit = 16 if path == "/v1/completions" else int(self.cfg.avg_output_tokens)
        view = RequestView(adapter or "", rank, estimate_prompt_tokens(path, body), limit)
        tried: list[Replica] = []
        errors = []
        for _ in range(self.cfg.max_attempts):
            rid = f"{self.prefix}{next(self._ids)}"
            rep = await self.pick(view, rid, tried)
            tried.append(rep)
            self._emit("sent", rep)
            try:
                if body.get("stream"):
                    return await self._stream(rep, rid, path, body)
                return await self._post(rep, rid, path, body, disconnected)
            except ReplicaFailed as e:
                self._done(rep, rid)
                self._failed(rep, str(e), e.counts)
                self._emit("retry", rep)
                errors.append((rep.url, e))
            except BaseException:
                self._done(rep, rid)
                raise
        message = (f"no replica could serve the request after {len(errors)} attempts: "
                   + "; ".join(f"{url}: {e}" for url, e in errors))
        if not any(e.counts for _, e in errors):  # every replica tried was merely busy
            raise ApiError(503, message, "server_overloaded")
        raise ApiError(502, message, "bad_gateway")

    @staticmethod
    def _check_status(r: httpx.Response) -> None:
        """Raises ReplicaFailed when another replica may serve the request; a 5xx the replica marks
        as caused by the request itself goes back to the client like a 4xx."""
        if r.headers.get(proto.FAULT_HEADER) == "request":
            return
        if r.status_code == 503:
            raise ReplicaFailed("overloaded (503)", counts=False)
        if r.status_code >= 500:
            raise ReplicaFailed(f"answered {r.status_code}")

    async def _post(self, rep: Replica, rid: str, path: str, body: dict, disconnected) -> Response:
        task = asyncio.create_task(self.client.post(rep.url + path, json=body, headers={"X-Request-Id": rid}))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if done:
                    break
                if disconnected is not None and await disconnected():
                    raise ApiError(499, "client disconnected", "client_closed")  # closing aborts it there
            try:
                r = task.result()
            except httpx.HTTPError as e:
                raise ReplicaFailed(f"{type(e).__name__}: {e}") from e
        finally:
            task.cancel()
        self._check_status(r)
        rep.failures = 0
        self._done(rep, rid)
        return Response(r.content, status_code=r.status_code, media_type="application/json")

    async def _stream(self, rep: Replica, rid: str, path: str, body: dict) -> Response:
        req = self.client.build_request("POST", rep.url + path, json=body, headers={"X-Request-Id": rid})
        timeout = self.cfg.first_token_timeout_s
        resp = None
        try:
            resp = await asyncio.wait_for(self.client.send(req, stream=True), timeout)
            if resp.status_code != 200:
                content = await resp.aread()
                self._check_status(resp)
                self._done(rep, rid)
                return Response(content, status_code=resp.status_code, media_type="application/json")
            chunks = resp.aiter_raw()
            first = await asyncio.wait_for(anext(chunks), timeout)
        except (httpx.HTTPError, asyncio.TimeoutError, StopAsyncIteration) as e:
            if resp is not None:
                await resp.aclose()
            if isinstance(e, httpx.HTTPError):
                raise ReplicaFailed(f"{type(e).__name__}: {e}") from e
            raise ReplicaFailed(f"no first token within {timeout:.0f} s") from e
        except BaseException:
            if resp is not None:
                await resp.aclose()
            raise
        rep.failures = 0
        return StreamingResponse(self._relay(rep, rid, resp, first, chunks), media_type="text/event-stream")

    async def _relay(self, rep: Replica, rid: str, resp: httpx.Response, first: bytes,
                     chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        try:
            yield first
            async for chunk in chunks:
                yield chunk
        except httpx.HTTPError as e:
            self._failed(rep, f"stream broke after the first token: {type(e).__name__}")
            err = proto.error_body(f"replica failed mid-stream: {type(e).__name__}", "bad_gateway", 502)
            yield f"data: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode()
        finally:
            await resp.aclose()  # a client that went away closes the replica's stream: it aborts there
            self._done(rep, rid)

    # ---- fan-out ------------------------------------------------------------------------------

    async def broadcast(self, path: str, body: dict) -> Response:
        """Sends an adapter load/unload to every replica that is up; the first failure's answer,
        naming the replica, when any refuses."""
        up = [r for r in self.replicas if r.up]
        if not up:
            raise ApiError(503, "no replica is up", "server_overloaded")
        results = await asyncio.gather(*(self.client.post(r.url + path, json=body) for r in up),
                                       return_exceptions=True)
        for rep, res in zip(up, results):
            if isinstance(res, Exception):
                raise ApiError(502, f"replica {rep.url}: {type(res).__name__}: {res}", "bad_gateway")
            if res.status_code != 200:
                message = res.json().get("error", {}).get("message", res.text) if res.content else ""
                raise ApiError(res.status_code, f"replica {rep.url}: {message}", "invalid_request_error")
        await asyncio.gather(*(self._read_state(r) for r in up))
        return Response(results[0].content, media_type="application/json")

    def describe(self) -> dict:
        """The router's own view (its /v1/state)."""
        return {"policy": self.cfg.policy, "waiting": self.waiting, "model": self.base_model(), "replicas": [
            {"url": r.url, "up": r.up, "failures": r.failures, "inflight": len(r.inflight),
             "running": len((r.snapshot or {}).get("running", ())), "queued": len((r.snapshot or {}).get("queued", ()))}
            for r in self.replicas]}
