"""python -m caraserve.serve: the OpenAI-compatible server (Hydra entry point).

    python -m caraserve.serve [model.path=DIR adapters.dir=DIR server.port=8000 server.host=127.0.0.1
        engine.max_batch_size=64 server.api_key=KEY ...]
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from caraserve.cli import config_task, exit_now, listen, run, serve_http
from caraserve.config import ENGINE_SECTIONS, EngineConfig, ServerConfig, check_keys, engine_config
from caraserve.engine import Engine
from caraserve.serve.api import adapter_roots, build_app, served_name_of
from caraserve.serve.async_engine import AsyncEngine
from caraserve.serve.gc_monitor import freeze_startup_heap

log = logging.getLogger("caraserve.serve")


def configs(composed: dict[str, Any]) -> tuple[EngineConfig, ServerConfig]:
    """The engine's and the HTTP server's typed configs from the composed conf/serve.yaml."""
    check_keys(composed, (*ENGINE_SECTIONS, "server"))
    server = ServerConfig.from_dict(composed.get("server"))
    if not server.api_key and os.environ.get("CARASERVE_API_KEY"):
        server = replace(server, api_key=os.environ["CARASERVE_API_KEY"])
    return engine_config(composed), server


@hydra.main(config_path="../../conf", config_name="serve", version_base="1.3")
@config_task
def main(cfg: DictConfig) -> None:
    engine_cfg, server = configs(OmegaConf.to_container(cfg, resolve=True))  # before the model loads
    sock = listen(server)  # so is the address
    engine = Engine(engine_cfg)
    served_name = served_name_of(engine, server)
    service = AsyncEngine(engine, server.max_queue, heap_trim_s=server.heap_trim_s,
                          stall_timeout_s=server.stall_timeout_s)
    app = build_app(service, server, served_name, adapter_roots(engine))
    freeze_startup_heap()  # the model and libraries are never garbage: keep full collections off them
    service.start()
    log.info("serving %s with %d adapters on http://%s:%d", served_name, len(engine.adapters()),
             server.host, sock.getsockname()[1])  # (server.port=0: the port the system chose)
    try:
        # until SIGTERM/SIGINT, then drains the running requests; those the drain time leaves get a 503
        serve_http(app, server, log, sock, lambda: service.end_all(
            f"the server is shutting down (server.drain_timeout_s={server.drain_timeout_s} passed)"))
    finally:
        service.stop()


if __name__ == "__main__":
    status = run(main)
    # Drained, and the engine thread has stopped: end here, without the interpreter's
    # finalization. A daemon thread may still be inside torch: the engine thread's compile of a
    # decode variant at an idle moment (engine.compile=auto) takes tens of seconds and cannot be
    # interrupted.
    # Finalization ends such a thread with pthread_exit when it next takes the GIL, and the
    # unwind through torch's C++ frames (a pybind11 destructor that takes the GIL again) calls
    # std::terminate: "terminate called without an active exception", SIGABRT, status 134.
    # Waiting for the compile instead would hold a stopping server for up to a compile's length.
    exit_now(status)
