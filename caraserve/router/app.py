"""The router's HTTP app: the server's OpenAI endpoints, each request sent to a replica."""

from __future__ import annotations

import contextlib
import json

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from pydantic import BaseModel, ValidationError

from caraserve.cluster.router import Router
from caraserve.config import ServerConfig
from caraserve.serve import protocol as proto
from caraserve.serve.http import ApiError, Guard, install_error_handlers


class RouterMetrics:
    """Prometheus metrics of one router, in a registry of its own."""

    def __init__(self, router: Router):
        self.registry = r = CollectorRegistry()
        self.events = Counter("caraserve_router_events", "Requests sent, retried away from, replicas down/up",
                              ["event", "replica"], registry=r)
        up = Gauge("caraserve_router_replica_up", "1 while the replica takes requests", ["replica"], registry=r)
        inflight = Gauge("caraserve_router_inflight", "Requests in flight on the replica", ["replica"], registry=r)
        for rep in router.replicas:
            up.labels(rep.url).set_function(lambda rep=rep: float(rep.up))
            inflight.labels(rep.url).set_function(lambda rep=rep: len(rep.inflight))
        Gauge("caraserve_router_waiting", "Requests waiting for a replica with room", registry=r).set_function(
            lambda: router.waiting)
        router.on_event = lambda kind, url: self.events.labels(kind, url).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def _body(http: Request, schema: type[BaseModel]) -> dict:
    """The JSON body, checked against the server's schema so a bad request never reaches a replica."""
    try:
        body = json.loads(await http.body())
    except ValueError as e:
        raise ApiError(400, f"request body is not valid JSON: {e}", "invalid_request_error") from e
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", "invalid_request_error")
    try:
        schema.model_validate(body)
    except ValidationError as e:
        parts = [f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ApiError(400, "; ".join(parts), "invalid_request_error") from e
    return body


def build_router_app(router: Router, server: ServerConfig):
    metrics = RouterMetrics(router)

    @contextlib.asynccontextmanager
    async def lifespan(_):
        await router.start()
        yield
        await router.close()

    app = FastAPI(title="CaraServe router", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)

    def check_queue():
        if router.waiting >= server.max_queue:
            raise ApiError(503, f"the router's queue is full ({server.max_queue} requests waiting); retry later",
                           "server_overloaded")

    @app.get("/health")
    async def health():
        up = sum(r.up and r.snapshot is not None for r in router.replicas)
        if not up:
            raise ApiError(503, "no replica is up", "server_overloaded")
        return {"status": "ok", "replicas_up": up, "replicas": len(router.replicas)}

    @app.get("/metrics")
    async def get_metrics():
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/state")
    async def state():
        return router.describe()

    @app.get("/v1/models")
    async def models():
        base = router.base_model()
        if base is None:
            raise ApiError(503, "no replica has answered yet; retry later", "server_overloaded")
        cards = [proto.model_card(base, base)]
        ranks: dict[str, int] = {}
        for rep in router.replicas:
            ranks.update(rep.adapters())
        resident = {a for rep in router.replicas for a in (rep.snapshot or {}).get("resident_adapters", ())}
        cards += [proto.model_card(name, name, parent=base, rank=rank, resident=name in resident)
                  for name, rank in sorted(ranks.items())]
        return {"object": "list", "data": cards}

    @app.post("/v1/completions")
    async def completions(http: Request):
        body = await _body(http, proto.CompletionRequest)
        check_queue()
        return await router.forward("/v1/completions", body, http.is_disconnected)

    @app.post("/v1/chat/completions")
    async def chat(http: Request):
        body = await _body(http, proto.ChatCompletionRequest)
        check_queue()
        return await router.forward("/v1/chat/completions", body, http.is_disconnected)

    @app.post("/v1/load_lora_adapter")
    async def load_lora(http: Request):
        return await router.broadcast("/v1/load_lora_adapter", await _body(http, proto.LoadLoraRequest))

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(http: Request):
        return await router.broadcast("/v1/unload_lora_adapter", await _body(http, proto.UnloadLoraRequest))

    return Guard(app, server.api_key, server.max_body_bytes, server.admin_api_key, server.allow_runtime_lora)
