"""Typed, validated configuration of cluster simulations: the cluster, the workload, the router.

scripts/simulate.py composes YAML with Hydra and hands plain dicts to `*.from_dict`, which checks
each value's type as caraserve.config does; from Python, build the dataclasses directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from caraserve.config import ConfigError, dataclass_from_dict

LENGTH_DISTS = ("lognormal", "uniform", "fixed")
ARRIVALS = ("poisson", "gamma")
POPULARITIES = ("uniform", "zipf")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class LengthDist:
    """A token-length distribution, clipped to [min_tokens, max_tokens].

    lognormal: mean_tokens is the mean before clipping, sigma the std of log(length);
    uniform: integers in [min_tokens, max_tokens]; fixed: always mean_tokens.
    """

    dist: str = "lognormal"
    mean_tokens: float = 200.0
    sigma: float = 0.8
    min_tokens: int = 1
    max_tokens: int = 1024

    def __post_init__(self):
        _check(self.dist in LENGTH_DISTS, f"length dist={self.dist!r} must be one of {LENGTH_DISTS}")
        _check(1 <= self.min_tokens <= self.max_tokens,
               f"length min_tokens={self.min_tokens}, max_tokens={self.max_tokens}: need 1 <= min <= max")
        _check(self.mean_tokens >= 1, f"length mean_tokens={self.mean_tokens} must be >= 1")
        _check(self.sigma >= 0, f"length sigma={self.sigma} must be >= 0")

    @classmethod
    def from_dict(cls, data, where="length"):
        return dataclass_from_dict(cls, data, where)


@dataclass(frozen=True)
class WorkloadConfig:
    """Requests to simulate.

    rps: mean arrival rate; requests arrive over duration_s, or num_requests > 0 of them.
    arrival: poisson, or gamma inter-arrival times with coefficient of variation arrival_cv
    (> 1 bursty, 1 = poisson). Adapters: num_adapters, ranks assigned evenly over `ranks` in a
    seeded shuffle; popularity uniform or zipf (p_i ~ 1 / i^zipf_alpha).
    """

    rps: float = 100.0
    duration_s: float = 60.0
    num_requests: int = 0
    arrival: str = "poisson"
    arrival_cv: float = 1.0
    num_adapters: int = 128
    ranks: tuple[int, ...] = (8, 16, 32, 64)
    popularity: str = "zipf"
    zipf_alpha: float = 1.0
    prompt_tokens: LengthDist = field(default_factory=lambda: LengthDist("lognormal", 100.0, 0.8, 4, 512))
    output_tokens: LengthDist = field(default_factory=lambda: LengthDist("lognormal", 200.0, 0.8, 4, 1024))
    seed: int = 0

    def __post_init__(self):
        _check(self.rps > 0, f"workload.rps={self.rps} must be > 0")
        _check(self.num_requests > 0 or self.duration_s > 0,
               "workload: set duration_s > 0 or num_requests > 0")
        _check(self.num_requests >= 0, f"workload.num_requests={self.num_requests} must be >= 0")
        _check(self.arrival in ARRIVALS, f"workload.arrival={self.arrival!r} must be one of {ARRIVALS}")
        _check(self.arrival_cv > 0, f"workload.arrival_cv={self.arrival_cv} must be > 0")
        _check(self.num_adapters >= 1, f"workload.num_adapters={self.num_adapters} must be >= 1")
        _check(len(self.ranks) > 0 and all(isinstance(r, int) and r > 0 for r in self.ranks),
               f"workload.ranks={self.ranks} must be a non-empty list of positive ints")
        _check(self.popularity in POPULARITIES,
               f"workload.popularity={self.popularity!r} must be one of {POPULARITIES}")
        _check(self.zipf_alpha > 0, f"workload.zipf_alpha={self.zipf_alpha} must be > 0")

    @classmethod
    def from_dict(cls, data, where="workload"):
        return dataclass_from_dict(cls, data, where)


@dataclass(frozen=True)
class ClusterConfig:
    """Replicas of one engine each. perf_model: "linear" (the paper-like A100 model) or a path to
    a perf model JSON. adapter_slots: adapters a replica keeps resident (LRU; 0 = unbounded).
    cold_start_ms: added to a prefill per adapter it must load; 0 models CaraServe, whose
    CPU-assisted prefill hides the load (set it > 0 to model on-demand loading)."""

    replicas: int = 60
    max_batch_size: int = 32
    perf_model: str = "linear"
    adapter_slots: int = 64
    cold_start_ms: float = 0.0

    def __post_init__(self):
        _check(self.replicas >= 1, f"cluster.replicas={self.replicas} must be >= 1")
        _check(self.max_batch_size >= 1, f"cluster.max_batch_size={self.max_batch_size} must be >= 1")
        _check(bool(self.perf_model), "cluster.perf_model must be 'linear' or a path")
        _check(self.adapter_slots >= 0, f"cluster.adapter_slots={self.adapter_slots} must be >= 0")
        _check(self.cold_start_ms >= 0, f"cluster.cold_start_ms={self.cold_start_ms} must be >= 0")

    @classmethod
    def from_dict(cls, data, where="cluster"):
        return dataclass_from_dict(cls, data, where)


@dataclass(frozen=True)
class RouterConfig:
    """slo_ms: per-token latency SLO (end-to-end latency / output tokens) the policies aim at and
    attainment is measured against. avg_output_tokens: the router's estimate of output length
    (0 = the workload's mean). resident_discount: rank_aware's cost discount for a resident adapter."""

    slo_ms: float = 40.0
    avg_output_tokens: float = 0.0
    resident_discount: float = 0.1

    def __post_init__(self):
        _check(self.slo_ms > 0, f"scheduler.slo_ms={self.slo_ms} must be > 0")
        _check(self.avg_output_tokens >= 0, "scheduler.avg_output_tokens must be >= 0")
        _check(0 <= self.resident_discount < 1, "scheduler.resident_discount must be in [0, 1)")

    @classmethod
    def from_dict(cls, data, where="scheduler"):
        return dataclass_from_dict(cls, data, where)
