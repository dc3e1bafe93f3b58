"""The OpenAI-compatible HTTP app of one engine: the route modules (caraserve.serve.routes) over
the engine's service layer (caraserve.serve.service.EngineService), behind the guard."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from caraserve.config import ServerConfig
from caraserve.serve import routes
from caraserve.serve.async_engine import AsyncEngine
from caraserve.serve.http import Guard, install_error_handlers
from caraserve.serve.service import EngineService


def build_app(service: AsyncEngine, server: ServerConfig, served_name: str, adapter_roots: list[Path]) -> Guard:
    return guarded_app(EngineService(service, served_name, adapter_roots, server.unload_timeout_s), server)


def guarded_app(service, server: ServerConfig, title: str = "CaraServe", lifespan=None) -> Guard:
    """The API's routes over a service (caraserve.serve.service.Service), errors as OpenAI JSON,
    keys and body size checked first."""
    app = FastAPI(title=title, version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    routes.mount(app, service)
    return Guard(app, server.api_key, server.max_body_bytes, server.admin_api_key, server.allow_runtime_lora)
