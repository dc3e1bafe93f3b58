"""Profile CPU LoRA throughput and write the thread plan CPU-assisted prefill uses.

    python scripts/profile_cpu_lora.py [--hidden 4096] [--tokens 16,64,256,1024] [--ranks 8,16,32,64]
        [--threads 1,2] [--budget-ms MS] [--repeats 5] [--out PATH]

Sweeps tokens x rank x threads, timing scale * (x A) B for one hidden x hidden projection on
CPU worker threads (each thread a slice of the tokens, as the hand-off splits them). Per
(tokens, rank) the plan keeps the fewest threads whose time fits the budget: `--budget-ms`, or
by default the time of the base projection itself (what the CPU work hides behind on a device
of this machine's speed; on a GPU host give the measured per-layer GPU time). Writes JSON with
provenance and, when matplotlib is installed, a PNG beside it. Point the engine at it with
`cpu_assist.plan_file=...`; the default --out, the project's profiles/cpu_lora_plan.json, is
picked up by the engine from any working directory.
Run it with OMP_NUM_THREADS=1 so each worker is one core.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from tqdm import tqdm

from caraserve.cpu_assist.thread_plan import DEFAULT_PLAN
from caraserve.lora.host_memory import usable_memory_bytes
from caraserve.profiling.cli_args import output_file, positive_int, positive_ints
from caraserve.profiling.cpu_lora import sweep

log = logging.getLogger("profile_cpu_lora")


def plot(result: dict, png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    rows = result["measurements"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in result["plan"]["ranks"]:
        for k in sorted({row["threads"] for row in rows}):
            pts = [(row["tokens"], row["seconds"] * 1e3) for row in rows if row["rank"] == r and row["threads"] == k]
            ax.plot(*zip(*pts), marker="o", label=f"rank {r}, {k} thread(s)")
    base = sorted({(row["tokens"], row["base_projection_s"] * 1e3) for row in rows})
    ax.plot(*zip(*base), "k--", label="base projection (budget)")
    ax.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="ms per projection",
           title=f"CPU LoRA delta, hidden {result['header']['hidden']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=positive_int, default=4096)
    ap.add_argument("--tokens", type=positive_ints, default="16,64,256,1024")
    ap.add_argument("--ranks", type=positive_ints, default="8,16,32,64")
    ap.add_argument("--threads", type=positive_ints, default="1,2")
    ap.add_argument("--budget-ms", type=float, default=None)
    ap.add_argument("--repeats", type=positive_int, default=5)
    ap.add_argument("--out", type=output_file, default=str(DEFAULT_PLAN))
    args = ap.parse_args()
    if args.budget_ms is not None and not 0 < args.budget_ms < math.inf:
        ap.error(f"argument --budget-ms: {args.budget_ms} must be a number of milliseconds > 0")
    tokens, ranks, threads = sorted(set(args.tokens)), sorted(set(args.ranks)), sorted(set(args.threads))
    need = 4 * args.hidden * (args.hidden + 2 * max(ranks) + 2 * max(tokens))  # weights, adapter, x and y
    if need > usable_memory_bytes():
        ap.error(f"argument --hidden: {args.hidden} needs {need / 2**30:.1f} GiB, more than this process may use")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tqdm(total=len(tokens) * len(ranks) * len(threads), desc="cpu lora sweep", file=sys.stderr) as bar:
        result = sweep(args.hidden, tokens, ranks, threads, args.repeats,
                       None if args.budget_ms is None else args.budget_ms / 1e3, bar)
    out = args.out
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    plan = result["plan"]
    print(f"GFLOP/s per thread (median): {plan['gflops_per_thread']:.1f}")
    print("threads per (tokens, rank):   " + " ".join(f"r{r:<4d}" for r in ranks))
    for n, row in zip(tokens, plan["threads"]):
        print(f"  {n:6d} tokens              " + " ".join(f"{k:<5d}" for k in row))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
