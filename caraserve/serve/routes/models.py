"""GET /v1/models: the base model first, then the adapters by name; optionally paged.

`limit` (1..1000) cards per page, `after` a cursor (the last id of the previous page: the base
model's name or an adapter's); the answer says `has_more`. An `after` naming an adapter unloaded
since still works: the page starts at the next name in order. GET /v1/models/{id}: one card.
POST /tokenize and /detokenize (vLLM's): a model's tokenizer, prompt or chat messages."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request

from caraserve.serve import protocol as proto
from caraserve.serve.http import NotFound
from caraserve.serve.routes.common import service_of

router = APIRouter()


def page(cards: list[dict], limit: int | None, after: str | None) -> tuple[list[dict], bool]:
    """cards: the base model's card first, then the adapters' (any order)."""
    base, adapters = cards[:1], sorted(cards[1:], key=lambda c: c["id"])
    ordered = base + adapters
    if after is not None:
        ordered = adapters if after == base[0]["id"] else [c for c in adapters if c["id"] > after]
    if limit is None:
        return ordered, False
    return ordered[:limit], len(ordered) > limit


@router.get("/v1/models")
async def models(http: Request, limit: int | None = Query(None, ge=1, le=1000), after: str | None = None):
    data, more = page(await service_of(http).models(), limit, after)
    return {"object": "list", "data": data, "has_more": more}


@router.get("/v1/models/{model_id:path}")
async def model(http: Request, model_id: str):
    card = next((c for c in await service_of(http).models() if c["id"] == model_id), None)
    if card is None:
        raise NotFound(f"The model `{model_id}` does not exist.")
    return card


@router.post("/tokenize")
async def tokenize(body: proto.TokenizeRequest, http: Request):
    return await service_of(http).tokenize(body)


@router.post("/detokenize")
async def detokenize(body: proto.DetokenizeRequest, http: Request):
    return await service_of(http).detokenize(body)
