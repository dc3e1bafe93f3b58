"""Typed settings of the Ray Serve application (conf/ray_serve.yaml's cluster, router and ray
sections); the engine and server sections are the plain server's."""

from __future__ import annotations

from dataclasses import dataclass

from caraserve.cluster.policies import POLICIES
from caraserve.config import _check, dataclass_from_dict


@dataclass(frozen=True)
class ReplicasConfig:
    """replicas: engine replicas (Ray Serve's num_replicas). cpus_per_replica: the CPU share each
    replica's actor reserves; gpus_per_replica: GPUs each takes (-1: one where the Ray cluster
    has GPUs, else none). max_ongoing_requests: completion calls a replica takes at once (the
    engine queues beyond its batch); one more is refused (503) and tried on another replica.
    health_check_period_s: how often Serve asks a replica whether its engine still serves (a
    failed engine is replaced)."""

    replicas: int = 2
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = -1
    max_ongoing_requests: int = 64
    health_check_period_s: float = 2.0

    def __post_init__(self):
        _check(self.replicas >= 1, f"cluster.replicas={self.replicas} must be >= 1")
        _check(self.cpus_per_replica >= 0, "cluster.cpus_per_replica must be >= 0")
        _check(self.gpus_per_replica == -1 or self.gpus_per_replica >= 0, "cluster.gpus_per_replica must be -1 or >= 0")
        _check(self.max_ongoing_requests >= 1, "cluster.max_ongoing_requests must be >= 1")
        _check(self.health_check_period_s > 0, "cluster.health_check_period_s must be > 0")

    @classmethod
    def from_dict(cls, data, where="cluster"):
        return dataclass_from_dict(cls, data, where)


@dataclass(frozen=True)
class RoutingConfig:
    """policy: a name in caraserve.cluster.policies.POLICIES. slo_ms / avg_output_tokens /
    resident_discount: the policy's parameters. perf_model: latency JSON for replicas that
    publish none ("" = the paper-like linear model). stats_period_s: how often Serve's
    controller polls each replica's state for the router (the router's own accounting covers the
    time between). first_token_timeout_s: a replica that has not answered, or not sent the first
    streamed token, by then is given up for that request, which goes to another replica (at most
    max_attempts replicas); request_timeout_s bounds a whole non-streamed answer. seed: the
    random policy's and the tie-breaks' seed."""

    policy: str = "rank_aware"
    slo_ms: float = 40.0
    avg_output_tokens: float = 64.0
    resident_discount: float = 0.1
    perf_model: str = ""
    stats_period_s: float = 0.5
    first_token_timeout_s: float = 30.0
    request_timeout_s: float = 600.0
    max_attempts: int = 3
    seed: int = 0

    def __post_init__(self):
        _check(self.policy in POLICIES, f"router.policy={self.policy!r} is not a routing policy; known: "
               f"{sorted(POLICIES)}")
        _check(self.slo_ms > 0, f"router.slo_ms={self.slo_ms} must be > 0")
        _check(self.avg_output_tokens >= 1, f"router.avg_output_tokens={self.avg_output_tokens} must be >= 1")
        _check(0 <= self.resident_discount < 1, "router.resident_discount must be in [0, 1)")
        _check(self.stats_period_s > 0, "router.stats_period_s must be > 0")
        _check(self.first_token_timeout_s > 0, "router.first_token_timeout_s must be > 0")
        _check(self.request_timeout_s > 0, "router.request_timeout_s must be > 0")
        _check(self.max_attempts >= 1, f"router.max_attempts={self.max_attempts} must be >= 1")

    @classmethod
    def from_dict(cls, data, where="router"):
        return dataclass_from_dict(cls, data, where)


@dataclass(frozen=True)
class RayConfig:
    """address: "" starts a local Ray instance, "auto" joins the one `ray start` runs on this
    node, "ray://host:10001" a remote one. temp_dir: Ray's session, socket and log folder for a
    local instance (kept short: Unix socket paths are limited to 107 bytes). num_cpus: CPUs a
    local instance offers (0 = all). app_name / route_prefix: the Serve application."""

    address: str = ""
    temp_dir: str = "/tmp/caraserve-ray"
    num_cpus: int = 0
    app_name: str = "caraserve"
    route_prefix: str = "/"

    def __post_init__(self):
        _check(len(self.temp_dir) <= 40, f"ray.temp_dir={self.temp_dir!r}: keep it under 40 characters "
               "(Ray puts Unix sockets below it, whose paths are limited to 107 bytes)")
        _check(self.num_cpus >= 0, "ray.num_cpus must be >= 0")
        # Serve's own rule (serve.run refuses the rest, once Ray has started)
        prefix = self.route_prefix
        _check(prefix.startswith("/") and (prefix == "/" or not prefix.endswith("/")) and not {"{", "}"} & set(prefix),
               f"ray.route_prefix={prefix!r} must start with '/', not end with one (but '/' itself), "
               "and hold no '{' or '}'")

    @classmethod
    def from_dict(cls, data, where="ray"):
        return dataclass_from_dict(cls, data, where)
