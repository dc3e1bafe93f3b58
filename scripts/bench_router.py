"""End to end: real caraserve.serve replicas behind `python -m caraserve.router`, one run per policy.

    python scripts/bench_router.py [--replicas 2] [--requests 300] [--rate 20] [--policies rank_aware,round_robin,
        most_idle,random,first_fit,dlora] [--kill-policy rank_aware] [--slo-ms 100] [--seed 0]
        [--rounds 1] [--out profiles/cpu/bench_router.json]

Starts --replicas servers on the embedded default (tiny model + demo adapters; each its own
process, `engine.compile=false`, publishing the latency model profiles/cpu/tiny/latency.json on
/v1/state), then for each policy a router in front of them, and sends the same seeded workload
through the router: Poisson arrivals at --rate, the base model and the demo adapters (ranks 8-64)
drawn uniformly, prompts of 8-96 words, max_tokens 8-48 with ignore_eos, greedy, not streamed (so
a request cut off by a dying replica is retried whole). One more run, labelled `<policy>+kill`,
SIGKILLs the first replica when half of the requests have been sent; the router must retry what
was in flight there on the others and lose nothing. Every run gets fresh replicas; with --rounds
N every policy runs N times, the order rotated by one each round, and medians are reported (a
2-core VM slows down and speeds up over minutes: a single run per policy in a fixed order
measures the machine as much as the policy).

Per run: requests completed / sent, errors, retries (from the router's /metrics), SLO attainment
(the fraction of sent requests that completed with E2E / output tokens <= --slo-ms), mean, p50 and
p99 of the time per output token, and E2E p50/p99. A table to stdout, JSON to --out. All servers
listen on loopback ports chosen free; everything started is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
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
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--rate", type=float, default=20.0, help="mean arrival rate, requests/s (Poisson)")
    p.add_argument("--policies", default="rank_aware,round_robin,most_idle,random,first_fit,dlora")
    p.add_argument("--kill-policy", default="rank_aware",
                   help="policy of the extra run with a replica killed ('' = none)")
    p.add_argument("--slo-ms", type=float, default=100.0, help="per-token latency SLO, for the router and the report")
    p.add_argument("--max-batch-size", type=int, default=16, help="engine.max_batch_size of each replica")
    p.add_argument("--rounds", type=int, default=1, help="runs per policy (order rotated per round; medians)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="profiles/cpu/bench_router.json")
    args = p.parse_args(argv)
    if args.replicas < 2 and args.kill_policy:
        p.error("killing a replica needs --replicas >= 2")
    if args.requests < 2 or args.rate <= 0 or args.rounds < 1:
        p.error("--requests must be >= 2, --rate > 0 and --rounds >= 1")
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


class Cluster:
    """The replica and router processes of the benchmark, each logging to its own file."""

    def __init__(self, args, logdir: Path):
        self.args, self.logdir = args, logdir
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.replicas: list[tuple[int, subprocess.Popen | None]] = [(free_port(), None) for _ in range(args.replicas)]

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "ab")
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)

    @staticmethod
    def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 180.0, replicas: int = 0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"{url} exited with {proc.returncode} while starting (see its log)")
            try:
                r = httpx.get(url + "/health", timeout=2)
                if r.status_code == 200 and r.json().get("replicas_up", replicas) >= replicas:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise SystemExit(f"{url} did not become healthy in {timeout_s:.0f} s")

    def start_replicas(self) -> None:
        started = []
        for i, (port, proc) in enumerate(self.replicas):
            if proc is None or proc.poll() is not None:
                proc = self._spawn(f"replica{i}", [
                    sys.executable, "-m", "caraserve.serve", f"server.port={port}", "engine.compile=false",
                    f"engine.max_batch_size={self.args.max_batch_size}",
                    "scheduler.perf_model=profiles/cpu/tiny/latency.json", "server.log_level=warning"])
                self.replicas[i] = (port, proc)
                started.append(i)
        for i in started:
            port, proc = self.replicas[i]
            self.wait_healthy(f"http://127.0.0.1:{port}", proc)

    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port, _ in self.replicas]

    def start_router(self, policy: str) -> tuple[str, subprocess.Popen]:
        port = free_port()
        proc = self._spawn(f"router-{policy}", [
            sys.executable, "-m", "caraserve.router", f"replicas=[{','.join(self.urls())}]", f"policy={policy}",
            f"server.port={port}", f"router.slo_ms={self.args.slo_ms}", "router.avg_output_tokens=28",
            "router.max_wait_s=600", "server.log_level=warning"])
        url = f"http://127.0.0.1:{port}"
        self.wait_healthy(url, proc, replicas=len(self.replicas))
        return url, proc

    def kill(self, i: int) -> None:
        self.replicas[i][1].send_signal(signal.SIGKILL)

    def stop(self) -> None:
        for _, proc in self.replicas:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for _, proc in self.replicas:
            if proc is not None:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()


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


async def drive(url: str, work: list[dict], on_half=None) -> list[dict]:
    limits = httpx.Limits(max_connections=len(work), max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        tasks = []
        for item in work:
            await asyncio.sleep(max(0.0, item["arrival_s"] - (time.perf_counter() - t0)))
            tasks.append(asyncio.create_task(send(client, url, item)))
            if on_half is not None and len(tasks) == len(work) // 2:
                on_half()
        return list(await asyncio.gather(*tasks))


def retries(router_url: str) -> int:
    text = httpx.get(router_url + "/metrics", timeout=5).text
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("caraserve_router_events_total{event=\"retry\"")))


def summarize(label: str, recs: list[dict], slo_s: float, n_retries: int) -> dict:
    ok = [r for r in recs if r["status"] == 200 and r["output_tokens"] > 0]
    per_token = [r["e2e_s"] / r["output_tokens"] for r in ok]
    e2e = [r["e2e_s"] for r in ok]
    return {"run": label, "sent": len(recs), "completed": len(ok), "errors": len(recs) - len(ok),
            "retries": n_retries, "slo_attainment": sum(t <= slo_s for t in per_token) / len(recs),
            "per_token_mean_ms": float(np.mean(per_token)) * 1e3 if per_token else None,
            "per_token_p50_ms": pct(per_token, 50) * 1e3 if per_token else None,
            "per_token_p99_ms": pct(per_token, 99) * 1e3 if per_token else None,
            "e2e_p50_s": pct(e2e, 50), "e2e_p99_s": pct(e2e, 99),
            "first_errors": [r["error"] for r in recs if r["error"]][:3]}


def main(argv=None) -> int:
    args = parse_args(argv)
    policies = [p for p in args.policies.split(",") if p]
    # Each round runs every policy, in an order rotated by one per round, on fresh replicas: a
    # machine that slows down over minutes, or replicas that age, must not favour whoever runs first.
    runs = []
    for k in range(args.rounds):
        order = policies[k % len(policies):] + policies[: k % len(policies)]
        runs += [(p, False, k) for p in order]
    runs += [(args.kill_policy, True, 0)] if args.kill_policy else []
    work = make_workload(args)
    logdir = Path(tempfile.mkdtemp(prefix="caraserve-bench-router-"))
    cluster = Cluster(args, logdir)
    results = []
    try:
        for policy, kill, k in runs:
            cluster.stop()
            cluster.start_replicas()
            router_url, router = cluster.start_router(policy)
            label = f"{policy}+kill" if kill else policy
            print(f"[{label} round {k + 1}] {len(work)} requests at {args.rate}/s over {args.replicas} replicas",
                  file=sys.stderr)
            recs = asyncio.run(drive(router_url, work, (lambda: cluster.kill(0)) if kill else None))
            results.append({**summarize(label, recs, args.slo_ms / 1e3, retries(router_url)), "round": k + 1})
            router.terminate()
            router.wait(timeout=30)
    finally:
        cluster.stop()
    cols = ("run", "round", "completed", "errors", "retries", "slo_attainment", "per_token_mean_ms",
            "per_token_p99_ms", "e2e_p50_s", "e2e_p99_s")
    print(" | ".join(cols))
    for r in results:
        print(" | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    medians = {}
    for label in dict.fromkeys(r["run"] for r in results):
        mine = [r for r in results if r["run"] == label]
        medians[label] = {key: float(np.median([r[key] for r in mine])) for key in
                          ("slo_attainment", "per_token_mean_ms", "per_token_p99_ms")}
        medians[label]["completed"] = f"{sum(r['completed'] for r in mine)}/{sum(r['sent'] for r in mine)}"
    print(f"\nmedians over {args.rounds} round(s): policy | SLO attainment | mean ms/token | p99 ms/token")
    for label, m in medians.items():
        print(f"{label} | {m['slo_attainment']:.3f} | {m['per_token_mean_ms']:.1f} | {m['per_token_p99_ms']:.1f}"
              f" | completed {m['completed']}")
    header = {"device": "cpu", "cpu": cpu_name(), "platform": platform.platform(),
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "args": vars(args)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"header": header, "medians": medians, "runs": results}, indent=2) + "\n")
    print(f"wrote {args.out}; server logs in {logdir}", file=sys.stderr)
    lost = [r for r in results if r["errors"]]
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
