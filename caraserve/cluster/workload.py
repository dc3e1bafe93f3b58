"""Synthetic request streams for the cluster simulator: arrivals, adapters, prompt and output lengths.

Each aspect draws from its own seeded stream, so two workloads that differ only in rps hold the
same adapters and lengths request by request (common random numbers across a load sweep) and
only their arrival times scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from caraserve.cluster.config import LengthDist, WorkloadConfig

_ARRIVALS, _ADAPTERS, _PROMPTS, _OUTPUTS, _RANKS = range(5)


@dataclass(frozen=True)
class SimRequest:
    id: int
    arrival_s: float
    adapter: str
    rank: int
    prompt_tokens: int
    output_tokens: int


def sample_lengths(dist: LengthDist, n: int, rng: np.random.Generator) -> np.ndarray:
    if dist.dist == "fixed":
        raw = np.full(n, dist.mean_tokens)
    elif dist.dist == "uniform":
        raw = rng.integers(dist.min_tokens, dist.max_tokens + 1, size=n)
    else:
        mu = math.log(dist.mean_tokens) - dist.sigma**2 / 2
        raw = rng.lognormal(mu, dist.sigma, size=n)
    return np.clip(np.rint(raw), dist.min_tokens, dist.max_tokens).astype(np.int64)


def _inter_arrivals(cfg: WorkloadConfig, n: int, rng: np.random.Generator) -> np.ndarray:
    if cfg.arrival == "poisson":
        return rng.exponential(1.0 / cfg.rps, size=n)
    shape = 1.0 / cfg.arrival_cv**2
    return rng.gamma(shape, 1.0 / (cfg.rps * shape), size=n)


def arrival_times(cfg: WorkloadConfig) -> np.ndarray:
    rng = np.random.default_rng([cfg.seed, _ARRIVALS])
    if cfg.num_requests > 0:
        return np.cumsum(_inter_arrivals(cfg, cfg.num_requests, rng))
    chunks, t = [], 0.0
    while t <= cfg.duration_s:
        chunk = t + np.cumsum(_inter_arrivals(cfg, max(16, int(cfg.rps * cfg.duration_s * 0.25) + 1), rng))
        chunks.append(chunk)
        t = float(chunk[-1])
    times = np.concatenate(chunks)
    return times[times <= cfg.duration_s]


def adapter_ranks(cfg: WorkloadConfig) -> np.ndarray:
    """Rank of each adapter: the configured ranks in equal shares, shuffled."""
    rng = np.random.default_rng([cfg.seed, _RANKS])
    ranks = np.resize(np.array(cfg.ranks, dtype=np.int64), cfg.num_adapters)
    rng.shuffle(ranks)
    return ranks


def adapter_popularity(cfg: WorkloadConfig) -> np.ndarray:
    if cfg.popularity == "uniform":
        return np.full(cfg.num_adapters, 1.0 / cfg.num_adapters)
    w = 1.0 / np.arange(1, cfg.num_adapters + 1, dtype=np.float64) ** cfg.zipf_alpha
    return w / w.sum()


def generate(cfg: WorkloadConfig) -> list[SimRequest]:
    arrivals = arrival_times(cfg)
    n = len(arrivals)
    ranks = adapter_ranks(cfg)
    adapters = np.random.default_rng([cfg.seed, _ADAPTERS]).choice(cfg.num_adapters, size=n,
                                                                    p=adapter_popularity(cfg))
    prompts = sample_lengths(cfg.prompt_tokens, n, np.random.default_rng([cfg.seed, _PROMPTS]))
    outputs = sample_lengths(cfg.output_tokens, n, np.random.default_rng([cfg.seed, _OUTPUTS]))
    return [SimRequest(i, float(arrivals[i]), f"adapter-{int(adapters[i])}", int(ranks[adapters[i]]),
                       int(prompts[i]), int(outputs[i])) for i in range(n)]


def rank_mix(requests: list[SimRequest]) -> dict[int, float]:
    """Fraction of requests per rank (zipf popularity skews it away from the adapters' even mix)."""
    counts: dict[int, int] = {}
    for r in requests:
        counts[r.rank] = counts.get(r.rank, 0) + 1
    return {k: counts[k] / len(requests) for k in sorted(counts)}
