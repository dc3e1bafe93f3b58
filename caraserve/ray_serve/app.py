"""The Ray Serve application (EngineReplica deployment + ingress) and the Ray instance under it.

`build_application(composed)` takes the composed conf/ray_serve.yaml (plain dict). `app_builder`
is what a Serve config file names (conf/ray/serve_config.yaml: `serve run` / `serve deploy` /
KubeRay): its `args.overrides` are the same Hydra overrides as the command line's.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from typing import Any

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from caraserve.config import ENGINE_SECTIONS, ConfigError, ServerConfig, check_keys, engine_config
from caraserve.perf.model import PerfModel
from caraserve.ray_serve.config import RayConfig, ReplicasConfig, RoutingConfig
from caraserve.ray_serve.ingress import Ingress
from caraserve.ray_serve.replica import EngineReplica
from caraserve.ray_serve.request_router import RankAwareRequestRouter
from caraserve.serve.http import PROBE_CONNECTIONS

log = logging.getLogger(__name__)

SECTIONS = (*ENGINE_SECTIONS, "server", "cluster", "router", "ray")
JOIN_PROBE_S = 5.0  # a Ray instance's GCS (or Ray Client server) that does not answer this soon is not there


@dataclasses.dataclass(frozen=True)
class AppConfig:
    replicas: ReplicasConfig
    routing: RoutingConfig
    ray: RayConfig
    server: ServerConfig
    engine_sections: dict[str, Any]  # what each replica builds its engine and server from


def app_config(composed: dict[str, Any]) -> AppConfig:
    """The typed settings of the composed conf/ray_serve.yaml (ConfigError on a bad one), before
    anything starts."""
    check_keys(composed, SECTIONS)
    server = ServerConfig.from_dict(composed.get("server"))
    if not server.api_key and os.environ.get("CARASERVE_API_KEY"):
        server = dataclasses.replace(server, api_key=os.environ["CARASERVE_API_KEY"])
    engine_sections = {k: composed[k] for k in ENGINE_SECTIONS if k in composed}
    engine_config(engine_sections)  # checked here, not first in every replica
    routing = RoutingConfig.from_dict(composed.get("router"))
    if routing.perf_model:  # read here too: the router reads it inside Serve, where an error is no one line
        PerfModel.load(routing.perf_model, "router.perf_model")
    cfg = AppConfig(ReplicasConfig.from_dict(composed.get("cluster")), routing,
                    RayConfig.from_dict(composed.get("ray")), server,
                    {**engine_sections, "server": dataclasses.asdict(server)})
    if server.port == 0:  # (last: the other settings' mistakes first) Serve's proxy would bind a port no one is told
        raise ConfigError("server.port=0 is not supported by the Ray Serve entry point: give a port number")
    return cfg


def check_local(cfg: AppConfig) -> None:
    """For a local Ray instance (ray.address ""), whose replicas see this machine's folders and
    cores: what a replica would fail on, in one line before Ray starts (inside Serve it is a
    deployment failure buried in its controller's tracebacks, or a wait for resources that never
    come)."""
    from caraserve.model.loader import load_hf_config
    from caraserve.model.tiny import resolve_paths

    if cfg.ray.address:
        return
    replicas, ray_cfg = cfg.replicas, cfg.ray
    model_path, adapter_dir = resolve_paths(engine_config({k: v for k, v in cfg.engine_sections.items()
                                                            if k in ENGINE_SECTIONS}))
    load_hf_config(model_path)
    if adapter_dir is not None and not adapter_dir.is_dir():
        raise ConfigError(f"adapters.dir: {adapter_dir} " + ("is a file, not a folder" if adapter_dir.exists()
                                                             else "does not exist"))
    cpus = ray_cfg.num_cpus or os.cpu_count() or 1
    if replicas.cpus_per_replica > cpus:
        raise ConfigError(f"cluster.cpus_per_replica={replicas.cpus_per_replica} but the local Ray instance has "
                          f"{cpus} CPUs (ray.num_cpus, default this machine's): no replica could ever start")
    if replicas.replicas * replicas.cpus_per_replica > cpus:
        raise ConfigError(f"cluster.replicas={replicas.replicas} x cluster.cpus_per_replica="
                          f"{replicas.cpus_per_replica} CPUs is more than the local Ray instance's {cpus} "
                          "(ray.num_cpus, default this machine's): the replicas past those would wait for CPUs forever")


def build_application(cfg: AppConfig):
    """The bound application: the ingress over `cfg.replicas.replicas` engine replicas."""
    gpus = cfg.replicas.gpus_per_replica
    if gpus < 0:  # one GPU per replica where the cluster has GPUs
        gpus = 1 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0
    routing = cfg.routing
    router_kwargs = {"policy": routing.policy, "slo_ms": routing.slo_ms, "avg_output_tokens": routing.avg_output_tokens,
                     "resident_discount": routing.resident_discount, "perf_model": routing.perf_model,
                     "seed": routing.seed, "max_calls": cfg.replicas.max_ongoing_requests}
    replica = serve.deployment(EngineReplica, name="EngineReplica").options(
        num_replicas=cfg.replicas.replicas,
        ray_actor_options={"num_cpus": cfg.replicas.cpus_per_replica, "num_gpus": gpus},
        # Serve counts every call against this: the completions' own limit (cluster.max_ongoing_requests)
        # is the replica's, and probes and adapter fan-outs get room past it, as at the ingress
        max_ongoing_requests=cfg.replicas.max_ongoing_requests + PROBE_CONNECTIONS,
        health_check_period_s=cfg.replicas.health_check_period_s,
        request_router_config=RequestRouterConfig(
            request_router_class=RankAwareRequestRouter, request_router_kwargs=router_kwargs,
            request_routing_stats_period_s=routing.stats_period_s,
            request_routing_stats_timeout_s=max(routing.stats_period_s, 5.0)),
    )
    # Serve queues what passes max_ongoing_requests at its proxy, silently: the ingress's own
    # check (http.Guard) answers requests past server.limit_concurrency with a JSON 503 instead
    ingress = serve.deployment(serve.ingress()(Ingress), name="Ingress").options(
        num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=cfg.server.limit_concurrency + PROBE_CONNECTIONS)
    return ingress.bind(replica.bind(cfg.engine_sections, cfg.replicas.max_ongoing_requests),
                        dataclasses.asdict(cfg.server),
                        dataclasses.asdict(routing))


def start_ray(cfg: RayConfig) -> None:
    """Joins cfg.address, or starts a local instance whose files go under cfg.temp_dir."""
    if ray.is_initialized():
        return
    if cfg.address:
        unreachable = _unreachable(cfg.address, JOIN_PROBE_S)
        if unreachable:  # ray.init would wait for the instance's GCS without end
            raise ConfigError(f"ray.address={cfg.address}: cannot join a Ray instance there ({unreachable})")
        try:
            ray.init(address=cfg.address, logging_level=logging.WARNING)
        except (ValueError, ConnectionError) as e:  # a malformed address, or no instance there
            raise ConfigError(f"ray.address={cfg.address}: cannot join a Ray instance there ({e})") from None
        return
    os.makedirs(cfg.temp_dir, exist_ok=True)
    ray.init(num_cpus=cfg.num_cpus or None, _temp_dir=os.path.abspath(cfg.temp_dir), include_dashboard=False,
             logging_level=logging.WARNING)


def _unreachable(address: str, timeout_s: float) -> str | None:
    """Why no TCP connection reaches an explicit host:port address (plain or ray://) within
    timeout_s, or None when one does or the address names no port ("auto", which Ray resolves
    and refuses at once when no instance runs)."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return None
    except OSError as e:
        return f"no connection to {host}:{port} within {timeout_s:g} s: {e.strerror or e}"


def deploy(cfg: AppConfig, blocking: bool = False):
    """Starts Ray if needed, Serve's HTTP proxy on server.host:port, and the application."""
    start_ray(cfg.ray)
    serve.start(http_options={"host": cfg.server.host, "port": cfg.server.port})
    return serve.run(build_application(cfg), name=cfg.ray.app_name, route_prefix=cfg.ray.route_prefix,
                     blocking=blocking)


def app_builder(args: dict[str, Any]):
    """For a Serve config file: `args: {overrides: ["cluster.replicas=4", ...]}` (Hydra overrides
    of conf/ray_serve.yaml, as on the command line; ray.* and server.host/port are Serve's own
    settings there)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    conf_dir = os.path.join(os.path.dirname(__file__), "..", "..", "conf")
    with initialize_config_dir(config_dir=os.path.abspath(conf_dir), version_base="1.3"):
        composed = OmegaConf.to_container(compose("ray_serve", overrides=list(args.get("overrides", ()))),
                                          resolve=True)
    composed.pop("hydra", None)
    return build_application(app_config(composed))
