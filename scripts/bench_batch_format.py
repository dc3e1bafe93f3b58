"""The cost of OpenAI's batch file format in an offline job: the same requests as CaraServe's own
lines (straight into the engine) and as OpenAI batch lines (each one call to the server's app,
in-process), on one engine.

    python scripts/bench_batch_format.py [--requests 200,2000] [--new-tokens 32,4] [--repeats 3]
        [--threads 1] [--out profiles/cpu/bench_batch_format.json]

Runs the embedded default (tiny model + demo adapters, CPU float32); each workload pairs a count
of `--requests` with a `--new-tokens` (greedy, ignore_eos, the 4 demo adapters and the base model
mixed, completions). Prints output tokens/s of both forms and their ratio, and checks both forms
generated the same tokens; writes JSON. Medians over repeats, which alternate the forms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from datetime import datetime, timezone
from pathlib import Path

PROMPTS = ["The quick brown fox", "def parse(line):", "import os\n", "Licensed under the Apache License"]


def _ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",")]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma list of integers >= 1")
    return values


def lines_of(requests: int, new_tokens: int, names: list) -> tuple[list[str], list[str]]:
    """The same requests as CaraServe lines and as OpenAI batch lines."""
    ours, theirs = [], []
    for i in range(requests):
        prompt, name = f"{PROMPTS[i % len(PROMPTS)]} {i}", names[i % len(names)]
        sampling = {"max_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
        ours.append(json.dumps({"id": i, "prompt": prompt, "adapter": name, **sampling}))
        theirs.append(json.dumps({"custom_id": str(i), "method": "POST", "url": "/v1/completions",
                                  "body": {"model": name or "tiny", "prompt": prompt, **sampling}}))
    return ours, theirs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=_ints, default=[200, 2000])
    ap.add_argument("--new-tokens", type=_ints, default=[32, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="profiles/cpu/bench_batch_format.json")
    args = ap.parse_args()
    if len(args.requests) != len(args.new_tokens):
        ap.error("--requests and --new-tokens pair up: give as many of each")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from caraserve.config import EngineConfig, ServerConfig
    from caraserve.engine import Engine
    from caraserve.offline import run_offline
    from caraserve.profiling.machine import cpu_name
    from caraserve.serve.openai_batch import run_openai_batch

    engine = Engine(EngineConfig(device="cpu", compile="false", max_batch_size=32))
    names = [None, *sorted(i.name for i in engine.adapters())]
    server = ServerConfig(served_model_name="tiny")

    def run(form: str, lines: list[str]) -> tuple[float, list[str]]:
        engine.kv.reset_prefix_cache()
        if form == "caraserve":
            results, summary = run_offline(engine, lines)
            texts = [r["text"] for r in results]
        else:
            results, summary = run_openai_batch(engine, server, lines)
            texts = [r["response"]["body"]["choices"][0]["text"] for r in results]
        assert summary.errors == 0, results[:3]
        return summary.tokens_per_s, texts

    report = []
    for requests, new_tokens in zip(args.requests, args.new_tokens):
        forms = dict(zip(("caraserve", "openai"), lines_of(requests, new_tokens, names)))
        for form, lines in forms.items():  # warm-up
            run(form, lines[:8])
        runs: dict[str, list[float]] = {form: [] for form in forms}
        texts = {}
        for rep in range(args.repeats):
            for form in (list(forms) if rep % 2 == 0 else list(reversed(forms))):
                speed, texts[form] = run(form, forms[form])
                runs[form].append(speed)
        same = sum(a == b for a, b in zip(texts["caraserve"], texts["openai"]))
        med = {form: statistics.median(v) for form, v in runs.items()}
        report.append({"requests": requests, "new_tokens": new_tokens, "median_tokens_per_s": med,
                       "ratio": med["openai"] / med["caraserve"], "same_text": f"{same}/{requests}", "runs": runs})
    print(f"{'requests x tokens':<18} {'caraserve tok/s':>16} {'openai tok/s':>13} {'ratio':>7} {'same':>10}")
    for r in report:
        med = r["median_tokens_per_s"]
        print(f"{r['requests']:>8} x {r['new_tokens']:<7} {med['caraserve']:>16.0f} {med['openai']:>13.0f} "
              f"{r['ratio']:>6.2f}x {r['same_text']:>10}")
    out = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_name(),
           "threads": args.threads, "args": vars(args), "workloads": report}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
