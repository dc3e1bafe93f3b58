"""The CPU LoRA sweep behind scripts/profile_cpu_lora.py: time of the CPU delta per
(tokens, rank, threads), and the plan that picks, per (tokens, rank), the fewest threads whose
time fits the budget (the device time of the projection it hides behind)."""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import torch

from caraserve.cpu_assist.worker import lora_delta
from caraserve.profiling.machine import cpu_name


def _median_s(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sweep(hidden: int, tokens: list[int], ranks: list[int], threads: list[int], repeats: int,
          budget_s: float | None, progress=None) -> dict:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(hidden, hidden, generator=g) / hidden**0.5
    rows, plan = [], []
    pools = {k: ThreadPoolExecutor(max_workers=k) for k in threads}
    try:
        for n in tokens:
            x = torch.randn(n, hidden, generator=g)
            base_s = _median_s(lambda: torch.nn.functional.linear(x, w), repeats)
            budget = budget_s if budget_s is not None else base_s
            plan_row = []
            for r in ranks:
                a = torch.randn(hidden, r, generator=g) / hidden**0.5
                b = torch.randn(r, hidden, generator=g)
                best = None
                for k in threads:
                    step = -(-n // k)

                    def run():
                        futs = [pools[k].submit(lora_delta, x[o : o + step], a, b, 1.0) for o in range(0, n, step)]
                        for f in futs:
                            f.result()

                    t = _median_s(run, repeats)
                    gflops = 2 * n * r * 2 * hidden / t / 1e9
                    rows.append({"tokens": n, "rank": r, "threads": k, "seconds": t, "gflops": gflops,
                                 "base_projection_s": base_s})
                    if best is None and t <= budget:
                        best = k
                    if progress is not None:
                        progress.update(1)
                plan_row.append(best if best is not None else max(threads))
            plan.append(plan_row)
    finally:
        for p in pools.values():
            p.shutdown()
    fewest = min(threads)  # one thread's rate, from the runs on the fewest threads measured
    per_thread = [row["gflops"] / fewest for row in rows if row["threads"] == fewest]
    return {
        "header": {"device": "cpu", "cpu": cpu_name(), "torch": torch.__version__,
                   "model": f"a {hidden} x {hidden} projection", "dtype": "float32",
                   "intra_op_threads": torch.get_num_threads(), "hidden": hidden,
                   "created": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        "plan": {"gflops_per_thread": statistics.median(per_thread), "tokens": tokens, "ranks": ranks, "threads": plan,
                 "budget": "base projection time" if budget_s is None else f"{budget_s * 1e3:.3f} ms"},
        "measurements": rows,
    }
