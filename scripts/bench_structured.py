"""The cost of structured outputs: the same batch with and without a grammar on every request.

    python scripts/bench_structured.py [--requests 32] [--new-tokens 64] [--repeats 3] [--threads 1]
        [--out profiles/cpu/bench_structured.json]

Runs the embedded default (tiny model + demo adapters, CPU float32) on `--requests` requests of
`--new-tokens` tokens each (greedy, the 4 demo adapters and the base model mixed), three ways:
  free     no constraint (the floor)
  regex    structured_outputs.regex "[a-z ]{N}", N far past what the tokens can spell
  json     a JSON schema of an array of at least N strings
Neither grammar can be complete within the tokens, so every request makes all of them and the
systems do the same model work; the difference is the grammar's per-token masking and matching.
Prints output tokens/s and the ratio to `free`; writes JSON. Medians over repeats, which
alternate the systems.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

PROMPTS = ["The quick brown fox", "def parse(line):", "import os\n", "Licensed under the Apache License"]


def main():
    from caraserve.profiling.cli_args import positive_int

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=positive_int, default=32)
    ap.add_argument("--new-tokens", type=positive_int, default=64)
    ap.add_argument("--repeats", type=positive_int, default=3)
    ap.add_argument("--threads", type=positive_int, default=1)
    ap.add_argument("--out", default="profiles/cpu/bench_structured.json")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from caraserve.config import AdapterConfig, EngineConfig
    from caraserve.engine import Engine
    from caraserve.profiling.machine import cpu_name
    from caraserve.request import SamplingParams
    from caraserve.structured_output import StructuredOutputs

    engine = Engine(EngineConfig(device="cpu", compile="false", max_batch_size=args.requests,
                                 adapters=AdapterConfig(dir="demo", preload="all")))
    names = [None, *sorted(i.name for i in engine.adapters())]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
    adapters = [names[i % len(names)] for i in range(args.requests)]
    never_done = 100 * args.new_tokens  # characters or items the tokens cannot reach
    specs = {"free": None, "regex": StructuredOutputs(regex=f"[a-z ]{{{never_done}}}"),
             "json": StructuredOutputs(json={"type": "array", "items": {"type": "string"}, "minItems": never_done})}

    def run(spec) -> float:
        params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True, structured_outputs=spec)
        engine.kv.reset_prefix_cache()
        t0 = time.perf_counter()
        reqs = engine.generate(prompts, params, adapters)
        wall = time.perf_counter() - t0
        tokens = sum(len(r.output_ids) for r in reqs)
        assert tokens == args.requests * args.new_tokens, "a request ended early: the grammar was complete"
        return tokens / wall

    for spec in specs.values():  # warm-up: the kernels, the grammars' compiles
        run(spec)
    runs: dict[str, list[float]] = {name: [] for name in specs}
    for rep in range(args.repeats):
        for name in (list(specs) if rep % 2 == 0 else list(reversed(specs))):
            runs[name].append(run(specs[name]))
    med = {name: statistics.median(v) for name, v in runs.items()}
    print(f"{'system':<8} {'tok/s':>9} {'vs free':>8}")
    for name, v in med.items():
        print(f"{name:<8} {v:>9.0f} {v / med['free']:>7.2f}x")
    out = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_name(),
           "threads": args.threads, "args": vars(args), "median_tokens_per_s": med,
           "ratio_to_free": {k: v / med["free"] for k, v in med.items()}, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
