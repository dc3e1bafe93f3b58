"""GET /health (and vLLM's /ping), /metrics (Prometheus), /version and /v1/state (the
EngineState's wire form)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from caraserve import __version__
from caraserve.serve.routes.common import service_of

router = APIRouter()


@router.get("/health")
async def health(http: Request):
    return await service_of(http).health()


@router.api_route("/ping", methods=["GET", "POST"])
async def ping(http: Request):
    """vLLM's (SageMaker's) liveness probe: /health's answer."""
    return await service_of(http).health()


@router.get("/version")
async def version():
    return {"version": __version__}


@router.get("/metrics")
async def metrics(http: Request):
    body, content_type = await service_of(http).metrics()
    return Response(body, media_type=content_type)


@router.get("/v1/state")
async def state(http: Request):
    return await service_of(http).state()
