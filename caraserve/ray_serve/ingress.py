"""The OpenAI-compatible ingress of the Ray Serve application.

The same route modules and guard as the plain server (caraserve.serve.routes, serve.api) over
`RayService`, which sends each call to an EngineReplica through a streaming DeploymentHandle;
RankAwareRequestRouter picks the replica from the call's RouteHint.

Failures. Ray Serve does not retry a call a replica has accepted. RayService does, on another
replica, as long as nothing has reached the client: when the replica dies or cannot be reached
(a Ray error), sends nothing within `first_token_timeout_s` (a whole non-streamed answer:
`request_timeout_s`), or answers 5xx for a reason of its own (overloaded, its engine failed). A
4xx, or a 5xx the replica marks as caused by the request (header x-caraserve-fault: request),
goes back to the client as it is, once. A stream that breaks after its first token ends with
an error event and [DONE].

Fan-out. Adapter loads and unloads go to every replica, one after the other (each call names
the replicas already done; the router sends it to another, and a call reaching a replica done
already ends the round); /v1/models is the union of the replicas' lists; /health counts the
replicas that answer healthy. A load is all or nothing (one replica refuses: those that took it
unload it again); an unload counts a replica that answers 404 as done. The ingress remembers
the adapters loaded through it: a replica that answers 404 for one of them (Serve started it
after the load: a replacement, or a scale-up) gets the adapter loaded, and the request is
retried there once.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from ray import exceptions as ray_errors
from ray.serve.exceptions import RayServeException

from caraserve.config import ServerConfig
from caraserve.ray_serve.config import RoutingConfig
from caraserve.ray_serve.messages import Head, RouteHint, estimate_prompt_tokens
from caraserve.serve import protocol as proto
from caraserve.serve.http import ApiError, BadGateway, BadRequest, ClientClosed, EngineUnavailable, NotFound, Overloaded
from caraserve.serve.routes import guarded_app

log = logging.getLogger("ray.serve.caraserve")

MAX_FAN_OUT = 1024  # replicas one fan-out round reaches at most
# A replica that cannot serve the request: Ray's errors (dead or unreachable actor, a raise in
# the replica), Serve's (back pressure), and no answer in time.
TRANSPORT_ERRORS = (ray_errors.RayError, RayServeException, asyncio.TimeoutError, StopAsyncIteration)


class Retry(Exception):
    """This replica could not serve this request; another may. reason: "overloaded" (it answered
    503), "replica_fault" (another 5xx of its own), "timeout" or "transport"."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


