"""python -m caraserve.router: the rank-aware router over caraserve.serve replicas (Hydra entry).

    python -m caraserve.router replicas=[http://127.0.0.1:8001,http://127.0.0.1:8002] \
        policy=rank_aware server.host=127.0.0.1 server.port=8000 [router.slo_ms=40 ...]
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from dataclasses import replace
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from caraserve.cli import config_task, run, serve_http
from caraserve.cluster.config import RouterServiceConfig
from caraserve.cluster.policies import POLICIES
from caraserve.cluster.router import Router
from caraserve.config import ConfigError, ServerConfig, check_keys, check_type
from caraserve.router.app import build_router_app

log = logging.getLogger("caraserve.router")


def configs(composed: dict[str, Any]) -> tuple[RouterServiceConfig, ServerConfig]:
    """The router's and the HTTP server's typed configs from the composed conf/router.yaml."""
    check_keys(composed, ("replicas", "policy", "router", "server"))
    policy = check_type(composed.get("policy"), str, "policy")
    if policy not in POLICIES:
        raise ConfigError(f"policy={policy!r} is not a routing policy; known: {sorted(POLICIES)}")
    replicas = check_type(composed.get("replicas") or [], tuple[str, ...], "replicas")
    section = check_type(composed.get("router"), dict[str, Any], "router")  # replicas and policy are top-level keys
    check_keys(section, {f.name for f in dataclasses.fields(RouterServiceConfig)} - {"replicas", "policy"}, "router")
    router_cfg = RouterServiceConfig.from_dict({**section, "replicas": replicas, "policy": policy})
    server = ServerConfig.from_dict(composed.get("server"))
    if not server.api_key and os.environ.get("CARASERVE_API_KEY"):
        server = replace(server, api_key=os.environ["CARASERVE_API_KEY"])
    if not router_cfg.replica_api_key and server.api_key:  # replicas behind one key, as usual
        router_cfg = replace(router_cfg, replica_api_key=server.api_key)
    return router_cfg, server


@hydra.main(config_path="../../conf", config_name="router", version_base="1.3")
@config_task
def main(cfg: DictConfig) -> None:
    router_cfg, server = configs(OmegaConf.to_container(cfg, resolve=True))
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per proxied request otherwise
    router = Router(router_cfg)
    app = build_router_app(router, server)
    log.info("router on http://%s:%d over %s", server.host, server.port, ", ".join(router_cfg.replicas))
    serve_http(app, server, log)  # until SIGTERM/SIGINT, then drains the proxied requests


if __name__ == "__main__":
    sys.exit(run(main))
