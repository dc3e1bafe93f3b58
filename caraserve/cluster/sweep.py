"""Load sweeps of the cluster simulator: every policy at every arrival rate, and the plot of them."""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from caraserve.cluster.config import ClusterConfig, RouterConfig, WorkloadConfig
from caraserve.cluster.simulator import simulate
from caraserve.perf.model import PerfModel

log = logging.getLogger(__name__)


def _one(cluster: ClusterConfig, workload: WorkloadConfig, router: RouterConfig, policy: str,
         perf: dict) -> dict:
    # The perf model crosses the process boundary as its JSON dict: its term functions don't pickle.
    return simulate(cluster, workload, router, [policy], PerfModel.from_dict(perf))[policy].to_dict()


def sweep(cluster: ClusterConfig, workload: WorkloadConfig, router: RouterConfig, policies: list[str],
          rps_list: list[float], perf: PerfModel, workers: int = 1, progress=None) -> list[dict]:
    """[{"rps": x, "results": {policy: PolicyResult dict}}] in rps order. The workload differs
    between loads only in its arrival rate (same seed, so same adapters and lengths per request)."""
    tasks = [(rps, name) for rps in rps_list for name in policies]
    perf_dict = perf.to_dict()
    args = [(cluster, dataclasses.replace(workload, rps=float(rps)), router, name, perf_dict) for rps, name in tasks]
    results: dict[tuple[float, str], dict] = {}
    if workers <= 1:
        for (rps, name), a in zip(tasks, args):
            results[(rps, name)] = _one(*a)
            if progress is not None:
                progress.update(1)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(_one, *a): key for key, a in zip(tasks, args)}
            for fut in futures:
                results[futures[fut]] = fut.result()
                if progress is not None:
                    progress.update(1)
    return [{"rps": float(rps), "results": {name: results[(rps, name)] for name in policies}} for rps in rps_list]


def plot_sweep(rows: list[dict], png: str | Path, slo_ms: float, title: str = "") -> bool:
    """SLO attainment and mean time per token against load, one line per policy. Returns False
    (and logs) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    rps = [row["rps"] for row in rows]
    policies = list(rows[0]["results"]) if rows else []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in policies:
        style = {"linewidth": 2.5, "color": "black"} if name == "rank_aware" else {"linewidth": 1.2}
        ax1.plot(rps, [row["results"][name]["slo_attainment"] * 100 for row in rows], marker="o", label=name, **style)
        ax2.plot(rps, [row["results"][name]["tpt_mean_ms"] for row in rows], marker="o", label=name, **style)
    ax1.axhline(99, color="grey", linestyle=":", linewidth=1)
    ax1.set(xlabel="load (requests/s)", ylabel=f"SLO attainment (%), SLO {slo_ms:g} ms/token",
            ylim=(max(0, min([row["results"][p]["slo_attainment"] * 100 for row in rows for p in policies],
                             default=0) - 5), 101))
    ax2.axhline(slo_ms, color="grey", linestyle=":", linewidth=1)
    # Past saturation router queueing grows without bound: a log axis keeps the sub-SLO region readable.
    ax2.set(xlabel="load (requests/s)", ylabel="mean time per token (ms)", yscale="log")
    ax2.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax2.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax1.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True
