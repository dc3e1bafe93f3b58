"""The OpenAI-compatible HTTP app of one engine: the route modules (caraserve.serve.routes) over
the engine's service layer (caraserve.serve.service.EngineService), behind the guard."""

from __future__ import annotations

from pathlib import Path

from caraserve.config import ServerConfig
from caraserve.serve.async_engine import AsyncEngine
from caraserve.serve.http import Guard
from caraserve.serve.routes import guarded_app
from caraserve.serve.service import EngineService


def build_app(service: AsyncEngine, server: ServerConfig, served_name: str, adapter_roots: list[Path]) -> Guard:
    return guarded_app(EngineService(service, served_name, adapter_roots, server.unload_timeout_s,
                                     server.chat_template, server.log_requests, server.tool_call_parser,
                                     server.reasoning_parser), server)
