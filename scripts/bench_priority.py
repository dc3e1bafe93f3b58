"""Priority scheduling vs first come, first served, with a batch tenant saturating the engine.

    python scripts/bench_priority.py [--batch-requests 48] [--interactive 24] [--rate 4]
        [--max-batch-size 16] [--repeats 3] [--threads 1] [--out profiles/cpu/bench_priority.json]

Both systems run the embedded default (tiny model + demo adapters, CPU, float32) on the same
requests (seeded):
  batch        `--batch-requests` long generations (prompts 64-256 tokens, 128-256 output
               tokens), all queued at the start, priority 10: more than the batch holds
  interactive  `--interactive` short chat turns (prompts 32-128, 16-32 output tokens), each with
               a demo adapter or none, Poisson arrivals at `--rate` per second, priority 0
  fcfs         scheduler.policy=fcfs: the interactive turns queue behind the batch tenant
  priority     scheduler.policy=priority: they go first, preempting batch generations
Reports the interactive turns' TTFT and end-to-end latency (p50/p99 from each one's scheduled
arrival), the batch tenant's completion time, output tokens/s over the run and preemptions;
the ratios priority / fcfs; and whether every request's greedy tokens are the same in both.
Medians over repeats, which alternate the systems.
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

BATCH, INTERACTIVE = 10, 0  # the tenants' priorities (lower first)


def workload(args, vocab: int, adapters: list[str]):
    """[(arrival offset s, prompt ids, max_tokens, adapter or None, priority)], batch first."""
    rng = random.Random(args.seed)
    items = [(0.0, [rng.randrange(3, vocab) for _ in range(rng.randint(64, 256))], rng.randint(128, 256), None, BATCH)
             for _ in range(args.batch_requests)]
    t = args.start_s
    for _ in range(args.interactive):
        t += rng.expovariate(args.rate)
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(32, 128))]
        items.append((t, prompt, rng.randint(16, 32), rng.choice(adapters + [None]), INTERACTIVE))
    return items


def run(engine, items, by_priority: bool) -> dict:
    from caraserve.request import SamplingParams

    pending = sorted(items, key=lambda it: it[0])
    start = time.perf_counter()
    reqs = []  # (scheduled arrival, tenant priority, request)
    while pending or engine.has_unfinished():
        now = time.perf_counter() - start
        while pending and pending[0][0] <= now:
            t, prompt, max_tokens, adapter, prio = pending.pop(0)
            sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True,
                                priority=prio if by_priority else 0)
            rid = engine.add_request(prompt, sp, adapter, arrival_s=start + t)
            reqs.append((start + t, prio, engine.request(rid)))
        if not engine.has_unfinished():
            time.sleep(min(0.001, max(0.0, pending[0][0] - now)))
            continue
        engine.step()
    wall = time.perf_counter() - start
    turns = [(t, r) for t, p, r in reqs if p == INTERACTIVE]
    batch = [r for _, p, r in reqs if p == BATCH]
    ttft = [r.first_token_s - t for t, r in turns]
    e2e = [r.finish_s - t for t, r in turns]
    return {"interactive_ttft_p50_s": pct(ttft, 50), "interactive_ttft_p99_s": pct(ttft, 99),
            "interactive_e2e_p50_s": pct(e2e, 50), "interactive_e2e_p99_s": pct(e2e, 99),
            "batch_done_s": max(r.finish_s for r in batch) - start,
            "tokens_per_s": sum(len(r.output_ids) for *_, r in reqs) / wall, "wall_s": wall,
            "preemptions": engine.scheduler.num_preemptions,
            "tokens": [r.output_ids for *_, r in reqs]}  # (in arrival order, the same in both systems)


def main():
    from caraserve.profiling.cli_args import positive_int

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-requests", type=positive_int, default=48)
    ap.add_argument("--interactive", type=positive_int, default=24)
    ap.add_argument("--rate", type=float, default=4.0, help="interactive arrivals per second (Poisson)")
    ap.add_argument("--start-s", type=float, default=0.5, help="when the interactive turns begin")
    ap.add_argument("--max-batch-size", type=positive_int, default=16)
    ap.add_argument("--repeats", type=positive_int, default=3)
    ap.add_argument("--threads", type=positive_int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="profiles/cpu/bench_priority.json")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from caraserve.config import AdapterConfig, EngineConfig, SchedulerConfig
    from caraserve.engine import Engine
    from caraserve.profiling.machine import cpu_name

    def engine(policy: str) -> Engine:
        return Engine(EngineConfig(device="cpu", compile="false", max_batch_size=args.max_batch_size,
                                   max_seq_len=512, adapters=AdapterConfig(dir="demo", preload="all"),
                                   scheduler=SchedulerConfig(policy=policy)))

    systems = ("fcfs", "priority")
    results: dict[str, list[dict]] = {name: [] for name in systems}
    tokens: dict[str, list] = {}
    for rep in range(args.repeats):
        for name in (systems if rep % 2 == 0 else reversed(systems)):
            eng = engine(name)
            items = workload(args, eng.model.args.vocab_size, sorted(i.name for i in eng.adapters()))
            res = run(eng, items, name == "priority")
            tokens.setdefault(name, res.pop("tokens"))
            results[name].append(res)
            print(f"repeat {rep + 1} {name}: " + ", ".join(f"{k} {v:.3g}" for k, v in res.items()), flush=True)
    same = sum(a == b for a, b in zip(tokens["fcfs"], tokens["priority"]))
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in results.items()}
    keys = ("interactive_ttft_p50_s", "interactive_ttft_p99_s", "interactive_e2e_p50_s", "interactive_e2e_p99_s",
            "batch_done_s", "tokens_per_s")
    ratio = {k: med["priority"][k] / med["fcfs"][k] for k in keys}
    print(f"\n{'system':<9} {'TTFT p50':>9} {'TTFT p99':>9} {'e2e p50':>8} {'e2e p99':>8} {'batch done':>11} "
          f"{'tok/s':>7} {'preempt':>8}   (TTFT, e2e: interactive turns)")
    for name, m in med.items():
        print(f"{name:<9} {m['interactive_ttft_p50_s']:>8.3f}s {m['interactive_ttft_p99_s']:>8.3f}s "
              f"{m['interactive_e2e_p50_s']:>7.2f}s {m['interactive_e2e_p99_s']:>7.2f}s {m['batch_done_s']:>10.2f}s "
              f"{m['tokens_per_s']:>7.0f} {m['preemptions']:>8.0f}")
    print("priority / fcfs: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items()))
    print(f"same greedy tokens in both: {same}/{len(tokens['fcfs'])}")
    out = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": os.uname().nodename,
           "cpu": cpu_name(), "threads": args.threads, "args": vars(args), "median": med,
           "ratio_priority_over_fcfs": ratio, "same_tokens": f"{same}/{len(tokens['fcfs'])}", "runs": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
