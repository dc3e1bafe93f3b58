"""EngineReplica: one engine as a Ray Serve replica (one per GPU, or a CPU share).

It runs the same service layer as the plain server (caraserve.serve.service.EngineService) and
answers the ingress through a streaming handle: a `Head` first (a whole JSON answer, an error
with its status, or the start of a stream), then the stream's SSE lines. It publishes its
EngineState to the request router (`record_routing_stats`, polled by Serve's controller) and
tells Serve when its engine has failed (`check_health`), so that Serve replaces it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from caraserve.ray_serve.messages import Head, RouteHint
from caraserve.serve import protocol as proto
from caraserve.serve.http import ApiError, Overloaded
from caraserve.state import EngineState

log = logging.getLogger(__name__)

FAN_OUT_OPS = ("models", "load_adapter", "unload_adapter", "health", "state", "tokenize", "detokenize")


class EngineReplica:
    """composed: the plain server's composed configuration (engine sections and `server`)."""

    def __init__(self, composed: dict[str, Any], max_calls: int | None = None):
        # Imported here: the ingress process imports this module for the class, not torch.
        from caraserve.engine import Engine
        from caraserve.serve.__main__ import configs
        from caraserve.serve.api import adapter_roots, served_name_of
        from caraserve.serve.async_engine import AsyncEngine
        from caraserve.serve.service import EngineService

        engine_cfg, server = configs(composed)
        engine = Engine(engine_cfg)
        self.async_engine = AsyncEngine(engine, server.max_queue, heap_trim_s=server.heap_trim_s,
                                        stall_timeout_s=server.stall_timeout_s)
        self.service = EngineService(self.async_engine, served_name_of(engine, server), adapter_roots(engine),
                                     server.unload_timeout_s, server.chat_template, server.log_requests,
                                     server.tool_call_parser, server.reasoning_parser)
        self.async_engine.start()
        # cluster.max_ongoing_requests: completion calls taken at once, more are refused (503, the
        # ingress tries another replica). Serve's own limit is set above it (app.py): it counts
        # every call, and probes and adapter fan-outs must not wait behind a full replica's completions
        self.max_calls, self.calls = max_calls, 0
        # Serve routes to a replica once its constructor has returned: after the warm-up (with
        # engine.compile=true the engine compiles first), so no request queues on a replica that
        # is not serving yet while another is
        if not self.async_engine.wait_ready():
            raise RuntimeError(f"the engine failed while warming up ({self.async_engine.fault or 'stopped'})")
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except RuntimeError:  # constructed outside Serve (tests)
            self.replica_id = "local"
        log.info("replica %s serving %s", self.replica_id, self.service.served_name)

    def __del__(self):
        async_engine = getattr(self, "async_engine", None)
        if async_engine is not None:
            async_engine.stop()

    async def generate(self, hint: RouteHint, kind: str, body, include_usage: bool) -> AsyncIterator:
        """A completion ("completion") or chat ("chat") call: a Head, then SSE lines if streamed."""
        call = self.service.completion if kind == "completion" else self.service.chat
        if self.max_calls is not None and self.calls >= self.max_calls:
            e = Overloaded(f"{self.calls} completion calls are running on this replica (cluster.max_ongoing_requests)")
            yield Head(e.status, proto.error_body(e.message, e.type, e.status), e.headers, self.replica_id)
            return
        self.calls += 1
        answer = None
        try:
            try:
                answer = await call(body, hint.request_id, include_usage, answer_id=hint.origin or None)
            except ApiError as e:
                yield Head(e.status, proto.error_body(e.message, e.type, e.status), e.headers, self.replica_id)
                return
            if isinstance(answer, dict):
                yield Head(200, answer, None, self.replica_id)
                return
            yield Head(200, None, None, self.replica_id)
            async for line in answer:
                yield line
        finally:
            self.calls -= 1
            if answer is not None and not isinstance(answer, dict):  # (the ingress went away, cancelled:
                await answer.aclose()  # closing the stream aborts the request)

    async def fan_out(self, hint: RouteHint, op: str, body=None) -> Head:
        """One replica's part of a call that goes to every replica (see FAN_OUT_OPS)."""
        if hint.covered is not None and self.replica_id in hint.covered:
            return Head(200, None, None, self.replica_id, skipped=True)
        if op not in FAN_OUT_OPS:
            raise ValueError(f"unknown fan-out op {op!r}")
        try:
            if op == "models":
                result = {"data": await self.service.models()}
            elif op in ("load_adapter", "unload_adapter", "tokenize", "detokenize"):
                result = await getattr(self.service, op)(body)
            else:
                result = await getattr(self.service, op)()
        except ApiError as e:
            return Head(e.status, proto.error_body(e.message, e.type, e.status), e.headers, self.replica_id)
        return Head(200, result, None, self.replica_id)

    async def record_routing_stats(self) -> dict[str, Any]:
        """The EngineState's wire form, for RankAwareRequestRouter (replica.routing_stats)."""
        state: EngineState = await self.service.engine_state()
        return state.to_dict()

    def check_health(self) -> None:
        """Serve replaces a replica whose engine failed as a whole."""
        if not self.async_engine.healthy:
            raise RuntimeError(f"the engine is not serving ({self.async_engine.fault or 'stopped'})")
        if self.async_engine.stalled is not None:  # a hung engine thread: Serve replaces the replica
            raise RuntimeError(self.async_engine.stalled)
