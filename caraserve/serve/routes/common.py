"""What the route modules share: the service of the app, request ids, the answer's form."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import StreamingResponse

from caraserve.serve import protocol as proto
from caraserve.serve.http import BadRequest


def service_of(http: Request):
    return http.app.state.service


def request_id(http: Request, prefix: str) -> str:
    """The caller's X-Request-Id when given (a router uses it to match its requests with the
    replica's /v1/state), else a fresh id."""
    rid = http.headers.get("x-request-id")
    if rid is None:
        return proto.new_id(prefix)
    if not proto.valid_request_id(rid):
        raise BadRequest("X-Request-Id must be 1-128 characters of letters, digits, '-', '_', '.' or ':'")
    return rid


def include_usage(body: proto._Sampling) -> bool:
    """Whether a streamed answer ends with a usage chunk (`stream_options.include_usage`)."""
    return body.stream_options is not None and body.stream_options.include_usage


def answer(result):
    """A service's answer as a response: a dict as JSON, an iterator of SSE lines as a stream."""
    if isinstance(result, dict):
        return result
    return StreamingResponse(result, media_type="text/event-stream")
