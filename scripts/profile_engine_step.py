"""Where a decode step's time goes: torch.profiler over a few full-batch engine steps.

    python scripts/profile_engine_step.py [--shape llama2-7b|small] [--batch 32] [--steps 4]
        [--compile false] [--lora] [--rows 25] [--trace FILE.json]

Builds a random-weight model of the shape on the device (as bench_decode_floor.py does), fills a
batch of requests past their prefill, then profiles `--steps` engine steps and prints the wall
time per step, the host time per step inside torch ops (the rest of a step's host time is
Python: scheduling, the step's inputs, sampling), and the ops that take the most device (or,
on CPU, host) time. `--trace` writes a Chrome trace.
"""

from __future__ import annotations

import argparse
import time

import torch

from caraserve.config import AdapterConfig, EngineConfig, ModelConfig
from caraserve.engine import Engine
from caraserve.lora.synthetic import random_lora
from caraserve.model.synthetic import SHAPES, random_model
from caraserve.profiling.cli_args import output_file, positive_int
from caraserve.request import SamplingParams

RANKS = (8, 16, 32, 64)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=positive_int, default=32)
    ap.add_argument("--steps", type=positive_int, default=4)
    ap.add_argument("--prompt-tokens", type=positive_int, default=128)
    ap.add_argument("--compile", default="false", choices=["false", "true", "auto"])
    ap.add_argument("--lora", action="store_true", help="mixed adapters (ranks 8-64) instead of the base model")
    ap.add_argument("--rows", type=positive_int, default=25)
    ap.add_argument("--trace", type=output_file, default=None)
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model = random_model(args.shape, torch.bfloat16 if cuda else torch.float32, device)
    warm = 8
    engine = Engine(EngineConfig(
        model=ModelConfig(path=f"random-{args.shape}"),
        adapters=AdapterConfig(dir="none", rank_buckets=RANKS, target_modules=TARGETS, device_slots=args.batch),
        device=device.type, max_batch_size=args.batch,
        max_seq_len=args.prompt_tokens + warm + 2 * args.steps + 8, compile=args.compile, compile_cache_dir="",
        num_kv_blocks=args.batch * -(-(args.prompt_tokens + warm + 2 * args.steps + 8) // 16)),
        model=model)
    names = [f"lora{i}-r{RANKS[i % len(RANKS)]}" for i in range(len(RANKS))]
    for i, n in enumerate(names):
        engine.store.add(random_lora(n, RANKS[i], model.args, TARGETS, seed=i))
    g = torch.Generator().manual_seed(1)
    sp = SamplingParams(max_tokens=warm + 2 * args.steps + 1, temperature=0, ignore_eos=True)
    for i in range(args.batch):
        prompt = torch.randint(0, model.args.vocab_size, (args.prompt_tokens,), generator=g).tolist()
        engine.add_request(prompt, sp, names[i % len(names)] if args.lora else None)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sched = engine.scheduler
    while sched.waiting or any(not r.output_ids for r in sched.running):  # every request past its prefill
        engine.step()
    for _ in range(warm):
        engine.step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    sync()
    plain_ms = (time.perf_counter() - t0) / args.steps * 1e3
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(args.steps):
            engine.step()
        sync()
    events = prof.key_averages()
    op_host_us = sum(e.self_cpu_time_total for e in events) / args.steps
    print(f"{device.type} {args.shape} batch {args.batch} {'mixed LoRA' if args.lora else 'base only'} "
          f"compile={args.compile}: {plain_ms:.2f} ms/step unprofiled; host time in torch ops "
          f"{op_host_us / 1e3:.2f} ms/step")
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))
    if args.trace:
        prof.export_chrome_trace(str(args.trace))  # (torch's exporter takes a str, not a Path)


if __name__ == "__main__":
    main()
