"""End to end on Ray Serve: engine replicas behind the ingress and RankAwareRequestRouter, one run
per routing policy, and the Ray path's overhead against a single `caraserve.serve`.

    python scripts/bench_ray.py [--replicas 2] [--requests 48] [--rate 4] [--policies rank_aware,round_robin,
        most_idle,random,first_fit,dlora] [--rounds 2] [--slo-ms 100] [--overhead-requests 20]
        [--seed 0] [--out profiles/cpu/bench_ray.json]

One local Ray instance (files under a short temp folder); per run a fresh Serve application
(`python -m caraserve.ray_serve`'s, --replicas engine replicas on the embedded default,
`engine.compile=false`, each publishing the latency model profiles/cpu/tiny/latency.json in its
state) routed by that run's policy. The workload is the seeded one of the earlier HTTP router's
benchmark: Poisson arrivals at --rate, the base model and the demo adapters (ranks 8-64) drawn
uniformly, prompts of 8-96 words, max_tokens 8-48 with ignore_eos, greedy, not streamed. With
--rounds N every policy runs N times, the order rotated by one each round; medians are reported.
Per run: completed / sent, errors, retries (the ingress's /metrics), SLO attainment (sent
requests that completed with E2E / output tokens <= --slo-ms), time per output token (mean, p99),
E2E p50/p99.

Overhead: --overhead-requests sequential requests (8 tokens, greedy) through a one-replica Ray
application and through one `python -m caraserve.serve`, alternating, 3 times each; the mean E2E
per request of each and their difference. A table to stdout, JSON with a provenance header to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
from bench_serve import WORDS, pct

from caraserve.profiling.machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("tiny", "demo-r8", "demo-r16", "demo-r32", "demo-r64")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--rate", type=float, default=4.0, help="mean arrival rate, requests/s (Poisson)")
    p.add_argument("--policies", default="rank_aware,round_robin,most_idle,random,first_fit,dlora")
    p.add_argument("--rounds", type=int, default=2, help="runs per policy (order rotated per round; medians)")
    p.add_argument("--slo-ms", type=float, default=100.0, help="per-token latency SLO, for the router and the report")
    p.add_argument("--max-batch-size", type=int, default=16, help="engine.max_batch_size of each replica")
    p.add_argument("--overhead-requests", type=int, default=20, help="0 = skip the overhead measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="profiles/cpu/bench_ray.json")
    args = p.parse_args(argv)
    if args.requests < 2 or args.rate <= 0 or args.rounds < 1 or args.replicas < 1:
        p.error("--requests must be >= 2, --rate > 0, --rounds >= 1, --replicas >= 1")
    return args


def make_workload(args) -> list[dict]:
    rng = random.Random(args.seed)
    t, work = 0.0, []
    for i in range(args.requests):
        t += rng.expovariate(args.rate) if i else 0.0
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 96)))
        work.append({"index": i, "arrival_s": t, "model": rng.choice(MODELS), "prompt": prompt,
                     "max_tokens": rng.randint(8, 48)})
    return work


async def send(client: httpx.AsyncClient, url: str, item: dict) -> dict:
    body = {"model": item["model"], "prompt": item["prompt"], "max_tokens": item["max_tokens"],
            "temperature": 0, "ignore_eos": True}
    t0 = time.perf_counter()
    rec = {"index": item["index"], "model": item["model"], "status": None, "error": None, "output_tokens": 0}
    try:
        r = await client.post(url + "/v1/completions", json=body)
        rec["status"] = r.status_code
        if r.status_code == 200:
            rec["output_tokens"] = r.json()["usage"]["completion_tokens"]
        else:
            rec["error"] = r.text[:300]
    except httpx.HTTPError as e:
        rec["error"] = f"{type(e).__name__}: {e}"[:300]
    rec["e2e_s"] = time.perf_counter() - t0
    return rec


async def drive(url: str, work: list[dict]) -> list[dict]:
    limits = httpx.Limits(max_connections=len(work), max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        tasks = []
        for item in work:
            await asyncio.sleep(max(0.0, item["arrival_s"] - (time.perf_counter() - t0)))
            tasks.append(asyncio.create_task(send(client, url, item)))
        return list(await asyncio.gather(*tasks))


def summarize(label: str, recs: list[dict], slo_s: float, n_retries: int) -> dict:
    ok = [r for r in recs if r["status"] == 200 and r["output_tokens"] > 0]
    per_token = [r["e2e_s"] / r["output_tokens"] for r in ok]
    e2e = [r["e2e_s"] for r in ok]
    return {"run": label, "sent": len(recs), "completed": len(ok), "errors": len(recs) - len(ok),
            "retries": n_retries, "slo_attainment": sum(t <= slo_s for t in per_token) / len(recs),
            "per_token_mean_ms": float(np.mean(per_token)) * 1e3 if per_token else None,
            "per_token_p99_ms": pct(per_token, 99) * 1e3 if per_token else None,
            "e2e_p50_s": pct(e2e, 50), "e2e_p99_s": pct(e2e, 99),
            "first_errors": [r["error"] for r in recs if r["error"]][:3]}


def wait_healthy(url: str, replicas: int, timeout_s: float = 300.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{url} exited with {proc.returncode} while starting")
        try:
            r = httpx.get(url + "/health", timeout=5)
            if r.status_code == 200 and r.json().get("replicas_up", 1) >= replicas:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{url} did not become healthy in {timeout_s:.0f} s")


class RayApp:
    """One local Ray instance; a fresh Serve application per run."""

    def __init__(self, args, temp: str):
        from hydra import compose, initialize_config_dir
        from omegaconf import OmegaConf

        from caraserve.ray_serve.app import app_config, start_ray

        self.args, self.temp, self.port = args, temp, free_port()
        self._compose = lambda overrides: OmegaConf.to_container(compose("ray_serve", overrides=overrides),
                                                                 resolve=True)
        self._app_config = app_config
        self._init = initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3")
        self._init.__enter__()
        self.base = self.config("rank_aware", args.replicas)
        start_ray(self.base.ray)

    def config(self, policy: str, replicas: int):
        composed = self._compose([
            f"cluster.replicas={replicas}", "cluster.cpus_per_replica=0", "engine.compile=false",
            f"engine.max_batch_size={self.args.max_batch_size}",
            f"scheduler.perf_model={ROOT / 'profiles/cpu/tiny/latency.json'}", f"router.policy={policy}",
            f"router.slo_ms={self.args.slo_ms}", "router.avg_output_tokens=28", "router.stats_period_s=0.2",
            "server.log_level=warning", f"server.port={self.port}", f"ray.temp_dir={self.temp}"])
        composed.pop("hydra", None)
        return self._app_config(composed)

    def run(self, policy: str, replicas: int) -> str:
        from ray import serve

        from caraserve.ray_serve.app import deploy

        if serve.status().applications:  # the previous run's replicas go: each run starts fresh
            serve.delete(self.base.ray.app_name)
        deploy(self.config(policy, replicas))
        url = f"http://127.0.0.1:{self.port}"
        wait_healthy(url, replicas)
        return url

    def close(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        self._init.__exit__(None, None, None)


def ingress_retries(url: str) -> int:
    text = httpx.get(url + "/metrics", timeout=5).text
    return int(sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                   if ln.startswith("caraserve_ray_retries_total")))


def sequential_ms(url: str, n: int) -> float:
    """Mean E2E of n sequential 8-token greedy requests (after 2 warm-ups), in ms."""
    times = []
    with httpx.Client(timeout=120) as client:
        for i in range(n + 2):
            body = {"model": MODELS[i % len(MODELS)], "prompt": "def main():", "max_tokens": 8, "temperature": 0,
                    "ignore_eos": True}
            t0 = time.perf_counter()
            r = client.post(url + "/v1/completions", json=body)
            if r.status_code != 200:
                raise SystemExit(f"overhead request failed: {r.status_code} {r.text[:200]}")
            if i >= 2:
                times.append(time.perf_counter() - t0)
    return float(np.mean(times)) * 1e3


def overhead(args, app: RayApp) -> dict:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    plain_cmd = [sys.executable, "-m", "caraserve.serve", f"server.port={port}", "engine.compile=false",
                 f"engine.max_batch_size={args.max_batch_size}", "server.log_level=warning"]
    ray_ms, plain_ms = [], []
    for k in range(3):
        ray_url = app.run("rank_aware", 1)
        ray_ms.append(sequential_ms(ray_url, args.overhead_requests))
        from ray import serve

        serve.delete(app.base.ray.app_name)
        proc = subprocess.Popen(plain_cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_healthy(f"http://127.0.0.1:{port}", 1, proc=proc)
            plain_ms.append(sequential_ms(f"http://127.0.0.1:{port}", args.overhead_requests))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        print(f"[overhead {k + 1}/3] ray {ray_ms[-1]:.1f} ms, plain {plain_ms[-1]:.1f} ms per request", file=sys.stderr)
    return {"requests": args.overhead_requests, "ray_ms": ray_ms, "plain_ms": plain_ms,
            "ray_ms_median": float(np.median(ray_ms)), "plain_ms_median": float(np.median(plain_ms)),
            "overhead_ms": float(np.median(ray_ms) - np.median(plain_ms))}


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    policies = [p for p in args.policies.split(",") if p]
    runs = []
    for k in range(args.rounds):  # rotated: a machine that drifts over minutes favours no policy
        order = policies[k % len(policies):] + policies[: k % len(policies)]
        runs += [(p, k) for p in order]
    work = make_workload(args)
    temp = tempfile.mkdtemp(prefix="csbench", dir="/tmp")  # short: Ray's socket paths go below it
    app = RayApp(args, temp)
    results, over = [], None
    try:
        for policy, k in runs:
            url = app.run(policy, args.replicas)
            print(f"[{policy} round {k + 1}] {len(work)} requests at {args.rate}/s over {args.replicas} replicas",
                  file=sys.stderr)
            recs = asyncio.run(drive(url, work))
            results.append({**summarize(policy, recs, args.slo_ms / 1e3, ingress_retries(url)), "round": k + 1})
        if args.overhead_requests:
            over = overhead(args, app)
    finally:
        app.close()
        shutil.rmtree(temp, ignore_errors=True)
    cols = ("run", "round", "completed", "errors", "retries", "slo_attainment", "per_token_mean_ms",
            "per_token_p99_ms", "e2e_p50_s", "e2e_p99_s")
    print(" | ".join(cols))
    for r in results:
        print(" | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    medians = {}
    for label in dict.fromkeys(r["run"] for r in results):
        mine = [r for r in results if r["run"] == label]
        medians[label] = {key: float(np.median([r[key] for r in mine if r[key] is not None] or [np.nan]))
                          for key in ("slo_attainment", "per_token_mean_ms", "per_token_p99_ms")}
        medians[label]["completed"] = f"{sum(r['completed'] for r in mine)}/{sum(r['sent'] for r in mine)}"
    print(f"\nmedians over {args.rounds} round(s): policy | SLO attainment | mean ms/token | p99 ms/token")
    for label, m in medians.items():
        print(f"{label} | {m['slo_attainment']:.3f} | {m['per_token_mean_ms']:.1f} | {m['per_token_p99_ms']:.1f}"
              f" | completed {m['completed']}")
    if over is not None:
        print(f"\noverhead at low load ({over['requests']} sequential 8-token requests, medians of 3): Ray Serve "
              f"{over['ray_ms_median']:.1f} ms vs caraserve.serve {over['plain_ms_median']:.1f} ms per request "
              f"(+{over['overhead_ms']:.1f} ms)")
    header = {"device": "cpu", "cpu": cpu_name(), "platform": platform.platform(),
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "args": vars(args)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"header": header, "medians": medians, "runs": results, "overhead": over},
                                         indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
