"""HTTP pieces shared by the server and the Ray ingress: OpenAI-style errors and the guard
middleware (API key, requests at once, request body size). Nothing here imports torch, so the ingress stays light."""

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
    """An error answered as OpenAI-style JSON with this HTTP status (and extra headers).
    `admitted`: the request reached the engine, whose outcome metrics count it (else a refusal of
    a generation request is counted as one, by `install_error_handlers`)."""

    def __init__(self, status: int, message: str, type_: str, headers: dict[str, str] | None = None,
                 admitted: bool = False):
        super().__init__(message)
        self.status, self.message, self.type, self.headers = status, message, type_, headers
        self.admitted = admitted


class _Kind(ApiError):
    """An ApiError whose class fixes its status and OpenAI error type (and default headers)."""

    STATUS, TYPE, HEADERS = 500, "internal_error", None

    def __init__(self, message: str, headers: dict[str, str] | None = None, admitted: bool = False):
        super().__init__(self.STATUS, message, self.TYPE, headers or self.HEADERS, admitted)


class BadRequest(_Kind):
    STATUS, TYPE = 400, "invalid_request_error"


class NotFound(_Kind):
    STATUS, TYPE = 404, "not_found_error"


class Conflict(_Kind):
    STATUS, TYPE = 409, "conflict_error"


class ClientClosed(_Kind):
    STATUS, TYPE = 499, "client_closed"


class InternalError(_Kind):
    STATUS, TYPE = 500, "internal_error"


class BadGateway(_Kind):
    STATUS, TYPE = 502, "bad_gateway"


class Overloaded(_Kind):
    """The queue (or every replica) is full: come back later."""

    STATUS, TYPE, HEADERS = 503, "server_overloaded", {"Retry-After": "1"}


class EngineUnavailable(_Kind):
    STATUS, TYPE = 503, "engine_unavailable"


class AdapterCapacity(_Kind):
    """The adapter exists but cannot be registered or placed now: come back in a second."""

    STATUS, TYPE, HEADERS = 503, "adapter_capacity", {"Retry-After": "1"}


GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
# a refused generation request's metrics label (caraserve_requests_total{status="rejected_..."})
REJECTIONS = {"invalid_request_error": "bad_request", "not_found_error": "unknown_model",
              "server_overloaded": "queue_full", "engine_unavailable": "engine_unavailable",
              "adapter_capacity": "adapter_capacity"}


def _count_rejection(http, reason: str | None) -> None:
    """A generation request refused before the engine took it, in the service's metrics."""
    count = getattr(http.app.state.service, "count_rejection", None)
    if reason is not None and count is not None and http.url.path in GENERATION_PATHS:
        count(reason)


def error_response(status: int, message: str, type_: str, headers: dict[str, str] | None = None,
                   param: str | None = None) -> JSONResponse:
    # A message may quote the caller's input, lone surrogates included: escape what UTF-8 cannot carry.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse(proto.error_body(message, type_, status, param), status_code=status, headers=headers)


