"""Cold starts: TTFT, TPOT and latency when adapters are not on the device, per loading policy.

    OMP_NUM_THREADS=1 python scripts/bench_cold_start.py [--requests 64] [--rate 2] [--adapters 64]
        [--slots 2] [--popularity uniform|zipf] [--targets qkvo|all] [--copy-gbps 0.1] [--threads 1]
        [--repeats 1] [--seed 0] [--out profiles/cpu/bench_cold_start.json]

The paper's evaluation of mechanism A (CPU-assisted prefill) on one server, scaled to the embedded
tiny model. One seeded workload: Poisson arrivals at --rate req/s, --adapters random in-memory LoRA
adapters (ranks drawn from 8/16/32/64, q/k/v/o or all seven modules) with uniform or Zipf(1.1)
popularity, prompt lengths 32-512 and output lengths 16-64 tokens (greedy, ignore_eos). The same
requests run, in one process, under each policy:
  CACHED        every adapter preloaded into enough device slots (the ideal: no cold start)
  on-demand     --slots per rank bucket; a cold request waits for its adapter copy (mode=off)
  CPU-assisted  the same slots; a cold request prefills at once with the LoRA delta computed by
                CPU workers from the host copy, and decodes once the copy landed (mode=on)
  auto          CPU-assisted only when the thread plan predicts it beats the copy (mode=auto)
Per policy: TTFT, TPOT and end-to-end latency (mean, p50, p99), cold starts, CPU-assisted
requests, adapter loads; ratios to CACHED and on-demand / CPU-assisted. --repeats N runs the whole
set N times and reports the medians of the per-run numbers. Writes JSON with a provenance header.

A request is added once its arrival time has passed and the engine is between steps; TTFT and
latency start at that add (the request's own arrival_s). The time it arrived "late" because a step
was running is reported separately (late ms) and is not in TTFT.

What CPU-only numbers mean. There is no accelerator here: the "device" that runs the base model is
the same CPU whose other core runs the CPU-assist workers, and the host -> device adapter copy is a
memcpy paced to --copy-gbps (cpu_assist.emulate_copy_gbps) to stand in for a PCIe link. The header
prints each rank's adapter size, its emulated copy time and this machine's prefill time, so the
ratio copy / prefill, which decides how much a cold start costs, is visible. --copy-gbps is a
modelling choice, not a measurement of any link; it sets that ratio. For Llama-2-7B on an A10 a
rank-64 q/k/v/o adapter is ~134 MB: ~5 ms over pinned PCIe 4 (~25 GB/s), "tens of ms" as the paper
measured, against ~40 ms for a 256-token prefill, i.e. copy / prefill(256) ~ 0.13 to ~1. Here a
256-token prefill takes ~50-60 ms and a rank-64 adapter is 1.75 MiB, so that range is ~0.25 GB/s
down to ~0.03 GB/s; the default 0.1 GB/s (rank-64 copy ~18 ms, about a 100-token prefill) sits
in between. Two more CPU-only effects: the CPU-assist workers run on the same two cores as the
"device" (on a GPU they would not compete with it), and a decode step here costs more with every
row it adds (~8 ms at batch 1, ~+2-3 ms per row), so a policy that admits requests sooner (CACHED,
CPU-assisted) can lose in TPOT and latency what it wins in TTFT, while on-demand's waits for a
slot act as admission control. The machine should be otherwise idle: the header records the load
average before and after, and each run the CPU-seconds other processes took (a warning is printed
when that is over 5 % of the run's wall time).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from cold_start_report import RANKS, print_report, summarize

from caraserve.lora.synthetic import random_lora
from caraserve.model.synthetic import SHAPES, random_model
from caraserve.profiling.machine import cpu_name
from caraserve.profiling.timing import busy_cpu_s, own_cpu_s, pct

QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL7 = QKVO + ("gate_proj", "up_proj", "down_proj")
POLICIES = ("CACHED", "on-demand", "CPU-assisted", "auto")
MODES = {"CACHED": "off", "on-demand": "off", "CPU-assisted": "on", "auto": "auto"}


@dataclass(frozen=True)
class Item:
    arrival_s: float  # offset from the start of the run
    prompt: list
    adapter: str
    max_tokens: int


def make_workload(args, vocab: int):
    """(adapter name -> rank, requests), all from --seed."""
    rng = random.Random(args.seed)
    ranks = [rng.choice(args.rank_mix) for _ in range(args.adapters)]
    names = [f"cold{i:03d}-r{r}" for i, r in enumerate(ranks)]
    if args.popularity == "zipf":
        order = list(range(args.adapters))
        rng.shuffle(order)  # which adapter is the most popular is itself seeded
        weights = [0.0] * args.adapters
        for k, i in enumerate(order):
            weights[i] = 1.0 / (k + 1) ** 1.1
    else:
        weights = [1.0] * args.adapters
    items, t = [], 0.0
    for _ in range(args.requests):
        n = rng.randint(args.prompt_min, args.prompt_max)
        items.append(Item(t, [rng.randrange(4, vocab) for _ in range(n)],
                          names[rng.choices(range(args.adapters), weights)[0]],
                          rng.randint(args.output_min, args.output_max)))
        t += rng.expovariate(args.rate)
    return dict(zip(names, ranks)), items


def make_engine(policy, model, model_dir, args, targets, slots, adapters):
    from caraserve.config import AdapterConfig, CpuAssistConfig, EngineConfig, ModelConfig
    from caraserve.engine import Engine

    cfg = EngineConfig(
        model=ModelConfig(path=str(model_dir)),
        adapters=AdapterConfig(dir="none", rank_buckets=RANKS, device_slots=slots, target_modules=targets,
                               preload="all" if policy == "CACHED" else "none"),
        cpu_assist=CpuAssistConfig(mode=MODES[policy], threads=args.threads, emulate_copy_gbps=args.copy_gbps),
        device=args.device, max_batch_size=args.max_batch, max_seq_len=args.prompt_max + args.output_max + 8,
        num_kv_blocks=args.max_batch * -(-(args.prompt_max + args.output_max + 8) // 16),  # each request's longest
        compile="false", compile_cache_dir="")
    engine = Engine(cfg, model=model)
    for w in adapters:
        engine.store.add(w)
    return engine


def warm_up(engine, policy, adapters, vocab):
    """Runs a few requests (one adapter per bucket, cold where the policy has cold starts: the CPU
    path warms up too), then evicts every adapter so the run starts with an empty pool."""
    from caraserve.request import SamplingParams

    if policy == "CACHED":
        engine.preload_all()
    picks = {}
    for w in adapters:
        picks.setdefault(w.rank, w.name)
    g = random.Random(1)
    prompts = [[g.randrange(4, vocab) for _ in range(48)] for _ in picks]
    engine.generate(prompts, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), list(picks.values()))
    if policy != "CACHED":
        for w in adapters:
            engine.pool.evict(w.name)
    engine.pool.loads = engine.pool.evictions = 0


def drive(engine, items) -> dict:
    """Adds each request once its arrival time has passed, steps the engine otherwise."""
    from caraserve.request import FinishReason, SamplingParams

    reqs, late, i = [], [], 0
    busy0, own0 = busy_cpu_s(), own_cpu_s()
    t0 = time.perf_counter()
    while i < len(items) or engine.has_unfinished():
        now = time.perf_counter() - t0
        while i < len(items) and now >= items[i].arrival_s:
            it = items[i]
            sp = SamplingParams(max_tokens=it.max_tokens, temperature=0, ignore_eos=True)
            req = engine.request(engine.add_request(it.prompt, sp, it.adapter, f"cold-{i}"))
            late.append(req.arrival_s - t0 - it.arrival_s)
            reqs.append(req)
            i += 1
        if engine.has_unfinished() and engine.step():
            continue
        # nothing to run (empty, or every request waits for a copy): idle until the next event
        nxt = items[i].arrival_s - (time.perf_counter() - t0) if i < len(items) else 5e-4
        time.sleep(min(5e-4, max(0.0, nxt)))
    wall = time.perf_counter() - t0
    busy1 = busy_cpu_s()
    # CPU time other processes took during the run: nonzero means the numbers are contaminated
    foreign = None if busy0 is None or busy1 is None else max(0.0, busy1 - busy0 - (own_cpu_s() - own0))
    bad = [r.request_id for r in reqs if r.finish_reason is not FinishReason.LENGTH
           or len(r.output_ids) != r.params.max_tokens]
    if bad:
        raise RuntimeError(f"requests did not finish normally: {bad[:5]} ({reqs[0].error})")
    sched = [t0 + it.arrival_s for it in items]  # when each request was due, before any late add
    vals = {
        "ttft": [r.first_token_s - r.arrival_s for r in reqs],
        "tpot": [(r.finish_s - r.first_token_s) / (len(r.output_ids) - 1) for r in reqs],
        "e2e": [r.finish_s - r.arrival_s for r in reqs],
    }
    stats = {}
    for k, xs in vals.items():
        stats[f"{k}_mean_ms"] = 1e3 * statistics.fmean(xs)
        stats[f"{k}_p50_ms"] = 1e3 * pct(xs, 50)
        stats[f"{k}_p99_ms"] = 1e3 * pct(xs, 99)
    due = [r.first_token_s - s for r, s in zip(reqs, sched)]
    stats["ttft_from_due_mean_ms"] = 1e3 * statistics.fmean(due)
    stats["ttft_from_due_p99_ms"] = 1e3 * pct(due, 99)
    cold = [r for r in reqs if r.cold_start]
    stats.update({
        "cold_starts": len(cold),
        "cpu_assisted": sum(r.cpu_assisted for r in reqs),
        "ttft_cold_mean_ms": 1e3 * statistics.fmean(vals["ttft"][j] for j, r in enumerate(reqs) if r.cold_start)
        if cold else 0.0,
        "loads": engine.pool.loads,
        "evictions": engine.pool.evictions,
        "late_mean_ms": 1e3 * statistics.fmean(late),
        "late_max_ms": 1e3 * max(late),
        "wall_s": wall,
        "other_processes_cpu_s": foreign if foreign is not None else float("nan"),
        "tokens_per_s": sum(len(r.output_ids) for r in reqs) / wall,
    })
    return {"stats": stats, "outputs": [list(r.output_ids) for r in reqs]}


def prefill_ms(engine, adapter: str, vocab: int, lengths=(64, 128, 256, 512)) -> dict:
    """This machine's prefill time (median of 3) with a resident adapter, per prompt length (those
    that fit the engine's context)."""
    from caraserve.request import SamplingParams

    sp = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    out = {}
    for n in (n for n in lengths if n < engine.max_seq_len):
        prompt = [4 + (7 * j) % (vocab - 4) for j in range(n)]
        times = []
        for _ in range(3):
            engine.kv.reset_prefix_cache()  # a cold prefill each time (the prompts share their starts too)
            t0 = time.perf_counter()
            engine.generate([prompt], sp, [adapter])
            times.append(time.perf_counter() - t0)
        out[n] = 1e3 * statistics.median(times)
    return out


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--rate", type=float, default=2.0, help="Poisson arrival rate, requests/s (2: ~50%% busy)")
    ap.add_argument("--adapters", type=int, default=64)
    ap.add_argument("--slots", type=int, default=2, help="device slots per rank bucket (not CACHED)")
    ap.add_argument("--popularity", default="uniform", choices=("uniform", "zipf"))
    ap.add_argument("--targets", default="qkvo", choices=("qkvo", "all"))
    ap.add_argument("--copy-gbps", type=float, default=0.1, help="emulated host->device copy bandwidth")
    ap.add_argument("--threads", type=int, default=1, help="cpu_assist.threads (CPU LoRA workers)")
    ap.add_argument("--torch-threads", type=int, default=1, help="intra-op threads of the engine's thread")
    ap.add_argument("--prompt-min", type=int, default=32)
    ap.add_argument("--prompt-max", type=int, default=512)
    ap.add_argument("--output-min", type=int, default=16)
    ap.add_argument("--output-max", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--policies", default=",".join(POLICIES), help=f"comma list of {POLICIES}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shape", default="tiny", choices=["tiny", *sorted(SHAPES)],
                    help="tiny = the embedded default; others: random weights made on the device")
    ap.add_argument("--ranks", default="8,16,32,64", help="adapter ranks to draw from (buckets stay 8-64)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="profiles/cpu/bench_cold_start.json")
    args = ap.parse_args()
    policies = args.policies.split(",")
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or "CACHED" not in policies:
        ap.error(f"--policies must include CACHED and name only {POLICIES}; got {unknown or policies}")
    for what in ("prompt", "output"):
        lo, hi = getattr(args, f"{what}_min"), getattr(args, f"{what}_max")
        if not 1 <= lo <= hi:
            ap.error(f"need 1 <= --{what}-min <= --{what}-max; got {lo} and {hi}")
    args.policy_list = policies
    args.rank_mix = [int(r) for r in args.ranks.split(",")]
    return args


def run_policies(args, model, model_dir, targets, adapters, items, per_bucket, vocab):
    """Every policy over the same items, --repeats times in rotated order: (per-policy run stats,
    each policy's first outputs, the CPU-assist plan's source, CACHED's prefill times)."""
    from tqdm import tqdm

    policies = args.policy_list
    rank64 = next(w.name for w in adapters if w.rank == max(w.rank for w in adapters))
    runs: dict[str, list[dict]] = {p: [] for p in policies}
    outputs: dict[str, list] = {}
    plan_source, prefill = "", {}
    bar = tqdm(total=len(policies) * args.repeats, desc="policies x repeats", file=sys.stderr)
    for rep in range(args.repeats):
        for policy in policies[rep % len(policies):] + policies[: rep % len(policies)]:  # rotated per repeat
            bar.set_postfix_str(f"{policy} #{rep + 1}")
            slots = per_bucket if policy == "CACHED" else args.slots
            engine = make_engine(policy, model, model_dir, args, targets, slots, adapters)
            warm_up(engine, policy, adapters, vocab)
            if policy == "CACHED" and not prefill:
                prefill = prefill_ms(engine, rank64, vocab)
            if engine.handoff is not None:
                plan_source = engine.handoff.plan.source
            res = drive(engine, items)
            runs[policy].append(res["stats"])
            outputs.setdefault(policy, res["outputs"])
            if engine.handoff is not None:
                engine.handoff.close()
            del engine
            bar.update(1)
    bar.close()
    return runs, outputs, plan_source, prefill


def main():
    args = parse_args()
    torch.set_num_threads(args.torch_threads)
    logging_off()

    t_start = time.perf_counter()
    model_dir, model = load_bench_model(args)
    margs = model.args
    vocab = margs.vocab_size
    targets = QKVO if args.targets == "qkvo" else ALL7
    adapter_ranks, items = make_workload(args, vocab)
    adapters = [random_lora(n, r, margs, tuple(targets), seed=i) for i, (n, r) in enumerate(adapter_ranks.items())]
    per_bucket = max(sum(r == b for r in adapter_ranks.values()) for b in RANKS)

    size = {r: next((w.nbytes for w in adapters if w.rank == r), 0) for r in RANKS}
    # copies are real on CUDA (the pool ignores the emulated rate there): None, not a made-up time
    emulated = args.copy_gbps > 0 and args.device != "cuda"
    copy_ms = {r: 1e3 * size[r] / (args.copy_gbps * 1e9) if emulated else None for r in RANKS}
    rank_counts = {r: sum(v == r for v in adapter_ranks.values()) for r in RANKS}
    used = sorted({it.adapter for it in items})

    load_start = os.getloadavg()
    runs, outputs, plan_source, prefill = run_policies(args, model, model_dir, targets, adapters, items,
                                                       per_bucket, vocab)
    systems, ratios, pairs = summarize(runs, outputs, len(items))

    header = provenance(args, model, plan_source, load_start)
    emulation = {"adapter_bytes": size, "copy_ms": copy_ms, "prefill_ms_rank64_resident": prefill}
    workload = {
        "requests": args.requests, "rate": args.rate, "adapters": args.adapters, "adapters_used": len(used),
        "rank_counts": rank_counts, "slots_per_bucket": args.slots, "cached_slots_per_bucket": per_bucket,
        "popularity": args.popularity, "targets": list(targets), "prompt_tokens": [args.prompt_min, args.prompt_max],
        "output_tokens": [args.output_min, args.output_max], "max_batch": args.max_batch, "seed": args.seed,
        "repeats": args.repeats, "arrival_span_s": items[-1].arrival_s,
        "mean_prompt_tokens": statistics.fmean(len(it.prompt) for it in items),
        "mean_output_tokens": statistics.fmean(it.max_tokens for it in items),
    }

    result = {"header": header, "emulation": emulation, "workload": workload, "systems": systems,
              "ratios": ratios, "pairs": pairs}
    print_report(args, result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out} ({time.perf_counter() - t_start:.0f} s)")


def load_bench_model(args):
    """(model folder or pseudo-path, model): the embedded tiny model, or random weights of a shape."""
    from caraserve.model.loader import load_model
    from caraserve.model.tiny import tiny_paths

    if args.shape == "tiny":
        model_dir, _ = tiny_paths()
        return model_dir, load_model(model_dir, "float32", args.device, None).eval()
    # copies are real on CUDA (emulate_copy_gbps only paces CPU-only "devices")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    return Path(f"random-{args.shape}"), random_model(args.shape, dtype, args.device)


def provenance(args, model, plan_source: str, load_start) -> dict:
    return {
        "device": torch.cuda.get_device_name() if args.device == "cuda"
        else "cpu (no accelerator: the 'device' is this CPU; adapter copies are paced memcpys)",
        "cpu": cpu_name(), "cores": os.cpu_count(), "model": args.shape,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "torch": torch.__version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "copy_gbps": args.copy_gbps, "threads": args.threads, "torch_threads": args.torch_threads,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""), "cpu_assist_plan": plan_source,
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "loadavg_1_5_15_start": [round(x, 2) for x in load_start],
        "loadavg_1_5_15_end": [round(x, 2) for x in os.getloadavg()],
    }


def logging_off():
    import logging

    logging.getLogger("caraserve").setLevel(logging.WARNING)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
