"""python -m caraserve.router: the rank-aware router over caraserve.serve replicas (Hydra entry).

    python -m caraserve.router replicas=[http://127.0.0.1:8001,http://127.0.0.1:8002] \
        policy=rank_aware server.host=127.0.0.1 server.port=8000 [router.slo_ms=40 ...]
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import replace

import hydra
import uvicorn
from omegaconf import DictConfig, OmegaConf

from caraserve.cluster.config import RouterServiceConfig
from caraserve.cluster.policies import POLICIES
from caraserve.cluster.router import Router
from caraserve.config import ConfigError, ServerConfig
from caraserve.router.app import build_router_app

log = logging.getLogger("caraserve.router")


@hydra.main(config_path="../../conf", config_name="router", version_base="1.3")
def main(cfg: DictConfig) -> int:
    composed = OmegaConf.to_container(cfg, resolve=True)
    if composed["policy"] not in POLICIES:
        raise ConfigError(f"policy={composed['policy']!r} is not a routing policy; known: {sorted(POLICIES)}")
    router_cfg = RouterServiceConfig.from_dict(
        {**(composed.get("router") or {}), "replicas": composed.get("replicas") or [], "policy": composed["policy"]})
    server = ServerConfig.from_dict(composed.get("server"))
    if not server.api_key and os.environ.get("CARASERVE_API_KEY"):
        server = replace(server, api_key=os.environ["CARASERVE_API_KEY"])
    if not router_cfg.replica_api_key and server.api_key:  # replicas behind one key, as usual
        router_cfg = replace(router_cfg, replica_api_key=server.api_key)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per proxied request otherwise
    router = Router(router_cfg)
    app = build_router_app(router, server)
    log.info("router on http://%s:%d over %s", server.host, server.port, ", ".join(router_cfg.replicas))
    uvicorn.run(app, host=server.host, port=server.port, log_level=server.log_level,
                timeout_graceful_shutdown=server.drain_timeout_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
