"""A server's resident memory over prompts of ever new lengths, with the engine thread trimming the
C heap (server.heap_trim_s, the default) and without (heap_trim_s=0), in alternating rounds.

Each round starts `python -m caraserve.serve` on the embedded default (base model, eager steps),
sends passes of sequential one-token completions whose prompt lengths no earlier pass used, and
reads the server's RSS right after each pass and again after an idle moment. Prints a table and
writes JSON (default profiles/cpu/bench_server_memory.json).

    OMP_NUM_THREADS=1 python scripts/bench_server_memory.py --rounds 2
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from caraserve.profiling.machine import cpu_header, write_json  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def one_round(trim_s: float, passes: list[list[int]], idle_s: float, seed: int) -> dict:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "caraserve.serve", f"server.port={port}", "engine.compile=false",
                             f"server.heap_trim_s={trim_s}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise RuntimeError("the server did not start")
        time.sleep(idle_s)
        rng, out = random.Random(seed), {"start_mb": rss_mb(proc.pid), "passes": []}
        with httpx.Client(timeout=120) as client:
            for lengths in passes:
                t0 = time.perf_counter()
                for n in lengths:
                    r = client.post(url + "/v1/completions", json={"prompt": [rng.randint(10, 7990) for _ in range(n)],
                                                                   "max_tokens": 1})
                    r.raise_for_status()
                busy, seconds = rss_mb(proc.pid), time.perf_counter() - t0
                time.sleep(idle_s)
                out["passes"].append({"prompts": len(lengths), "seconds": seconds, "busy_mb": busy,
                                      "idle_mb": rss_mb(proc.pid)})
        return out
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2, help="rounds of each setting, alternating")
    ap.add_argument("--passes", type=int, default=3, help="passes of new prompt lengths per round")
    ap.add_argument("--idle-s", type=float, default=2.5, help="idle time before each idle reading")
    ap.add_argument("--out", default="profiles/cpu/bench_server_memory.json")
    args = ap.parse_args()
    passes = [list(range(5 + k, 1000, 7)) for k in range(args.passes)]  # each pass: lengths no earlier one used
    settings = {"heap_trim_s=10 (default)": 10.0, "heap_trim_s=0 (never)": 0.0}
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    for r in range(args.rounds):
        for name, trim_s in (settings.items() if r % 2 == 0 else reversed(settings.items())):
            runs[name].append(one_round(trim_s, passes, args.idle_s, seed=r))
    print(f"{'setting':<26} {'start MB':>9} " + " ".join(f"{f'pass {i + 1} busy/idle MB':>24}"
                                                      for i in range(args.passes)))
    summary = {}
    for name, rounds in runs.items():
        start = statistics.median(r["start_mb"] for r in rounds)
        cells = [(statistics.median(r["passes"][i]["busy_mb"] for r in rounds),
                  statistics.median(r["passes"][i]["idle_mb"] for r in rounds)) for i in range(args.passes)]
        summary[name] = {"start_mb": start, "busy_mb": [b for b, _ in cells], "idle_mb": [i for _, i in cells]}
        print(f"{name:<26} {start:>9.0f} " + " ".join(f"{f'{b:.0f} / {i:.0f}':>24}" for b, i in cells))
    trim, never = summary["heap_trim_s=10 (default)"], summary["heap_trim_s=0 (never)"]
    ratio = (trim["idle_mb"][-1] - trim["start_mb"]) / max(1.0, never["idle_mb"][-1] - never["start_mb"])
    print(f"growth over start-up once idle, trimming vs never: {ratio:.2f}x")
    workload = {"passes": args.passes, "prompts_per_pass": [len(p) for p in passes], "idle_s": args.idle_s,
                "rounds": args.rounds, "command": " ".join(sys.argv)}
    write_json(args.out, {"header": cpu_header(model="embedded tiny", dtype="float32"), "workload": workload,
                          "summary": summary, "runs": runs, "ratios": {"growth once idle, trimming vs never": ratio}})


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
