"""Thread plan: how the CPU-assisted LoRA work of a request is split over CPU workers, which cores
requests running at once get (`assign_cores`), and the cost model `cpu_assist.mode=auto` decides
with.

A plan file (written by scripts/profile_cpu_lora.py) holds measured CPU LoRA throughput per
(tokens, rank, threads) and, per (tokens, rank), the fewest threads that meet the per-layer
time budget. Without one, a default from this machine class's measured facts is used (fp32
LoRA-shaped matmuls reach ~30 GFLOP/s per core) and the fact is logged.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from caraserve.config_checks import ConfigError

log = logging.getLogger(__name__)

DEFAULT_GFLOPS_PER_THREAD = 30.0
DEFAULT_TOKENS_PER_THREAD = 256  # below this, splitting a prompt costs more than it saves
# The project's own profiles folder, not the working directory's: a server started elsewhere
# must pick the same plan up.
DEFAULT_PLAN = Path(__file__).resolve().parents[2] / "profiles" / "cpu_lora_plan.json"


@dataclass(frozen=True)
class ThreadPlan:
    max_threads: int
    gflops_per_thread: float = DEFAULT_GFLOPS_PER_THREAD
    # (tokens, rank) -> threads, from a profile; tokens and ranks sorted ascending
    grid_tokens: tuple[int, ...] = ()
    grid_ranks: tuple[int, ...] = ()
    threads_table: tuple[tuple[int, ...], ...] = ()
    source: str = "default"
    copy_gbps: float = 16.0  # host -> device adapter copy bandwidth assumed by `auto`
    cores: tuple[int, ...] = field(default_factory=tuple)  # cores the workers may use

    @classmethod
    def load(cls, plan_file: str, threads: int) -> ThreadPlan:
        cores = tuple(sorted(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else ()
        max_threads = threads or max(1, len(cores) - 1 if cores else (os.cpu_count() or 2) - 1)
        if cores and threads > len(cores):
            log.warning("cpu_assist.threads=%d is more than the %d cores this process may use: "
                        "workers will share cores and run slower than the plan predicts",
                        threads, len(cores))
        path = Path(plan_file) if plan_file else DEFAULT_PLAN
        if not path.is_file():
            if plan_file:
                raise ConfigError(f"cpu_assist.plan_file={plan_file}: no such file")
            log.info("no CPU LoRA thread plan at %s: default plan (%d threads, %.0f GFLOP/s each); "
                     "run scripts/profile_cpu_lora.py to measure one", path, max_threads, DEFAULT_GFLOPS_PER_THREAD)
            return cls(max_threads, cores=cores)
        try:
            plan = json.loads(path.read_text())["plan"]
            return cls(
                max_threads=max_threads,
                gflops_per_thread=float(plan["gflops_per_thread"]),
                grid_tokens=tuple(plan["tokens"]),
                grid_ranks=tuple(plan["ranks"]),
                threads_table=tuple(tuple(row) for row in plan["threads"]),
                source=str(path),
                cores=cores,
            )
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"cpu_assist.plan_file={path}: not a thread plan written by "
                              f"scripts/profile_cpu_lora.py ({type(e).__name__}: {e})") from None

    def threads_for(self, tokens: int, rank: int) -> int:
        """Workers a request of `tokens` prompt tokens and this rank gets (clamped to the grid)."""
        if self.threads_table:
            ti = min(bisect.bisect_left(self.grid_tokens, tokens), len(self.grid_tokens) - 1)
            ri = min(bisect.bisect_left(self.grid_ranks, rank), len(self.grid_ranks) - 1)
            want = self.threads_table[ti][ri]
        else:
            want = math.ceil(tokens / DEFAULT_TOKENS_PER_THREAD)
        return max(1, min(want, self.max_threads))

    def cpu_lora_seconds(self, tokens: int, flops_per_token: float, rank: int = 1) -> float:
        """Predicted CPU time of a request's LoRA deltas over a whole prefill, on the workers a
        request of that many tokens and this rank gets."""
        threads = self.threads_for(tokens, rank)
        return tokens * flops_per_token / (self.gflops_per_thread * 1e9 * threads)

    def copy_seconds(self, nbytes: int, emulate_gbps: float = 0.0) -> float:
        return nbytes / ((emulate_gbps or self.copy_gbps) * 1e9)


def assign_cores(wants: Sequence[int], cores: Sequence[int]) -> list[tuple[int, ...]]:
    """Cores for requests whose CPU LoRA work runs at the same time; request i asks for wants[i].

    While the cores last the sets are disjoint: every request first gets one core, in order, then
    the remaining cores go round-robin to the requests still short of their ask. With more
    requests than cores, request i gets core cores[i % len(cores)], shared with others.
    """
    n = len(cores)
    if n == 0:
        raise ValueError("assign_cores needs at least one core")
    if any(w < 1 for w in wants):
        raise ValueError(f"every request needs at least one core, asked {list(wants)}")
    if len(wants) > n:
        return [(cores[i % n],) for i in range(len(wants))]
    give = [1] * len(wants)
    left = n - len(wants)
    while left and any(g < w for g, w in zip(give, wants)):
        for i, w in enumerate(wants):
            if left and give[i] < w:
                give[i] += 1
                left -= 1
    out, pos = [], 0
    for g in give:
        out.append(tuple(cores[pos : pos + g]))
        pos += g
    return out
