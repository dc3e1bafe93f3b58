"""Engine-thread time of a decode step outside the model forward, against the forward itself.

    python scripts/bench_step_overhead.py [--batches 32,128] [--compile true] [--steps 100]
        [--repeats 3] [--threads 1] [--device cpu|cuda] [--out profiles/<device>/bench_step_overhead.json]

On a GPU the host work of a step (scheduling, building the step's inputs, sampling's read-back,
appending tokens, detokenizing, stop checks, output snapshots) runs while the device waits: it
adds to every step's time however fast the kernels are. Here it is measured on the embedded
default (tiny model with its tokenizer, demo adapters mixed over the batch, greedy, float32):
a full batch is decoded for `--steps` steps and each step is split into phases, timed around the
engine's own components:
  schedule     Scheduler.schedule (decode rows, KV growth)
  inputs       ModelRunner.run less the forward (row order, LoRA metadata, the step's tensors)
  forward      the model forward (the compiled variant's call, or CausalLM.run eagerly): the floor
  sample       sampling and the token read-back
  detokenize   OutputProcessor.detokenize
  outputs      the rest of Engine.step (appending tokens, stop checks, RequestOutput snapshots,
               prefix-cache publishing)
Reports host ms per step (step - forward) and its ratio to the forward, medians over repeats.
On CUDA the forward is the device time of the compiled step's CUDA graph (events around its
launch), so step - forward is the time the device waits on the host; the tiny model's graph takes
a fraction of that, which leaves the host's share of a step plain to see.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

PHASES = ("schedule", "inputs", "forward", "sample", "detokenize", "outputs")



def timed(totals: dict, key: str, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - t0
    return wrapper


def device_timed(events: list, fn):
    """fn, with CUDA events around each call (read once the run has synchronized)."""
    import torch

    def wrapper(*args, **kwargs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(*args, **kwargs)
        end.record()
        events.append((start, end))
        return out
    return wrapper


def instrument(engine, totals: dict, events: list) -> None:
    """Wraps the engine's components (this instance's attributes only) to add their time to
    totals; on CUDA the forward's device time goes to events instead."""
    from caraserve.model.llama import CausalLM

    engine.scheduler.schedule = timed(totals, "schedule", engine.scheduler.schedule)
    engine.isolation.forward = timed(totals, "runner", engine.isolation.forward)
    engine.isolation.sample = timed(totals, "sample", engine.isolation.sample)
    engine.outputs.detokenize = timed(totals, "detokenize", engine.outputs.detokenize)
    graphs = engine.graphs
    if graphs is not None:  # (the compiled forward must not trace the timer: the variant's call is timed)
        variant = graphs._variant
        cuda = engine.device.type == "cuda"
        graphs._variant = lambda *key: (device_timed(events, variant(*key)) if cuda
                                        else timed(totals, "forward", variant(*key)))
    elif isinstance(engine.model, CausalLM):
        engine.model.run = timed(totals, "forward", engine.model.run)


def measure(args, batch: int, lora: bool) -> dict:
    import torch

    from caraserve.config import AdapterConfig, EngineConfig
    from caraserve.engine import Engine
    from caraserve.request import SamplingParams

    engine = Engine(EngineConfig(device=args.device, compile=args.compile, max_batch_size=batch,
                                 max_seq_len=args.prompt_tokens + args.steps + 64,
                                 adapters=AdapterConfig(dir="demo", preload="all")))
    engine.warm_up()
    if engine.device.type == "cuda" and engine.graphs is None:
        raise SystemExit("--device cuda times the compiled step's CUDA graph: run it with --compile true")
    names = sorted(engine.store.names()) if lora else [None]
    totals, events = collections.defaultdict(float), []
    instrument(engine, totals, events)
    sp = SamplingParams(max_tokens=args.steps + 32, temperature=0, ignore_eos=True)
    vocab = engine.model.args.vocab_size
    for i in range(batch):
        prompt = [4 + (i * 131 + j * 17) % (vocab - 4) for j in range(args.prompt_tokens)]
        engine.add_request(prompt, sp, names[i % len(names)])
    deadline = time.monotonic() + 600
    while engine.scheduler.waiting or any(not r.output_ids for r in engine.scheduler.running):
        if not engine.step():  # (an adapter still being read: nothing ran)
            time.sleep(0.001)
        if time.monotonic() > deadline:
            raise SystemExit("the batch did not get past its prefill")
    for _ in range(8):
        engine.step()
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    sync()
    totals.clear()
    events.clear()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    sync()
    step = (time.perf_counter() - t0) / args.steps
    totals["forward"] += sum(start.elapsed_time(end) for start, end in events) / 1e3
    ms = {k: 1e3 * v / args.steps for k, v in totals.items()}
    if engine.device.type == "cuda":  # the launch returns at once: the host waits in sampling's read-back
        ms["inputs"] = ms.pop("runner")
        ms["sample"] = max(0.0, ms["sample"] - ms["forward"])
    else:
        ms["inputs"] = ms.pop("runner") - ms["forward"]
    ms["outputs"] = 1e3 * step - sum(ms[k] for k in ("schedule", "inputs", "forward", "sample", "detokenize"))
    row = {p: ms[p] for p in PHASES}
    row["step"] = 1e3 * step
    row["host"] = 1e3 * step - ms["forward"]
    return row


def main() -> None:
    from caraserve.profiling.cli_args import positive_ints

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=positive_ints, default=[32, 128])
    ap.add_argument("--compile", default="true", choices=["auto", "true", "false"], help="engine.compile for every run")
    ap.add_argument("--workloads", default="mixed,base")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--out", default=None, help="default: profiles/<device>/bench_step_overhead.json")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    args.out = args.out or f"profiles/{'gpu' if args.device == 'cuda' else 'cpu'}/bench_step_overhead.json"
    torch.set_num_threads(args.threads)
    from caraserve.profiling.machine import cpu_name, source_commit

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()

    cases = [(b, w) for b in args.batches for w in args.workloads.split(",")]
    runs = {case: [] for case in cases}
    for _ in range(args.repeats):  # alternating cases, so drift in the machine's speed hits all alike
        for b, w in cases:
            runs[(b, w)].append(measure(args, b, w == "mixed"))
    rows = []
    print(f"{'batch':>5} {'workload':>8} " + " ".join(f"{p:>10}" for p in (*PHASES, "step", "host")) + "  host/fwd")
    for (b, w), rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        med["host_over_forward"] = med["host"] / med["forward"]
        rows.append({"batch": b, "workload": w, "ms": med, "runs_host_ms": [round(r["host"], 3) for r in rs]})
        print(f"{b:>5} {w:>8} " + " ".join(f"{med[p]:>10.3f}" for p in (*PHASES, "step", "host"))
              + f"  {med['host_over_forward']:.2f}")
    out = {"header": {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": source_commit(),
                      "device": device_name, "cpu": cpu_name(), "threads": args.threads,
                      "torch": torch.__version__, "args": vars(args),
                      "command": "python scripts/bench_step_overhead.py "
                                 + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())},
           "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
