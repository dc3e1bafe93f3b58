"""The OpenAI-compatible HTTP app of one engine: the route modules (caraserve.serve.routes) over
the engine's service layer (caraserve.serve.service.EngineService), behind the guard."""

from __future__ import annotations

from pathlib import Path

from caraserve.config import ConfigError, ServerConfig
from caraserve.engine import Engine, resolve_paths
from caraserve.serve.async_engine import AsyncEngine
from caraserve.serve.http import Guard
from caraserve.serve.routes import guarded_app
from caraserve.serve.service import EngineService


def build_app(service: AsyncEngine, server: ServerConfig, served_name: str, adapter_roots: list[Path]) -> Guard:
    return guarded_app(EngineService(service, served_name, adapter_roots, server.unload_timeout_s,
                                     server.chat_template, server.log_requests, server.tool_call_parser,
                                     server.reasoning_parser), server)


def adapter_roots(engine: Engine) -> list[Path]:
    cfg = engine.config
    roots = list(cfg.adapters.allowed_roots)
    if not roots:
        adapter_dir = resolve_paths(cfg)[1] if cfg.adapters.dir == "demo" else cfg.adapters.dir
        roots = [adapter_dir] if adapter_dir not in ("", None, "none") else []
    return [Path(r).expanduser().resolve() for r in roots]


def served_name_of(engine: Engine, server: ServerConfig) -> str:
    """The base model's name in the API: server.served_model_name, else the model config's, else
    `tiny` for the embedded default or the model folder's name."""
    model_cfg = engine.config.model
    name = (server.served_model_name or model_cfg.served_name
            or ("tiny" if model_cfg.path == "tiny" else Path(engine.model_path).name))
    if name in engine.store:
        raise ConfigError(f"the base model's name {name!r} (server.served_model_name, else model.served_name, else "
                          "the model folder's) is also an adapter's: requests naming it could not reach the adapter; "
                          "rename one")
    return name