def _validation_message(err: dict) -> tuple[str | None, str]:
    """(the field, its message) of one pydantic error: a field's check names the field; a check
    of several fields together says its own words, which name them; an error of the body as a
    whole (none sent) says "body"."""
    field = ".".join(str(x) for x in err["loc"] if x != "body") or None
    msg = err["msg"].removeprefix("Value error, ")  # (our checks' own words follow it)
    if field is not None:
        return field, f"{field}: {msg}"
    return None, msg if err.get("type") == "value_error" else f"body: {msg}"


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as OpenAI-style JSON: ApiError with its status, validation errors as 400
    naming the field, anything unexpected as 500 without a stack trace."""

    @app.exception_handler(ApiError)
    async def _api_error(http, e: ApiError):
        if not e.admitted:
            _count_rejection(http, REJECTIONS.get(e.type))
        return error_response(e.status, e.message, e.type, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(http, e: RequestValidationError):
        _count_rejection(http, "bad_request")
        errors = e.errors()
        ctype = http.headers.get("content-type", "")
        if any(err["loc"][:1] == ("body",) for err in errors) and "json" not in ctype.lower():
            return error_response(400, f"the request body must be JSON, sent with Content-Type: application/json "
                                       f"(got {ctype or 'no Content-Type'})", "invalid_request_error")
        bad_json = next((err for err in errors if err.get("type") == "json_invalid"), None)
        if bad_json is not None:
            where = bad_json["loc"][-1]
            return error_response(400, f"the request body is not valid JSON: {bad_json.get('ctx', {}).get('error')} "
                                       f"(at character {where})", "invalid_request_error")
        parts = [_validation_message(err) for err in errors]
        return error_response(400, "; ".join(msg for _, msg in parts) or "invalid request", "invalid_request_error",
                              param=next((field for field, _ in parts if field), None))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):
        cause = e.__cause__  # FastAPI's "error parsing the body" carries what the JSON reader raised
        if e.status_code == 400 and isinstance(cause, (UnicodeDecodeError, RecursionError, ValueError)):
            why = {UnicodeDecodeError: "it is not UTF-8", RecursionError: "it is nested too deeply"}.get(
                type(cause), str(cause))
            return error_response(400, f"the request body could not be read as JSON: {why}", "invalid_request_error")
        return error_response(e.status_code, str(e.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal server error", "internal_error")


ADMIN_PATHS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
# probes are answered however busy the server is: an orchestrator restarts a server whose
# liveness probe fails, and it would do so exactly when the server is at its busiest
PROBE_PATHS = ("/health", "/ping", "/metrics")
# answered without the API key: an orchestrator's liveness probe carries none
OPEN_PATHS = ("/health", "/ping")
# connections (or, in Ray Serve, ongoing calls) taken beyond server.limit_concurrency: room for
# the probes, and for the JSON 503 of the requests over the limit, while that many are served
PROBE_CONNECTIONS = 64


class Guard:
    """ASGI middleware: API keys, requests at once and request body size, checked before the app
    sees a request.

    Keys: api_key guards every path but the liveness probes (OPEN_PATHS). The adapter-management paths take admin_key
    instead when one is set; with no key at all they are off unless allow_admin (anyone who can
    reach the server could otherwise load files into it). Requests at once: past
    limit_concurrency requests being served (probes not counted), a new one gets a JSON 503
    `server_overloaded` and `on_overload(path)` is called. Body: a declared Content-Length over
    the limit is refused at once; a body without one (chunked) is read up to the limit and
    refused as soon as it passes it, so the app never sees a partial body."""

    def __init__(self, app, api_key: str, max_body_bytes: int, admin_key: str = "", allow_admin: bool = False,
                 limit_concurrency: int | None = None, on_overload=None):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes
        self.admin_key, self.allow_admin = admin_key, allow_admin
        self.limit_concurrency, self.on_overload = limit_concurrency, on_overload
        self.in_flight = 0  # requests being served, probes not counted (one event loop: no lock)

    def _refusal(self, path: str, auth: str) -> tuple[int, str, str] | None:
        """(status, message, type) when the caller may not use this path, else None."""
        def matches(key: str) -> bool:
            return secrets.compare_digest(auth.encode(), f"Bearer {key}".encode())

        if path in ADMIN_PATHS:
            key = self.admin_key or self.api_key
            if not key and not self.allow_admin:
                return (403, "runtime adapter loading is off: set server.admin_api_key (or server.api_key), "
                        "or server.allow_runtime_lora=true", "permission_error")
            if key and not matches(key):
                which = "admin API key" if self.admin_key else "API key"
                return 401, f"missing or invalid {which} (Authorization: Bearer <key>)", "authentication_error"
            return None
        if self.api_key and path not in OPEN_PATHS and not matches(self.api_key):
            return 401, "missing or invalid API key (Authorization: Bearer <key>)", "authentication_error"
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        refusal = self._refusal(scope["path"], headers.get(b"authorization", b"").decode("latin-1"))
        if refusal is not None:
            return await error_response(*refusal)(scope, receive, send)
        if self.limit_concurrency is None or scope["path"] in PROBE_PATHS:
            return await self._within_size(scope, receive, send, headers)
        if self.in_flight >= self.limit_concurrency:
            if self.on_overload is not None:
                self.on_overload(scope["path"])
            return await error_response(
                503, f"{self.in_flight} requests are being served (server.limit_concurrency): retry later",
                "server_overloaded", {"Retry-After": "1"})(scope, receive, send)
        self.in_flight += 1
        try:
            return await self._within_size(scope, receive, send, headers)
        finally:
            self.in_flight -= 1

    async def _within_size(self, scope, receive, send, headers: dict):
        too_large = error_response(413, f"request body exceeds {self.max_body_bytes} bytes", "invalid_request_error")
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await error_response(400, "Content-Length is not a number",
                                            "invalid_request_error")(scope, receive, send)
            if int(length) > self.max_body_bytes:
                return await too_large(scope, receive, send)
            return await self.app(scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return await too_large(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        return await self.app(scope, replay, send)
