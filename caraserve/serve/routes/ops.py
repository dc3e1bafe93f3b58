"""GET /health, /metrics (Prometheus) and /v1/state (the EngineState's wire form)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from caraserve.serve.routes.common import service_of

router = APIRouter()


@router.get("/health")
async def health(http: Request):
    return await service_of(http).health()


@router.get("/metrics")
async def metrics(http: Request):
    body, content_type = await service_of(http).metrics()
    return Response(body, media_type=content_type)


@router.get("/v1/state")
async def state(http: Request):
    return await service_of(http).state()
