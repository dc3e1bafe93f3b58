"""python -m caraserve.serve: the OpenAI-compatible server (Hydra entry point).

    python -m caraserve.serve [model.path=DIR adapters.dir=DIR server.port=8000 server.host=127.0.0.1
        engine.max_batch_size=64 server.api_key=KEY ...]
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

import hydra
import uvicorn
from omegaconf import DictConfig, OmegaConf

from caraserve.config import ServerConfig, engine_config
from caraserve.engine import Engine, resolve_paths
from caraserve.serve.api import build_app
from caraserve.serve.async_engine import AsyncEngine

log = logging.getLogger("caraserve.serve")


def adapter_roots(engine: Engine) -> list[Path]:
    cfg = engine.config
    roots = list(cfg.adapters.allowed_roots)
    if not roots:
        adapter_dir = resolve_paths(cfg)[1] if cfg.adapters.dir == "demo" else cfg.adapters.dir
        roots = [adapter_dir] if adapter_dir not in ("", None, "none") else []
    return [Path(r).expanduser().resolve() for r in roots]


@hydra.main(config_path="../../conf", config_name="serve", version_base="1.3")
def main(cfg: DictConfig) -> int:
    composed = OmegaConf.to_container(cfg, resolve=True)
    server = ServerConfig.from_dict(composed.get("server"))
    if not server.api_key and os.environ.get("CARASERVE_API_KEY"):
        server = replace(server, api_key=os.environ["CARASERVE_API_KEY"])
    engine = Engine(engine_config(composed))
    model_cfg = engine.config.model
    served_name = (server.served_model_name or model_cfg.served_name
                   or ("tiny" if model_cfg.path == "tiny" else Path(engine.model_path).name))
    service = AsyncEngine(engine, server.max_queue)
    app = build_app(service, server, served_name, adapter_roots(engine))
    service.start()
    log.info("serving %s with %d adapters on http://%s:%d", served_name, len(engine.adapters()),
             server.host, server.port)
    # SIGTERM/SIGINT: uvicorn stops accepting and lets running requests finish (bounded); it then
    # re-raises the signal to the handler it found, which here ends the process normally (exit 0).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: log.info("drained; exiting"))
    try:
        uvicorn.run(app, host=server.host, port=server.port, log_level=server.log_level,
                    timeout_graceful_shutdown=server.drain_timeout_s)
    finally:
        service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
