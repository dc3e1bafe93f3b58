"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's runtime LoRA endpoints; the
Guard middleware checks their key)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from caraserve.serve import protocol as proto
from caraserve.serve.routes.common import service_of

router = APIRouter()


@router.post("/v1/load_lora_adapter")
async def load_lora(body: proto.LoadLoraRequest, http: Request):
    return await service_of(http).load_adapter(body)


@router.post("/v1/unload_lora_adapter")
async def unload_lora(body: proto.UnloadLoraRequest, http: Request):
    return await service_of(http).unload_adapter(body)
