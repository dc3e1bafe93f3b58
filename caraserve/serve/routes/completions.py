"""POST /v1/completions and /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request

from caraserve.serve import protocol as proto
from caraserve.serve.routes.common import answer, include_usage, request_id, service_of

router = APIRouter()


@router.post("/v1/completions")
async def completions(body: proto.CompletionRequest, http: Request):
    rid = request_id(http, "cmpl")
    usage = body.stream and include_usage(body)
    return answer(await service_of(http).completion(body, rid, usage, http.is_disconnected))


@router.post("/v1/chat/completions")
async def chat(body: proto.ChatCompletionRequest, http: Request):
    rid = request_id(http, "chatcmpl")
    usage = body.stream and include_usage(body)
    return answer(await service_of(http).chat(body, rid, usage, http.is_disconnected))
