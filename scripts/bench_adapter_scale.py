"""Adapters per replica: the server with N generated adapters, from start-up to a Zipf workload.

    python scripts/bench_adapter_scale.py [--sizes 4,1000,5000] [--budget-size 1000 --budget-frac 0.1]
        [--requests 300] [--clients 6] [--output-tokens 32] [--rounds 1] [--workdir DIR] [--out PATH]
    python scripts/bench_adapter_scale.py --startup-only [--sizes 4,5000] [--repeat 3]

For every N it writes N random PEFT adapters for the embedded tiny model (ranks 8/16/32/64 in
equal shares, seeded, q/k/v/o or all seven modules; written once into --workdir and reused),
starts `python -m caraserve.serve adapters.dir=<those>` on a free loopback port and measures:
  start-up   process start -> first 200 from /health
  RSS        the server's VmRSS after start-up and its peak (VmHWM) at the end
  /v1/models the median of 5 full listings
  workload   --requests streamed completions from --clients concurrent clients, models drawn
             Zipf-like over all N adapters (scripts/bench_serve.py's driver and summary), after a
             warm-up of 2 x --clients requests to the base model (no adapter is read early)
The last run repeats --budget-size with `adapters.host_mem_bytes` at --budget-frac of those
adapters' bytes (the unbounded run of that size is its peer). The targets are ratios within this
run (N=5000 vs N=4, bounded vs unbounded). With --rounds K every configuration runs K times, in
alternating order, and the table holds each figure's median (every round's figures and ratios
are kept too). A table goes to stdout, everything to --out with a provenance header.
--startup-only starts and stops each server --repeat times, measuring start-up alone (the median
counts; no listing, no workload, no bounded run) and writes --out only when it is given.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import bench_serve
import httpx

ROOT = Path(__file__).resolve().parents[1]
RANKS = (8, 16, 32, 64)
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL = ATTN + ["gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="4,1000,5000", help="adapter counts to run")
    p.add_argument("--budget-size", type=int, default=1000, help="N of the bounded host-tier run (0 = skip it)")
    p.add_argument("--budget-frac", type=float, default=0.1, help="host budget as a share of those adapters' bytes")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--clients", type=int, default=6, help="requests in flight at once")
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="", help="where generated adapters live (default: a folder under "
                                                 "$CARASERVE_CACHE, reused across runs)")
    p.add_argument("--start-timeout-s", type=float, default=600.0)
    p.add_argument("--server-arg", action="append", default=[],
                   help="an extra override for every server, e.g. adapters.device_slots=8 (repeatable)")
    p.add_argument("--startup-only", action="store_true", help="measure start-up alone (see above)")
    p.add_argument("--repeat", type=int, default=3, help="start-ups per size with --startup-only")
    p.add_argument("--rounds", type=int, default=1,
                   help="full runs: every configuration this many times, in alternating order; medians reported")
    p.add_argument("--out", default=None, help="default: profiles/cpu/bench_adapter_scale.json (full runs only)")
    args = p.parse_args(argv)
    args.sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    if not args.sizes or min(args.sizes) < 1 or args.requests < 1 or args.clients < 1:
        p.error("--sizes must be positive counts; --requests and --clients >= 1")
    if args.repeat < 1 or args.rounds < 1:
        p.error("--repeat and --rounds must be at least 1")
    if args.out is None and not args.startup_only:
        args.out = "profiles/cpu/bench_adapter_scale.json"
    if not 0 < args.budget_frac <= 1:
        p.error("--budget-frac must be in (0, 1]")
    return args


def adapters_dir(args, n: int) -> Path:
    """N seeded adapters (reused when a complete set is already there); their folder."""
    from caraserve.model.tiny import cache_root, write_random_adapter

    base = Path(args.workdir) if args.workdir else cache_root() / "bench-adapters"
    folder = base / f"n{n}-seed{args.seed}"
    done = folder / ".complete"
    if done.exists():
        return folder
    rng = random.Random(args.seed)
    for i in range(n):
        rank = RANKS[i % len(RANKS)]
        write_random_adapter(folder / f"tenant-{i:05d}", rank, 2 * rank, rng.choice([ATTN, ALL]),
                             seed=args.seed * 100_003 + i)
    done.write_text(str(n))
    return folder


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("adapter_model.safetensors"))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_kb(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def start_server(args, folder: Path, budget: int, log_path: Path) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    cmd = [sys.executable, "-m", "caraserve.serve", f"server.port={port}", f"adapters.dir={folder}",
           f"adapters.host_mem_bytes={budget}", "engine.compile=false", "server.log_level=warning",
           "server.max_queue=1024", *args.server_arg]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    while time.perf_counter() - t0 < args.start_timeout_s:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url, time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"server did not start within {args.start_timeout_s} s")


def models_latency_s(url: str) -> float:
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        httpx.get(url + "/v1/models", timeout=60).raise_for_status()
        times.append(time.perf_counter() - t0)
    return sorted(times)[2]


def one_config(args, n: int, budget: int, tmp: Path) -> dict:
    folder = adapters_dir(args, n)
    names = sorted(p.name for p in folder.iterdir() if p.is_dir())
    proc, url, startup_s = start_server(args, folder, budget, tmp / f"server-{n}-{budget}.log")
    try:
        rss_start = proc_kb(proc.pid, "VmRSS")
        listing_s = models_latency_s(url)
        common = ["--url", url, "--rate", "0", "--prompt-tokens", str(args.prompt_tokens), "--output-tokens",
                  str(args.output_tokens), "--concurrency-limit", str(args.clients), "--seed", str(args.seed)]
        # warm-up on the base model only: first-step costs measured nowhere, no adapter read early
        asyncio.run(bench_serve.run(bench_serve.parse_args(common + ["--requests", str(2 * args.clients),
                                                                     "--adapters", "tiny"])))
        order = random.Random(args.seed + 1).sample(names, len(names))  # Zipf ranks over a shuffled list
        bench = bench_serve.parse_args([
            "--url", url, "--rate", "0", "--requests", str(args.requests), "--adapters", ",".join(order),
            "--popularity", "zipf", "--prompt-tokens", str(args.prompt_tokens), "--output-tokens",
            str(args.output_tokens), "--concurrency-limit", str(args.clients), "--seed", str(args.seed)])
        records, wall, *_ = asyncio.run(bench_serve.run(bench))
        for r in records:
            r["max_tokens"] = args.output_tokens
        summary = bench_serve.summarize(records, wall, bench.slo_ms)
        rss_peak = proc_kb(proc.pid, "VmHWM")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {"adapters": n, "adapter_bytes": folder_bytes(folder), "host_mem_bytes": budget,
            "startup_s": startup_s, "rss_start_kb": rss_start, "rss_peak_kb": rss_peak,
            "models_list_s": listing_s, "tokens_per_s": summary["output_tokens_per_s"],
            "ttft_p50_s": summary["ttft_s"]["p50"], "ttft_p99_s": summary["ttft_s"]["p99"],
            "errors": summary["errors"], "summary": summary}


def startup_only(args, tmp: Path) -> tuple[list[dict], dict]:
    """Each size's server started and stopped --repeat times: its start-up seconds and RSS."""
    runs = []
    for n in args.sizes:
        folder, times, rss = adapters_dir(args, n), [], []
        for k in range(args.repeat):
            proc, _, startup_s = start_server(args, folder, 0, tmp / f"server-{n}-{k}.log")
            rss.append(proc_kb(proc.pid, "VmRSS"))
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            times.append(startup_s)
        runs.append({"adapters": n, "startup_s": sorted(times)[len(times) // 2], "startup_runs_s": times,
                     "rss_start_kb": max(rss)})
        print(f"{n:>9} adapters: start-up {runs[-1]['startup_s']:.2f} s (runs {', '.join(f'{t:.2f}' for t in times)}), "
              f"RSS {runs[-1]['rss_start_kb'] / 1024:.0f} MB")
    first, largest = runs[0], max(runs, key=lambda r: r["adapters"])
    ratios = {f"startup_{largest['adapters']}_vs_{first['adapters']}": largest["startup_s"] / first["startup_s"]}
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    return runs, ratios


MEDIAN_KEYS = ("startup_s", "rss_start_kb", "rss_peak_kb", "models_list_s", "tokens_per_s", "ttft_p50_s",
               "ttft_p99_s")


def median_run(runs: list[dict]) -> dict:
    """One configuration's rounds as one row: the median of each figure, errors summed, the
    rounds kept."""
    if len(runs) == 1:
        return runs[0]
    row = {k: v for k, v in runs[0].items() if k != "summary"}
    for k in MEDIAN_KEYS:
        row[k] = statistics.median(r[k] for r in runs)
    row["errors"] = sum(r["errors"] for r in runs)
    row["rounds"] = runs
    return row


def report_quiet(runs: list[dict]) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        return report(runs)


def report(runs: list[dict]) -> dict:
    def ratio(a, b):
        return a / b if a is not None and b else None

    first, bounded = runs[0], next((r for r in runs if r["host_mem_bytes"] > 0), None)
    largest = max((r for r in runs if r["host_mem_bytes"] <= 0), key=lambda r: r["adapters"])
    peer = next((r for r in runs if r["host_mem_bytes"] <= 0 and bounded and r["adapters"] == bounded["adapters"]),
                None)
    print(f"{'adapters':>9} {'host budget':>12} {'start s':>8} {'RSS MB':>7} {'peak MB':>8} {'models ms':>10} "
          f"{'tok/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} {'p99/p50':>8} {'errors':>6}")
    for r in runs:
        budget = f"{r['host_mem_bytes'] / 2**20:.0f} MB" if r["host_mem_bytes"] > 0 else "unbounded"
        print(f"{r['adapters']:>9} {budget:>12} {r['startup_s']:>8.1f} {r['rss_start_kb'] / 1024:>7.0f} "
              f"{r['rss_peak_kb'] / 1024:>8.0f} {r['models_list_s'] * 1e3:>10.1f} {r['tokens_per_s']:>7.0f} "
              f"{r['ttft_p50_s'] * 1e3:>9.1f} {r['ttft_p99_s'] * 1e3:>9.1f} "
              f"{r['ttft_p99_s'] / r['ttft_p50_s']:>8.2f} {r['errors']:>6}")
    ratios = {
        f"startup_{largest['adapters']}_vs_{first['adapters']}": ratio(largest["startup_s"], first["startup_s"]),
        f"rss_{largest['adapters']}_vs_{first['adapters']}": ratio(largest["rss_peak_kb"], first["rss_peak_kb"]),
        f"tokens_{largest['adapters']}_vs_{first['adapters']}": ratio(largest["tokens_per_s"], first["tokens_per_s"]),
    }
    if bounded and peer:
        ratios[f"tokens_bounded_vs_unbounded_{bounded['adapters']}"] = ratio(bounded["tokens_per_s"],
                                                                            peer["tokens_per_s"])
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}" if v is not None else f"{k}: -")
    return ratios


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.startup_only:
            runs, ratios = startup_only(args, Path(tmp))
        else:
            configs = [(n, 0) for n in args.sizes]
            if args.budget_size:
                budget = max(1, int(folder_bytes(adapters_dir(args, args.budget_size)) * args.budget_frac))
                configs.append((args.budget_size, budget))
            rounds = []
            for r in range(args.rounds):  # alternating order: a drifting machine weighs on every configuration
                order = configs if r % 2 == 0 else configs[::-1]
                done = {cfg: one_config(args, *cfg, Path(tmp)) for cfg in order}
                rounds.append([done[cfg] for cfg in configs])
            runs = [median_run([rnd[i] for rnd in rounds]) for i in range(len(configs))]
            ratios = report(runs)
            if args.rounds > 1:
                ratios["per_round"] = [report_quiet(rnd) for rnd in rounds]
                print("per round:", ", ".join(f"{k} " + "/".join(f"{r[k]:.2f}" for r in ratios["per_round"])
                                              for k in ratios["per_round"][0]))
    if args.out is None:  # --startup-only without --out
        return 0
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    header = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "commit": commit,
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "platform": platform.platform(),
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "args": vars(args)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"header": header, "ratios": ratios, "runs": runs}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
