"""The cluster simulator: step timing, conservation, determinism, workloads, and the Hydra entry point."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from caraserve.cluster.config import ClusterConfig, LengthDist, RouterConfig, WorkloadConfig
from caraserve.cluster.policies import Policy, PolicyParams, make_policy
from caraserve.cluster.simulator import load_perf_model, simulate, timeline
from caraserve.cluster.workload import SimRequest, generate
from caraserve.config import ConfigError
from caraserve.perf.model import PerfModel

ROOT = Path(__file__).resolve().parents[1]
PERF = PerfModel.linear()
SMALL = WorkloadConfig(rps=40, duration_s=8, num_adapters=16, seed=3)
CLUSTER = ClusterConfig(replicas=4, max_batch_size=8)
ALL = ["rank_aware", "random", "round_robin", "first_fit", "most_idle", "dlora"]


def _one_replica(requests, max_bs=8):
    cluster = ClusterConfig(replicas=1, max_batch_size=max_bs)
    return timeline(make_policy("first_fit", PolicyParams()), requests, cluster, PERF)


def test_single_request_is_one_prefill_then_decode_steps():
    tl = _one_replica([SimRequest(0, 1.0, "a", 16, 100, 10)])
    prefill = PERF.prefill_s(1, 100, 16, 1600)
    assert tl.first_token_s[0] == pytest.approx(1.0 + prefill)
    assert tl.finish_s[0] == pytest.approx(1.0 + prefill + 9 * PERF.decode_s(1, 16, 16))


def test_arrival_mid_step_waits_for_the_boundary_and_its_prefill_stalls_the_batch():
    pa, da = PERF.prefill_s(1, 100, 8, 800), PERF.decode_s(1, 8, 8)
    a = SimRequest(0, 0.0, "a", 8, 100, 10)
    b = SimRequest(1, pa + 2.5 * da, "b", 64, 50, 3)  # during A's third decode step
    tl = _one_replica([a, b])
    t3 = pa + 3 * da
    pb, d2 = PERF.prefill_s(1, 50, 64, 50 * 64), PERF.decode_s(2, 64, 72)
    assert tl.first_token_s[1] == pytest.approx(t3 + pb)
    assert tl.finish_s[1] == pytest.approx(t3 + pb + 2 * d2)
    # A had 4 of its 10 tokens at t3; 2 more beside B at B's rank, then 4 alone.
    assert tl.finish_s[0] == pytest.approx(t3 + pb + 2 * d2 + 4 * da)


def test_every_request_finishes_exactly_once_even_when_the_router_must_hold():
    w = dataclasses.replace(SMALL, rps=400, duration_s=2)
    requests = generate(w)
    cluster = ClusterConfig(replicas=2, max_batch_size=4)
    for name in ALL:
        tl = timeline(make_policy(name, PolicyParams()), requests, cluster, PERF)
        arrival = np.array([r.arrival_s for r in requests])
        assert not np.isnan(tl.finish_s).any()
        assert (tl.first_token_s > arrival).all() and (tl.finish_s >= tl.first_token_s).all()
        assert tl.max_router_queue > 0  # 800 requests on 8 slots: the router held some
    results = simulate(cluster, w, RouterConfig(), ALL, PERF)
    assert {r.count for r in results.values()} == {len(requests)}


def test_a_policy_that_overfills_a_replica_is_caught():
    class Stubborn(Policy):
        name = "stubborn"

        def choose(self, request, replicas):
            return 0

    with pytest.raises(RuntimeError, match="full replica"):
        timeline(Stubborn(PolicyParams()), generate(dataclasses.replace(SMALL, rps=400, duration_s=1)),
                 ClusterConfig(replicas=2, max_batch_size=2), PERF)


def test_results_are_deterministic_under_a_seed():
    one = {k: v.to_dict() for k, v in simulate(CLUSTER, SMALL, RouterConfig(), ALL, PERF).items()}
    two = {k: v.to_dict() for k, v in simulate(CLUSTER, SMALL, RouterConfig(), ALL[::-1], PERF).items()}
    assert one == two
    other = simulate(CLUSTER, dataclasses.replace(SMALL, seed=4), RouterConfig(), ["random"], PERF)["random"]
    assert other.to_dict() != one["random"]


def test_slo_attainment_is_a_fraction_that_follows_the_slo():
    for slo_ms, expect in ((1e6, 1.0), (1.0, 0.0)):
        res = simulate(CLUSTER, SMALL, RouterConfig(slo_ms=slo_ms), ["most_idle", "rank_aware"], PERF)
        assert all(r.slo_attainment == expect for r in res.values())
    res = simulate(CLUSTER, dataclasses.replace(SMALL, rps=120), RouterConfig(slo_ms=30), ALL, PERF)
    for r in res.values():
        assert 0.0 <= r.slo_attainment <= 1.0
        assert r.tpt_p99_ms >= r.tpt_mean_ms > 0 and r.ttft_p99_ms >= r.ttft_mean_ms > 0


def test_workload_generation():
    reqs = generate(SMALL)
    assert all(b.arrival_s >= a.arrival_s for a, b in zip(reqs, reqs[1:]))
    assert reqs[-1].arrival_s <= SMALL.duration_s and abs(len(reqs) - 320) < 80
    assert {r.rank for r in reqs} <= {8, 16, 32, 64}
    # Another load keeps each request's adapter and lengths (common random numbers).
    heavier = generate(dataclasses.replace(SMALL, rps=80))
    assert [(r.adapter, r.prompt_tokens, r.output_tokens) for r in reqs] == \
           [(r.adapter, r.prompt_tokens, r.output_tokens) for r in heavier[: len(reqs)]]
    exact = generate(dataclasses.replace(SMALL, num_requests=50))
    assert len(exact) == 50 and [r.id for r in exact] == list(range(50))


def test_zipf_popularity_and_bursty_arrivals():
    zipf = generate(WorkloadConfig(rps=100, num_requests=4000, popularity="zipf", num_adapters=32))
    uniform = generate(WorkloadConfig(rps=100, num_requests=4000, popularity="uniform", num_adapters=32))
    top = lambda reqs: max(np.unique([r.adapter for r in reqs], return_counts=True)[1]) / len(reqs)
    assert top(zipf) > 0.15 > 0.06 > top(uniform)
    bursty = generate(WorkloadConfig(rps=100, num_requests=4000, arrival="gamma", arrival_cv=3.0))
    gaps = np.diff([r.arrival_s for r in bursty])
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.15)
    assert 1 / gaps.mean() == pytest.approx(100, rel=0.15)


def test_lengths_follow_their_distribution():
    w = WorkloadConfig(rps=100, num_requests=3000,
                       output_tokens=LengthDist("uniform", 15, 0, 10, 20), prompt_tokens=LengthDist("fixed", 33))
    reqs = generate(w)
    assert {r.prompt_tokens for r in reqs} == {33}
    assert min(r.output_tokens for r in reqs) == 10 and max(r.output_tokens for r in reqs) == 20


def test_configs_are_validated():
    with pytest.raises(ConfigError, match="popularity"):
        WorkloadConfig(popularity="pareto")
    with pytest.raises(ConfigError, match="unknown"):
        WorkloadConfig.from_dict({"rps": 3, "bogus": 1})
    with pytest.raises(ConfigError, match="min_tokens"):
        LengthDist(min_tokens=10, max_tokens=5)
    w = WorkloadConfig.from_dict({"ranks": [8, 64], "output_tokens": {"dist": "fixed", "mean_tokens": 5}})
    assert w.ranks == (8, 64) and w.output_tokens.mean_tokens == 5


def _run_script(tmp_path, *overrides):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "simulate.py"), "cluster.replicas=4",
                           "cluster.max_batch_size=8", "workload.duration_s=5", "workload.num_adapters=16",
                           "progress=false", *overrides],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_simulate_script_end_to_end(tmp_path):
    out = tmp_path / "sim.json"
    proc = _run_script(tmp_path, "workload.rps=30", "workload.ranks=[8,16,32,64]", "workload.popularity=uniform",
                       "workload.seed=2", "scheduler.slo_ms=40",
                       "policies=[rank_aware,random,first_fit,most_idle,dlora]", f"output={out}")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"rank_aware", "random", "first_fit", "most_idle", "dlora"}
    for m in data["results"].values():
        assert 0 <= m["slo_attainment"] <= 1 and m["count"] > 100 and m["tpt_mean_ms"] > 0
    assert data["header"]["perf_model"]["model"] == "Llama-2-7B"
    assert "rank_aware" in proc.stdout and "SLO %" in proc.stdout
    assert not (tmp_path / "outputs").exists()  # hydra.run.dir is the current directory, no litter


def test_simulate_script_sweep_writes_json_and_png(tmp_path):
    out = tmp_path / "sweep.json"
    proc = _run_script(tmp_path, "sweep_rps=[10,40]", "policies=[rank_aware,most_idle]", f"output={out}")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert [row["rps"] for row in data["sweep"]] == [10, 40]
    assert all("slo_attainment" in row["results"]["most_idle"] for row in data["sweep"])
    assert out.with_suffix(".png").stat().st_size > 5000


def test_simulate_script_rejects_bad_input(tmp_path):
    assert _run_script(tmp_path, "policies=[nope]").returncode == 2
    assert _run_script(tmp_path, "workload.rps=-1").returncode == 2


def test_perf_model_loads_bare_or_inside_a_profile(tmp_path):
    model = PerfModel.linear(decode_base_ms=11.0)
    (tmp_path / "bare.json").write_text(json.dumps(model.to_dict()))
    (tmp_path / "profile.json").write_text(json.dumps({"header": model.header, "raw": [], "model": model.to_dict()}))
    for name in ("bare.json", "profile.json"):
        assert load_perf_model(str(tmp_path / name)).decode_s(4, 16, 64) == pytest.approx(model.decode_s(4, 16, 64))
    assert load_perf_model("linear").decode_s(4, 16, 64) != pytest.approx(model.decode_s(4, 16, 64))
    with pytest.raises(ConfigError, match="cluster.perf_model=.*missing.json: no such file"):
        load_perf_model(str(tmp_path / "missing.json"))
