"""HTTP pieces shared by the server and the router: OpenAI-style errors and the guard middleware
(API key, request body size). Nothing here imports torch, so the router stays light."""

from __future__ import annotations

import logging
import secrets

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from caraserve.serve import protocol as proto

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_


def error_response(status: int, message: str, type_: str) -> JSONResponse:
    return JSONResponse(proto.error_body(message, type_, status), status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as OpenAI-style JSON: ApiError with its status, validation errors as 400
    naming the field, anything unexpected as 500 without a stack trace."""

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return error_response(e.status, e.message, e.type)

    @app.exception_handler(RequestValidationError)
    async def _validation(_, e: RequestValidationError):
        parts = [f"{'.'.join(str(x) for x in err['loc'] if x != 'body')}: {err['msg']}" for err in e.errors()]
        return error_response(400, "; ".join(parts) or "invalid request", "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal server error", "internal_error")


class Guard:
    """ASGI middleware: API key (all but /health) and request body size."""

    def __init__(self, app, api_key: str, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key and scope["path"] != "/health":
            auth = headers.get(b"authorization", b"").decode("latin-1")
            if not secrets.compare_digest(auth.encode(), f"Bearer {self.api_key}".encode()):
                return await error_response(401, "missing or invalid API key (Authorization: Bearer <key>)",
                                  "authentication_error")(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await error_response(413, f"request body exceeds {self.max_body_bytes} bytes",
                              "invalid_request_error")(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise ApiError(413, f"request body exceeds {self.max_body_bytes} bytes", "invalid_request_error")
            return message

        return await self.app(scope, limited_receive, send)
