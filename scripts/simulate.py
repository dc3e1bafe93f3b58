"""Cluster routing simulation: SLO attainment and latency of each policy over simulated replicas.

    python scripts/simulate.py cluster.replicas=60 workload.rps=300 workload.ranks=[8,16,32,64] \
        workload.popularity=zipf workload.seed=0 scheduler.slo_ms=40 \
        policies=[rank_aware,random,first_fit,most_idle,dlora] output=OUT.json
    python scripts/simulate.py sweep_rps=[100,200,300] workers=2 output=OUT.json   # also OUT.png

Prints a table; the JSON holds, per policy, slo_attainment (0-1) beside the latency figures, and
for a sweep one such block per load plus a verdict: whether rank_aware reaches 99 % SLO
attainment where the best baseline stays under 95 %, with a lower mean time per token than all.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from caraserve.cli import config_task, run
from caraserve.cluster.config import ClusterConfig, RouterConfig, WorkloadConfig
from caraserve.cluster.policies import POLICIES
from caraserve.cluster.simulator import load_perf_model, simulate
from caraserve.cluster.sweep import plot_sweep, sweep
from caraserve.cluster.workload import generate, rank_mix
from caraserve.config import ConfigError, check_keys
from caraserve.config_checks import show
from caraserve.paths import cannot_write

log = logging.getLogger("simulate")

COLUMNS = ("policy", "SLO %", "tpt mean", "tpt p99", "ttft mean", "ttft p99", "batch", "max rank", "requests", "held")


def table(results: dict[str, dict]) -> str:
    rows = [COLUMNS] + [(name, f"{m['slo_attainment'] * 100:.2f}", f"{m['tpt_mean_ms']:.2f}", f"{m['tpt_p99_ms']:.2f}",
                         f"{m['ttft_mean_ms']:.1f}", f"{m['ttft_p99_ms']:.1f}", f"{m['mean_decode_batch']:.1f}",
                         f"{m['mean_decode_max_rank']:.1f}", str(m["count"]),
                         str(m["max_router_queue"])) for name, m in results.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def verdict(results: dict[str, dict]) -> dict | None:
    """The paper's claim at one load: rank_aware >= 99 % attainment, best baseline < 95 %, and
    rank_aware's mean time per token below every baseline's."""
    if "rank_aware" not in results or len(results) < 2:
        return None
    ra = results["rank_aware"]
    base = {k: v for k, v in results.items() if k != "rank_aware"}
    best = max(base, key=lambda k: base[k]["slo_attainment"])
    fastest = min(base, key=lambda k: base[k]["tpt_mean_ms"])
    return {"rank_aware_slo_attainment": ra["slo_attainment"], "best_baseline": best,
            "best_baseline_slo_attainment": base[best]["slo_attainment"],
            "tpt_gain_vs_fastest_baseline": 1 - ra["tpt_mean_ms"] / base[fastest]["tpt_mean_ms"],
            "target_met": ra["slo_attainment"] >= 0.99 and base[best]["slo_attainment"] < 0.95
            and all(ra["tpt_mean_ms"] < v["tpt_mean_ms"] for v in base.values())}


TOP_KEYS = ("cluster", "workload", "scheduler", "policies", "output", "sweep_rps", "workers", "progress")


def _options(composed: dict) -> tuple[list[str], list[float], int, Path | None]:
    """(policies, loads to sweep, workers, output) of the top-level keys, checked before anything runs."""
    check_keys(composed, TOP_KEYS)
    policies = composed["policies"]
    policies = [policies] if isinstance(policies, str) else policies
    if not isinstance(policies, list) or not policies or not all(isinstance(p, str) for p in policies):
        raise ConfigError(f"policies={show(composed['policies'])}: expected a list of policy names, e.g. "
                          f"policies=[rank_aware,random]; known: {sorted(POLICIES)}")
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise ConfigError(f"policies: unknown {unknown}; known: {sorted(POLICIES)}")
    loads = composed["sweep_rps"] or []
    if not isinstance(loads, list) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in loads):
        raise ConfigError(f"sweep_rps={show(composed['sweep_rps'])}: expected a list of loads > 0 (requests/s), "
                          "e.g. sweep_rps=[100,200,300]")
    workers = composed["workers"]
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ConfigError(f"workers={show(workers)} must be an integer >= 1")
    if not isinstance(composed["progress"], bool):
        raise ConfigError(f"progress={show(composed['progress'])} must be true or false")
    out = composed["output"]
    if out is None:
        return policies, [float(x) for x in loads], workers, None
    if not isinstance(out, str) or not out:
        raise ConfigError(f"output={show(out)}: expected a file path")
    out = Path(hydra.utils.to_absolute_path(out))
    why = cannot_write(out.parent, make=True)  # made and tried now: a run's results are not lost at its end
    if why is not None:
        raise ConfigError(f"output={out}: cannot write in {out.parent} ({why})")
    if out.is_dir():
        raise ConfigError(f"output={out}: is a folder")
    return policies, [float(x) for x in loads], workers, out


@hydra.main(config_path="../conf", config_name="simulate", version_base="1.3")
@config_task
def main(cfg: DictConfig) -> None:
    composed = OmegaConf.to_container(cfg, resolve=True)
    cluster = ClusterConfig.from_dict(composed["cluster"])
    workload = WorkloadConfig.from_dict(composed["workload"])
    router = RouterConfig.from_dict(composed["scheduler"])
    policies, loads, workers, out = _options(composed)
    spec = cluster.perf_model
    perf = load_perf_model(spec if spec == "linear" else hydra.utils.to_absolute_path(spec))
    requests = generate(workload)
    report = {"header": {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                         "perf_model": perf.header, "perf_law": perf.describe(),
                         "request_rank_mix": {str(k): v for k, v in rank_mix(requests).items()}},
              "config": {k: composed[k] for k in ("cluster", "workload", "scheduler", "policies")}}
    print(f"perf model: {perf.describe()}")
    if loads:
        bar = tqdm(total=len(loads) * len(policies), desc="runs", file=sys.stderr, disable=not composed["progress"])
        rows = sweep(cluster, workload, router, policies, loads, perf, workers=workers, progress=bar)
        bar.close()
        for row in rows:
            row["verdict"] = verdict(row["results"])
            print(f"\n== {row['rps']:g} requests/s (SLO {router.slo_ms:g} ms/token)")
            print(table(row["results"]))
        report["sweep"] = rows
        if out is not None:
            png = out.with_suffix(".png")
            title = (f"{cluster.replicas} replicas, max batch {cluster.max_batch_size}, ranks {list(workload.ranks)}, "
                     f"{workload.popularity} popularity, SLO {router.slo_ms:g} ms/token")
            if plot_sweep(rows, png, router.slo_ms, title):
                print(f"wrote {png}")
    else:
        results = {k: v.to_dict() for k, v in simulate(cluster, workload, router, policies, perf).items()}
        print(f"\n== {workload.rps:g} requests/s, {len(requests)} requests (SLO {router.slo_ms:g} ms/token)")
        print(table(results))
        report["results"] = results
        report["verdict"] = verdict(results)
    if out is not None:
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(run(main))