async def _started(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """An async generator run to its first yield (an empty line, dropped): a client gone before
    the first line is sent leaves the stream never iterated, and a generator never started runs
    no `finally` (the call stays in flight, its replica generating). Started, it runs it when
    closed or collected."""
    await anext(lines)
    return lines


def _raise_answer(head: Head) -> None:
    """The replica's error as the client gets it (status, body's message and type, headers)."""
    err = (head.body or {}).get("error", {})
    raise ApiError(head.status, err.get("message", "error"), err.get("type", "internal_error"), head.headers)


class RayService:
    """caraserve.serve.service.Service over the replicas of a Ray Serve deployment."""

    def __init__(self, replicas, routing: RoutingConfig):
        self.replicas, self.cfg = replicas, routing
        self.registry = r = CollectorRegistry()
        self.calls = Counter("caraserve_ray_requests", "Completion calls by outcome", ["outcome"], registry=r)
        self.runtime_adapters: dict[str, proto.LoadLoraRequest] = {}  # loaded through this ingress
        self.runtime_ranks: dict[str, int] = {}  # their ranks, as the load answered
        # unloaded through this ingress: gone from the whole deployment, though a replica started
        # later (from adapters.dir) holds it again, until it is loaded through this ingress again
        self.unloaded: set[str] = set()
        self.inflight, self.draining = 0, False  # calls being answered; refusing new ones (drain)
        self.live_ids: set[str] = set()  # their ids: one in flight is refused again, as a single server does
        self.retries = Counter("caraserve_ray_retries", "Calls given up on a replica and retried", ["reason"],
                               registry=r)

    # ---- completions --------------------------------------------------------------------------

    async def completion(self, body, rid, include_usage, disconnected=None):
        return await self._counted("completion", body, rid, include_usage, disconnected)

    async def chat(self, body, rid, include_usage, disconnected=None):
        return await self._counted("chat", body, rid, include_usage, disconnected)

    async def _counted(self, kind: str, body, rid: str, include_usage: bool, disconnected):
        """_generate, counted in `inflight` until its answer is out (a stream: its last line)."""
        if self.draining:
            raise EngineUnavailable("the server is shutting down")
        if body.model in self.unloaded:
            raise NotFound(f"The model `{body.model}` does not exist.")
        if rid in self.live_ids:  # (replicas could not tell: each would take one of them)
            raise BadRequest(f"request id {rid!r} is already in flight")
        self.inflight += 1
        self.live_ids.add(rid)
        try:
            answer = await self._generate(kind, body, rid, include_usage, disconnected)
        except BaseException:
            self._done(rid)
            raise
        if isinstance(answer, dict):
            self._done(rid)
            return answer
        return await _started(self._until_done(answer, rid))

    def _done(self, rid: str) -> None:
        self.inflight -= 1
        self.live_ids.discard(rid)

    async def _until_done(self, lines, rid: str) -> AsyncIterator[str]:
        try:
            yield ""  # (taken by _started)
            async for line in lines:
                yield line
        finally:
            self._done(rid)
            await lines.aclose()  # now, not when collected: a client gone aborts the replica's request at once

    async def drain(self, timeout_s: float) -> int:
        """Refuses new calls (503) and waits up to timeout_s for those being answered to finish;
        returns how many are still running."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.inflight and loop.time() < deadline:
            await asyncio.sleep(0.1)
        return self.inflight

    async def _generate(self, kind: str, body, rid: str, include_usage: bool, disconnected):
        limit = getattr(body, "max_completion_tokens", None) or body.max_tokens
        max_tokens = limit if isinstance(limit, int) and limit > 0 else int(self.cfg.avg_output_tokens)
        prompts = len(body.prompt) if isinstance(body, proto.CompletionRequest) and isinstance(body.prompt, list) \
            and body.prompt and not isinstance(body.prompt[0], int) else 1
        requests = prompts * (body.n if isinstance(body.n, int) and body.n > 0 else 1)
        prompt_tokens = max(1, estimate_prompt_tokens(body) // prompts)
        errors: list[Retry] = []
        target, resynced = "", False
        for attempt in range(self.cfg.max_attempts):
            # A retry gets an id of its own: the replica tried first may still list the first one.
            hint = RouteHint(body.model or "", prompt_tokens, max_tokens, rid if attempt == 0 else f"{rid}.{attempt}",
                             attempt, target=target, rank=self.runtime_ranks.get(body.model, 0), origin=rid,
                             requests=requests)
            gen = self.replicas.options(stream=True).generate.remote(hint, kind, body, include_usage)
            try:
                answer, replica = await self._first(gen, body.stream, disconnected)
            except Retry as e:
                gen.cancel()
                errors.append(e)
                log.warning("request %s: attempt %d failed (%s)", rid, attempt, e)
                continue
            except BaseException:
                gen.cancel()
                raise
            if (isinstance(answer, ApiError) and answer.status == 404 and body.model in self.runtime_adapters
                    and not resynced and attempt + 1 < self.cfg.max_attempts):
                resynced, target = True, replica
                await self._on_replica(replica, "load_adapter", self.runtime_adapters[body.model])
                continue
            if isinstance(answer, ApiError):
                self.calls.labels("refused").inc()
                raise answer
            if isinstance(answer, dict):  # (a stream counts itself when it ends: _relay)
                self.calls.labels("ok").inc()
            return answer
        self.calls.labels("failed").inc()
        why = f"no replica could serve the request after {len(errors)} attempts: " + "; ".join(map(str, errors))
        if all(e.reason == "overloaded" for e in errors):  # every replica full: come back later
            raise Overloaded(why)
        raise BadGateway(why)

    async def _first(self, gen, stream: bool, disconnected):
        """(The replica's answer, the replica): a dict, an ApiError for the client, or a stream (its
        first line already received); raises Retry when another replica should try."""
        timeout = self.cfg.first_token_timeout_s if stream else self.cfg.request_timeout_s
        try:
            head: Head = await self._wait(anext(gen), timeout, disconnected)
            if head.body is not None:
                if head.status == 200:
                    return head.body, head.replica
                if head.status >= 500 and (head.headers or {}).get(proto.FAULT_HEADER) != "request":
                    reason = "overloaded" if head.status == 503 else "replica_fault"
                    self.retries.labels(reason).inc()
                    raise Retry(reason, f"replica {head.replica} answered {head.status}")
                try:
                    _raise_answer(head)
                except ApiError as e:
                    return e, head.replica
            first = await self._wait(anext(gen), self.cfg.first_token_timeout_s, disconnected)
        except TRANSPORT_ERRORS as e:
            reason = "timeout" if isinstance(e, asyncio.TimeoutError) else "transport"
            self.retries.labels(reason).inc()
            raise Retry(reason, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        return await _started(self._relay(gen, first)), head.replica

    async def _on_replica(self, replica: str, op: str, body) -> None:
        """An adapter's load or unload on one replica: a runtime adapter loaded onto a replica
        started after its load, or unloaded from one that took a load another refused."""
        try:
            head: Head = await self.replicas.fan_out.remote(RouteHint(target=replica), op, body)
        except TRANSPORT_ERRORS as e:
            log.warning("%s %s on replica %s failed: %s", op, body.lora_name, replica, type(e).__name__)
            return
        log.info("%s %s on replica %s: %d", op, body.lora_name, head.replica, head.status)

    @staticmethod
    async def _wait(step, timeout: float, disconnected):
        """Awaits step within timeout; a client that goes away meanwhile ends the call (499)."""
        task = asyncio.ensure_future(step)
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while True:
                done, _ = await asyncio.wait({task}, timeout=min(0.5, max(deadline - loop.time(), 0)))
                if done:
                    return task.result()
                if loop.time() >= deadline:
                    raise asyncio.TimeoutError
                if disconnected is not None and await disconnected():
                    raise ClientClosed("client disconnected")
        finally:
            task.cancel()

    async def _relay(self, gen, first: str) -> AsyncIterator[str]:
        """The stream's lines; counted in caraserve_ray_requests when it ends: ok, broken (its
        replica failed after the first token) or disconnected (the client went away)."""
        outcome, last = "disconnected", first
        try:
            yield ""  # (taken by _started)
            yield first
            async for last in gen:
                yield last
            outcome = "ok"
        except TRANSPORT_ERRORS as e:
            if last.endswith("data: [DONE]\n\n"):  # the whole answer is out: what follows is not the client's
                outcome = "ok"
                return
            outcome = "broken"
            log.warning("stream broke after its first token: %s", type(e).__name__)
            err = proto.error_body(f"replica failed mid-stream: {type(e).__name__}", "bad_gateway", 502)
            yield f"data: {json.dumps(err)}\n\ndata: [DONE]\n\n"
        finally:
            self.calls.labels(outcome).inc()
            if outcome == "disconnected":  # cancelling aborts the request on the replica
                gen.cancel()

    # ---- fan-out ------------------------------------------------------------------------------

    async def _fan_out(self, op: str, body=None, heads: list[Head] | None = None) -> list[Head]:
        """Every replica's answer to op, one after another; `heads` (when given) is filled as they
        come, so a caller sees which replicas acted before one failed."""
        covered: set[str] = set()
        heads = [] if heads is None else heads
        while len(covered) < MAX_FAN_OUT:
            try:
                head: Head = await self.replicas.fan_out.remote(RouteHint(covered=frozenset(covered)), op, body)
            except TRANSPORT_ERRORS as e:
                raise BadGateway(f"a replica failed during {op}: {type(e).__name__}") from e
            if head.skipped or head.replica in covered:
                break
            covered.add(head.replica)
            heads.append(head)
        return heads

    async def _everywhere(self, op: str, body, heads: list[Head] | None = None) -> dict:
        heads = await self._fan_out(op, body, heads)
        for head in heads:
            if head.status != 200:
                err = (head.body or {}).get("error", {})
                raise ApiError(head.status, f"replica {head.replica}: {err.get('message', '')}",
                               err.get("type", "internal_error"), head.headers)
        return {**heads[0].body, "replicas": len(heads)}

    async def load_adapter(self, body) -> dict:
        heads: list[Head] = []
        try:
            result = await self._everywhere("load_adapter", body, heads)
        except ApiError:
            # All or nothing, as a single server's load: a replica that kept it would serve an
            # adapter the caller was told failed to load, and refuse the same load sent again
            # ("already registered")
            for head in heads:
                if head.status == 200:
                    await self._on_replica(head.replica, "unload_adapter",
                                           proto.UnloadLoraRequest(lora_name=body.lora_name))
            raise
        self.runtime_adapters[body.lora_name] = body
        if isinstance(result.get("rank"), int):
            self.runtime_ranks[body.lora_name] = result["rank"]
        self.unloaded.discard(body.lora_name)
        return result

    async def unload_adapter(self, body) -> dict:
        """Unloads on every replica, one after another. When one refuses (409: still in use past
        server.unload_timeout_s) after others had unloaded it, the deployment is made whole
        again: an adapter loaded through this ingress is loaded again where it went, as a single
        server keeps an adapter whose unload it refused; one of adapters.dir (whose files this
        ingress does not know) stays unloaded, answered 404 here, and the answer says so."""
        name = body.lora_name
        heads = await self._fan_out("unload_adapter", body)
        # A replica that answers 404 does not serve it: it is where the unload leaves every replica
        # (unloaded there before, or a replacement Serve started after a load through here)
        if all(h.status == 404 for h in heads):
            raise NotFound(f"adapter {name!r} is not loaded")
        refused = next((h for h in heads if h.status not in (200, 404)), None)
        if refused is None:
            self.runtime_adapters.pop(name, None)
            self.runtime_ranks.pop(name, None)
            self.unloaded.add(name)
            return {**next(h.body for h in heads if h.status == 200), "replicas": len(heads)}
        err = (refused.body or {}).get("error", {})
        why = f"replica {refused.replica}: {err.get('message', '')}"
        done = sum(h.status == 200 for h in heads)
        if done and name in self.runtime_adapters:
            await self._fan_out("load_adapter", self.runtime_adapters[name])  # (where it stayed: refused, unchanged)
            why += f"; the {done} replica(s) that had unloaded it loaded it again"
        elif done:
            self.unloaded.add(name)
            why += f"; {done} replica(s) had unloaded it: it is unloaded here (404) and goes from the others " \
                   "once their requests end and it is unloaded again"
        raise ApiError(refused.status, why, err.get("type", "internal_error"), refused.headers)

    async def tokenize(self, body) -> dict:
        return await self._one("tokenize", body)

    async def detokenize(self, body) -> dict:
        return await self._one("detokenize", body)

    async def _one(self, op: str, body) -> dict:
        """Any one replica's answer (every replica holds the same model and tokenizer)."""
        try:
            head: Head = await self.replicas.fan_out.remote(RouteHint(covered=frozenset()), op, body)
        except TRANSPORT_ERRORS as e:
            raise BadGateway(f"a replica failed during {op}: {type(e).__name__}") from e
        if head.status != 200:
            _raise_answer(head)
        return head.body

    async def models(self) -> list[dict]:
        cards: dict[str, dict] = {}
        base = None
        for head in await self._fan_out("models"):
            if head.status != 200:
                continue
            data = head.body["data"]
            if base is None or data[0].get("max_model_len", 0) < base.get("max_model_len", 0):
                base = data[0]  # the smallest context length a replica takes: a request must fit anywhere
            for card in data[1:]:
                if card["id"] in self.unloaded:  # (a replica started since holds it again)
                    continue
                seen = cards.setdefault(card["id"], card)
                seen["resident"] = bool(seen.get("resident")) or bool(card.get("resident"))
        if base is None:
            raise Overloaded("no replica answered")
        return [base, *cards.values()]

    async def health(self) -> dict:
        heads = await self._fan_out("health")
        up = sum(h.status == 200 for h in heads)
        if not up:
            raise EngineUnavailable("no replica is serving")
        return {"status": "ok", "replicas_up": up, "replicas": len(heads)}

    async def metrics(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    async def state(self) -> dict:
        return {"policy": self.cfg.policy,
                "replicas": [{"replica": h.replica, **h.body} for h in await self._fan_out("state") if h.status == 200]}


class Ingress:
    """The ingress deployment (wrapped by serve.ingress() in app.py): the API over RayService."""

    def __init__(self, replicas, server: dict, routing: dict):
        self.server = ServerConfig.from_dict(server)
        self.service = RayService(replicas, RoutingConfig.from_dict(routing))

    async def drain(self, timeout_s: float) -> int:
        """Called through the application's handle on shutdown (caraserve.ray_serve.__main__)."""
        return await self.service.drain(timeout_s)

    def __serve_build_asgi_app__(self):
        return guarded_app(self.service, self.server, title="CaraServe on Ray Serve")
