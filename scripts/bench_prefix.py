"""Prefix caching on vs off on a multi-turn chat workload of several tenants, one run of each.

    python scripts/bench_prefix.py [--tenants 8] [--conversations 2] [--turns 6] [--system-tokens 600]
        [--rate 2] [--think-s 0.5] [--repeats 1] [--threads 1] [--out profiles/cpu/bench_prefix.json]

The embedded default model (CPU, float32). Each tenant has its own adapter (generated, seeded,
ranks 8-64) and a system prompt of `--system-tokens` tokens; each of its conversations is
`--turns` turns, each turn resending the system prompt, the history so far (user messages and
the replies generated) and a new user message of 20-60 tokens, for 32-64 output tokens.
Conversations start as Poisson arrivals at `--rate` per second; a turn follows the previous
one's reply after an exponential think time of mean `--think-s`. Both systems get the same
conversations. Reports TTFT p50/p99 (from each turn's due time), output tokens/s over the run,
the prefix-cache hit rate (prompt tokens found cached / looked up), and the ratios on / off.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import random
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from caraserve.profiling.timing import pct


def conversations(args, vocab: int):
    """[(start offset s, tenant, [(user message, max_tokens) per turn])], seeded."""
    rng = random.Random(args.seed)
    systems = [[rng.randrange(3, vocab) for _ in range(args.system_tokens)] for _ in range(args.tenants)]
    convs, t = [], 0.0
    for _ in range(args.tenants * args.conversations):
        t += rng.expovariate(args.rate)
        tenant = rng.randrange(args.tenants)
        turns = [([rng.randrange(3, vocab) for _ in range(rng.randint(20, 60))], rng.randint(32, 64))
                 for _ in range(args.turns)]
        convs.append((t, tenant, turns))
    thinks = [rng.expovariate(1 / args.think_s) for _ in range(len(convs) * args.turns)]
    return systems, convs, thinks


def run(engine, systems, convs, thinks, adapters) -> dict:
    from caraserve.request import SamplingParams

    start = time.perf_counter()
    due = [(t, i, 0) for i, (t, _, _) in enumerate(convs)]  # (due offset, conversation, turn)
    heapq.heapify(due)
    history = [list(systems[tenant]) for _, tenant, _ in convs]
    live: dict[str, tuple] = {}  # request id -> (conversation, turn, due time, time added)
    ttft, tokens = [], 0
    while due or live:
        now = time.perf_counter() - start
        while due and due[0][0] <= now:
            t, c, k = heapq.heappop(due)
            user, max_tokens = convs[c][2][k]
            history[c] += user
            rid = engine.add_request(list(history[c]), SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                      ignore_eos=True), adapters[convs[c][1]])
            live[rid] = (c, k, start + t, time.perf_counter())
        if not live:
            time.sleep(min(0.002, max(0.0, due[0][0] - now)))
            continue
        for out in engine.step():
            if not out.finished:
                continue
            c, k, t_due, t_added = live.pop(out.request_id)
            ttft.append(out.ttft_s + (t_added - t_due))  # from the turn's due time
            tokens += len(out.output_ids)
            history[c] += out.output_ids
            if k + 1 < len(convs[c][2]):
                heapq.heappush(due, (time.perf_counter() - start + thinks[c * len(convs[c][2]) + k], c, k + 1))
    wall = time.perf_counter() - start
    kv = engine.kv
    return {"ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "tokens_per_s": tokens / wall,
            "wall_s": wall, "requests": len(ttft), "hit_rate": kv.hit_tokens / max(1, kv.query_tokens),
            "hit_tokens": kv.hit_tokens, "query_tokens": kv.query_tokens}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tenants", type=int, default=8)
    ap.add_argument("--conversations", type=int, default=2, help="per tenant")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--system-tokens", type=int, default=600)
    ap.add_argument("--rate", type=float, default=2.0, help="conversations starting per second (Poisson)")
    ap.add_argument("--think-s", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="profiles/cpu/bench_prefix.json")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from caraserve.config import AdapterConfig, EngineConfig
    from caraserve.engine import Engine
    from caraserve.model.tiny import write_random_adapter
    from caraserve.profiling.machine import cpu_name

    folder = Path(tempfile.mkdtemp(prefix="bench-prefix-"))
    ranks = (8, 16, 32, 64)
    adapters = [f"tenant{i}-r{ranks[i % 4]}" for i in range(args.tenants)]
    for i, name in enumerate(adapters):
        write_random_adapter(folder / name, ranks[i % 4], 2 * ranks[i % 4], ["q_proj", "k_proj", "v_proj", "o_proj"],
                             seed=1000 + i)

    def engine(prefix: bool) -> Engine:
        return Engine(EngineConfig(device="cpu", compile="false", prefix_caching=prefix,
                                   adapters=AdapterConfig(dir=str(folder), preload="all",
                                                          device_slots=-(-args.tenants // 4))))

    results: dict[str, list[dict]] = {"on": [], "off": []}
    for rep in range(args.repeats):
        for name in (["on", "off"] if rep % 2 == 0 else ["off", "on"]):
            eng = engine(name == "on")
            systems, convs, thinks = conversations(args, eng.model.args.vocab_size)
            results[name].append(run(eng, systems, convs, thinks, adapters))
            line = ", ".join(f"{k} {v:.3g}" for k, v in results[name][-1].items())
            print(f"repeat {rep + 1} caching {name}: {line}", flush=True)
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in results.items()}
    ratio = {"ttft_p50_off_over_on": med["off"]["ttft_p50_s"] / med["on"]["ttft_p50_s"],
             "ttft_p99_off_over_on": med["off"]["ttft_p99_s"] / med["on"]["ttft_p99_s"],
             "throughput_on_over_off": med["on"]["tokens_per_s"] / med["off"]["tokens_per_s"]}
    print(f"\n{'caching':<8} {'TTFT p50':>9} {'TTFT p99':>9} {'tok/s':>8} {'hit rate':>9}")
    for n, m in med.items():
        print(f"{n:<8} {m['ttft_p50_s'] * 1e3:>7.0f}ms {m['ttft_p99_s'] * 1e3:>7.0f}ms {m['tokens_per_s']:>8.0f} "
              f"{m['hit_rate']:>9.1%}")
    print(f"TTFT p50 {ratio['ttft_p50_off_over_on']:.2f}x lower with caching on, p99 "
          f"{ratio['ttft_p99_off_over_on']:.2f}x; throughput {ratio['throughput_on_over_off']:.2f}x")
    out = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": os.uname().nodename,
           "cpu": cpu_name(), "threads": args.threads, "args": vars(args), "median": med, "ratio": ratio,
           "runs": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
