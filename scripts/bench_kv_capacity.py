"""Paged KV vs one max-length slot per request, at the same KV memory, on a chat-like workload.

    python scripts/bench_kv_capacity.py [--requests 256] [--rate 40] [--budget-requests 32]
        [--max-seq-len 2048] [--block-size 16] [--repeats 1] [--threads 1]
        [--out profiles/cpu/bench_kv_capacity.json]

Both systems run the embedded default (tiny model + demo adapters, CPU, float32) with the same KV
memory budget, the bytes of `--budget-requests` slots of `--max-seq-len` tokens (32 x 2048, the
old default):
  paged     engine.kv_block_size=16: blocks taken as tokens arrive
  one-slot  engine.kv_block_size=max_seq_len: each request takes one whole max-length block,
            which is the old one-slot-per-request cache
Both with max_batch_size large enough that memory, not the batch limit, caps concurrency.
Workload (seeded): prompts of 64-512 random tokens, 32-256 output tokens (ignore_eos), each
request with a demo adapter or none, Poisson arrivals at `--rate` per second (faster than the
engine drains, so a queue builds). Reports requests in flight (time-weighted mean over steps),
output tokens/s over the run, TTFT p50/p99 from each request's scheduled arrival, and
preemptions; the ratios paged / one-slot. Medians over repeats, which alternate the systems.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

from caraserve.profiling.timing import pct

MAX_PROMPT, MAX_OUTPUT = 512, 256  # the workload's longest prompt and output, in tokens


def workload(n: int, rate: float, seed: int, vocab: int, adapters: list[str]):
    """[(arrival offset s, prompt ids, max_tokens, adapter or None)]"""
    rng = random.Random(seed)
    t, items = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(64, MAX_PROMPT))]
        adapter = rng.choice(adapters + [None])
        items.append((t, prompt, rng.randint(32, MAX_OUTPUT), adapter))
    return items


def run(engine, items) -> dict:
    from caraserve.request import SamplingParams

    pending = list(items)
    start = time.perf_counter()
    reqs = []  # (scheduled arrival, request)
    in_flight_time = busy = 0.0
    while pending or engine.has_unfinished():
        now = time.perf_counter() - start
        while pending and pending[0][0] <= now:
            t, prompt, max_tokens, adapter = pending.pop(0)
            rid = engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                                     adapter)
            reqs.append((start + t, engine.request(rid)))
        if not engine.has_unfinished():
            time.sleep(min(0.001, max(0.0, pending[0][0] - now)))
            continue
        running = len(engine.scheduler.running)
        t0 = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t0
        in_flight_time += dt * max(running, len(engine.scheduler.running))
        busy += dt
    wall = time.perf_counter() - start
    tokens = sum(len(r.output_ids) for _, r in reqs)
    ttft = [r.first_token_s - t for t, r in reqs]
    return {"in_flight_mean": in_flight_time / busy, "tokens_per_s": tokens / wall, "ttft_p50_s": pct(ttft, 50),
            "ttft_p99_s": pct(ttft, 99), "wall_s": wall, "output_tokens": tokens,
            "preemptions": engine.scheduler.num_preemptions}


def main():
    from caraserve.profiling.cli_args import positive_int

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=positive_int, default=256)
    ap.add_argument("--rate", type=float, default=40.0, help="Poisson arrivals per second")
    ap.add_argument("--budget-requests", type=positive_int, default=32)
    ap.add_argument("--max-seq-len", type=positive_int, default=2048)
    ap.add_argument("--block-size", type=positive_int, default=16)
    ap.add_argument("--max-batch-size", type=positive_int, default=256)
    ap.add_argument("--repeats", type=positive_int, default=1)
    ap.add_argument("--threads", type=positive_int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="profiles/cpu/bench_kv_capacity.json")
    args = ap.parse_args()
    if args.max_seq_len < MAX_PROMPT + MAX_OUTPUT:
        ap.error(f"--max-seq-len {args.max_seq_len} cannot hold the workload's longest request "
                 f"({MAX_PROMPT} + {MAX_OUTPUT} tokens)")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from caraserve.config import AdapterConfig, EngineConfig
    from caraserve.engine import Engine
    from caraserve.kv_cache import block_bytes
    from caraserve.profiling.machine import cpu_name

    def engine(block_size: int) -> Engine:
        probe = Engine(EngineConfig(device="cpu", compile="false", max_batch_size=1, max_seq_len=64))
        a = probe.model.args
        per_token = block_bytes(1, a.num_kv_heads, a.head_dim, probe.dtype, a.num_layers)
        budget = args.budget_requests * args.max_seq_len * per_token
        return Engine(EngineConfig(device="cpu", compile="false", max_batch_size=args.max_batch_size,
                                   max_seq_len=args.max_seq_len, kv_block_size=block_size, kv_cache_bytes=budget,
                                   adapters=AdapterConfig(dir="demo", preload="all")))

    systems = {"paged": args.block_size, "one-slot": args.max_seq_len}
    results: dict[str, list[dict]] = {name: [] for name in systems}
    meta = {}
    for rep in range(args.repeats):
        order = list(systems) if rep % 2 == 0 else list(reversed(systems))
        for name in order:
            eng = engine(systems[name])
            meta[name] = {"kv_blocks": eng.kv.num_blocks, "kv_block_size": eng.kv.block_size, "kv_bytes": eng.kv.bytes}
            items = workload(args.requests, args.rate, args.seed, eng.model.args.vocab_size,
                             sorted(i.name for i in eng.adapters()))
            results[name].append(run(eng, items))
            print(f"repeat {rep + 1} {name}: " + ", ".join(f"{k} {v:.3g}" for k, v in results[name][-1].items()),
                  flush=True)
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in results.items()}
    ratio = {k: med["paged"][k] / med["one-slot"][k] for k in ("in_flight_mean", "tokens_per_s", "ttft_p50_s",
                                                                "ttft_p99_s")}
    print(f"\n{'system':<10} {'in flight':>10} {'tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'preempt':>8}")
    for name, m in med.items():
        print(f"{name:<10} {m['in_flight_mean']:>10.1f} {m['tokens_per_s']:>9.0f} {m['ttft_p50_s']:>8.2f}s "
              f"{m['ttft_p99_s']:>8.2f}s {m['preemptions']:>8.0f}")
    print(f"paged / one-slot: in flight {ratio['in_flight_mean']:.2f}x, throughput {ratio['tokens_per_s']:.2f}x, "
          f"TTFT p50 {ratio['ttft_p50_s']:.2f}x, p99 {ratio['ttft_p99_s']:.2f}x")
    out = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": os.uname().nodename,
           "cpu": cpu_name(), "threads": args.threads, "args": vars(args), "kv": meta, "median": med,
           "ratio_paged_over_one_slot": ratio, "runs": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
