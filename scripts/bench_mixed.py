"""Mixed prefill + decode steps vs prefill-first, while long prompts arrive among running decodes.

    python scripts/bench_mixed.py [--running 16] [--long 4] [--long-tokens 2000] [--every-s 1.0]
        [--budget 64] [--repeats 1] [--threads 1] [--out profiles/cpu/bench_mixed.json]

The embedded default model (CPU, float32) with its demo adapters. `--running` requests (prompts
of 32-64 tokens, 256 output tokens, adapters mixed) start together; from 0.5 s on, a prompt of
`--long-tokens` tokens arrives every `--every-s` seconds (`--long` of them, 16 output tokens
each). Both systems use engine.max_tokens_per_step=`--budget`:
  mixed          scheduler.mixed_steps=true: each step carries every running request's next
                 token and a chunk of the long prompt with the rest of the budget
  prefill-first  scheduler.mixed_steps=false: prefill chunks go first, decode waits for them
Reports, for the running requests, the inter-token latency (time between a request's
consecutive tokens) p50/p99 and their ratio, and each request's mean TPOT p50/p99; the long
prompts' TTFT p50; output tokens/s over the run.
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


def run(engine, args, vocab: int, adapters: list[str]) -> dict:
    from caraserve.request import SamplingParams

    rng = random.Random(args.seed)
    running = [([rng.randrange(3, vocab) for _ in range(rng.randint(32, 64))], rng.choice(adapters + [None]))
               for _ in range(args.running)]
    longs = [[rng.randrange(3, vocab) for _ in range(args.long_tokens)] for _ in range(args.long)]
    start = time.perf_counter()
    ids = {engine.add_request(p, SamplingParams(max_tokens=256, temperature=0, ignore_eos=True), a): "running"
           for p, a in running}
    long_due = [0.5 + i * args.every_s for i in range(args.long)]
    added_at: dict[str, float] = {}
    last: dict[str, float] = {}
    itl, ttft_long, tokens = [], [], 0
    tpot: dict[str, list[float]] = {}
    while long_due or engine.has_unfinished():
        now = time.perf_counter() - start
        while long_due and long_due[0] <= now:
            long_due.pop(0)
            prompt = longs[sum(1 for v in ids.values() if v == "long")]
            rid = engine.add_request(prompt, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
            ids[rid] = "long"
            added_at[rid] = time.perf_counter()
        if not engine.has_unfinished():
            time.sleep(0.001)
            continue
        outs = engine.step()
        t = time.perf_counter()
        for out in outs:
            if not out.new_token_ids:
                continue
            tokens += len(out.new_token_ids)
            kind = ids[out.request_id]
            if kind == "long" and out.request_id not in last:
                ttft_long.append(t - added_at[out.request_id])
            if kind == "running" and out.request_id in last:
                itl.append(t - last[out.request_id])
                tpot.setdefault(out.request_id, []).append(t - last[out.request_id])
            last[out.request_id] = t
    wall = time.perf_counter() - start
    means = [statistics.mean(v) for v in tpot.values()]
    return {"itl_p50_s": pct(itl, 50), "itl_p99_s": pct(itl, 99), "itl_p99_over_p50": pct(itl, 99) / pct(itl, 50),
            "tpot_mean_p50_s": pct(means, 50), "tpot_mean_p99_s": pct(means, 99),
            "long_ttft_p50_s": pct(ttft_long, 50), "tokens_per_s": tokens / wall, "wall_s": wall}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--running", type=int, default=16)
    ap.add_argument("--long", type=int, default=4)
    ap.add_argument("--long-tokens", type=int, default=2000)
    ap.add_argument("--every-s", type=float, default=1.0)
    ap.add_argument("--budget", type=int, default=64, help="engine.max_tokens_per_step")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="profiles/cpu/bench_mixed.json")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from caraserve.config import AdapterConfig, EngineConfig, SchedulerConfig
    from caraserve.engine import Engine
    from caraserve.profiling.machine import cpu_name

    def engine(mixed: bool) -> Engine:
        return Engine(EngineConfig(device="cpu", compile="false", max_tokens_per_step=args.budget,
                                   scheduler=SchedulerConfig(mixed_steps=mixed),
                                   adapters=AdapterConfig(dir="demo", preload="all")))

    systems = {"mixed": True, "prefill-first": False}
    results: dict[str, list[dict]] = {n: [] for n in systems}
    for rep in range(args.repeats):
        for name in (list(systems) if rep % 2 == 0 else list(reversed(systems))):
            eng = engine(systems[name])
            results[name].append(run(eng, args, eng.model.args.vocab_size, sorted(a.name for a in eng.adapters())))
            line = ", ".join(f"{k} {v:.3g}" for k, v in results[name][-1].items())
            print(f"repeat {rep + 1} {name}: {line}", flush=True)
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in results.items()}
    head = f"{'ITL p50':>8} {'ITL p99':>8} {'p99/p50':>8} {'TPOT p99':>9} {'long TTFT':>10} {'tok/s':>7}"
    print(f"\n{'system':<14} {head}")
    for n, m in med.items():
        print(f"{n:<14} {m['itl_p50_s'] * 1e3:>6.1f}ms {m['itl_p99_s'] * 1e3:>6.1f}ms {m['itl_p99_over_p50']:>8.2f} "
              f"{m['tpot_mean_p99_s'] * 1e3:>7.1f}ms {m['long_ttft_p50_s']:>9.2f}s {m['tokens_per_s']:>7.0f}")
    out = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": os.uname().nodename,
           "cpu": cpu_name(), "threads": args.threads, "args": vars(args), "median": med, "runs": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
