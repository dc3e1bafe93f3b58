"""Engine throughput and latency vs Hugging Face transformers + peft, in one process and one run.

    python scripts/bench_engine.py [--requests 32] [--new-tokens 64] [--repeats 3] [--threads 1]
        [--model DIR --adapters DIR] [--compile false,auto] [--vllm-python VENV/bin/python]
        [--out profiles/bench_engine.json]

Same model, adapters, prompts and greedy settings for every system:
  (a) caraserve, each request with its own adapter (4 adapters of ranks 8-64, mixed in the batch)
  (b) caraserve, base model only (the same requests without adapters)
  (c) transformers + peft, one batched `generate(adapter_names=...)` with the same mix
  (d) with --vllm-python VENV/bin/python: vLLM's CPU build (offline LLM, a LoRARequest per prompt)
Prints output tokens/s, TTFT and TPOT (p50/p99) and the ratios; writes JSON. Medians over repeats,
which alternate between the systems.
TTFT/TPOT of (c): its batch generates in lock-step, so TTFT is the time to the first token of the
batch (a 1-token generate) and TPOT the remaining time divided by the remaining tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from caraserve.profiling.timing import pct

PROMPTS = [
    "The quick brown fox jumps over the lazy dog and then",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Permission is hereby granted, free of charge, to any person obtaining a copy",
    "import os\nimport sys\n\nclass Worker(object):\n    def __init__(self",
    "This program is free software; you can redistribute it and/or modify it under the terms",
    "for i in range(10):\n    print(i)\n",
    "THE SOFTWARE IS PROVIDED AS IS, WITHOUT WARRANTY OF ANY KIND",
    "Licensed under the Apache License, Version 2.0 (the License); you may not use",
]


def run_ours(engine, prompts, adapters, new_tokens):
    from caraserve.request import SamplingParams

    sp = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    # Each run starts with the prefix cache cold, as the peer does: blocks cached by the warm-up
    # or an earlier repeat would skip prefill the peer computes (prompts shared inside a run
    # still share blocks, as they would in a server)
    engine.kv.reset_prefix_cache()
    t0 = time.perf_counter()
    reqs = engine.generate(prompts, sp, adapters)
    wall = time.perf_counter() - t0
    ttft = [r.first_token_s - r.arrival_s for r in reqs]
    tpot = [(r.finish_s - r.first_token_s) / max(1, len(r.output_ids) - 1) for r in reqs]
    tokens = sum(len(r.output_ids) for r in reqs)
    return {"tokens_per_s": tokens / wall, "ttft_s": ttft, "tpot_s": tpot, "wall_s": wall,
            "outputs": [r.output_ids for r in reqs]}


def run_hf(model, tok, prompts, adapters, new_tokens):
    enc = tok(prompts, return_tensors="pt", padding=True)
    names = [a or "__base__" for a in adapters]
    kw = dict(do_sample=False, pad_token_id=tok.pad_token_id, adapter_names=names)
    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(**enc, max_new_tokens=1, min_new_tokens=1, **kw)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        wall = time.perf_counter() - t0
    n = len(prompts)
    tpot = (wall - ttft) / max(1, new_tokens - 1)
    return {"tokens_per_s": n * new_tokens / wall, "ttft_s": [ttft] * n, "tpot_s": [tpot] * n, "wall_s": wall,
            "outputs": out[:, enc["input_ids"].shape[1]:].tolist()}


def run_vllm(args, model_dir, adapter_dir, names, prompts, adapters) -> list[dict]:
    """The same workload through vLLM's CPU build, in its own virtualenv (scripts/peers/vllm_worker.py);
    its repeats run back to back in that one process, after ours."""
    spec = {"model": str(model_dir), "adapters": {n: str(adapter_dir / n) for n in names}, "prompts": prompts,
            "prompt_adapters": adapters, "new_tokens": args.new_tokens, "repeats": args.repeats,
            "max_num_seqs": args.requests, "max_lora_rank": 64}
    cores = ",".join(str(c) for c in range(args.threads))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND=cores if args.threads > 1 else "0",
               VLLM_CPU_NUM_OF_RESERVED_CPU="0", OMP_NUM_THREADS=str(args.threads))
    with tempfile.TemporaryDirectory() as tmp:
        spec_file = Path(tmp) / "spec.json"
        spec_file.write_text(json.dumps(spec))
        worker = Path(__file__).parent / "peers" / "vllm_worker.py"
        proc = subprocess.run([args.vllm_python, str(worker), str(spec_file)], env=env, capture_output=True,
                              text=True, cwd=tmp)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"vLLM peer failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(line[len("RESULT "):])
    return [dict(r, outputs=result["outputs"]) for r in result["runs"]]


def summarize(runs):
    def ms(key, q):  # None when a system reports no per-request timings (vLLM's metrics may be off)
        if not all(r[key] for r in runs):
            return None
        return 1e3 * statistics.median(pct(r[key], q) for r in runs)

    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
        "ttft_p50_ms": ms("ttft_s", 50),
        "ttft_p99_ms": ms("ttft_s", 99),
        "tpot_p50_ms": ms("tpot_s", 50),
        "tpot_p99_ms": ms("tpot_s", 99),
        "runs_tokens_per_s": [round(r["tokens_per_s"], 1) for r in runs],
    }


def compile_modes(text: str) -> str:
    """A comma list of engine.compile modes (argparse type: a bad one is a usage error)."""
    bad = [m for m in text.split(",") if m not in ("auto", "true", "false")]
    if bad:
        raise argparse.ArgumentTypeError(f"{', '.join(map(repr, bad))}: engine.compile modes are auto, true, false")
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--adapters", default="demo")
    ap.add_argument("--compile", default="auto", type=compile_modes,
                    help="comma list of engine.compile modes: auto,false,true")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--vllm-python", default="",
                    help="python of a virtualenv with vllm-cpu: adds vLLM's CPU build as a second peer")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="profiles/bench_engine.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from caraserve.config import AdapterConfig, EngineConfig, ModelConfig
    from caraserve.engine import Engine, resolve_paths
    from caraserve.profiling.machine import cpu_name

    base_cfg = EngineConfig(model=ModelConfig(path=args.model), adapters=AdapterConfig(dir=args.adapters))
    model_dir, adapter_dir = resolve_paths(base_cfg)
    names = sorted(p.name for p in adapter_dir.iterdir() if p.is_dir())
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
    adapters = [names[i % len(names)] for i in range(args.requests)]
    # Every system is built first, then the repeats go round-robin over them, so drift in this
    # (shared, noisy) machine's speed hits every system alike instead of whichever ran last.
    compiles = args.compile.split(",")
    runners = {}  # label -> () -> one run's result
    for comp in compiles:
        cfg = EngineConfig(model=ModelConfig(path=str(model_dir)),
                           adapters=AdapterConfig(dir=str(adapter_dir), device_slots=len(names)),
                           max_batch_size=args.requests, compile=comp, device=args.device)
        engine = Engine(cfg)
        for warm in (adapters, [None] * len(prompts)):  # warm-up: compiles every variant the runs use
            run_ours(engine, prompts, warm, 4)
            while engine.idle():  # as a server's engine thread does between bursts (compile=auto)
                pass
        tag = "" if len(compiles) == 1 else f" compile={comp}"
        base_only = [None] * len(prompts)
        for label, ads in ((f"caraserve mixed LoRA{tag}", adapters), (f"caraserve base only{tag}", base_only)):
            runners[label] = lambda engine=engine, ads=ads: run_ours(engine, prompts, ads, args.new_tokens)
    if not args.skip_hf:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir))
        tok.padding_side = "left"
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        model = PeftModel.from_pretrained(base, str(adapter_dir / names[0]), adapter_name=names[0])
        for n in names[1:]:
            model.load_adapter(str(adapter_dir / n), adapter_name=n)
        model.eval()
        run_hf(model, tok, prompts[:4], adapters[:4], 4)
        runners["transformers+peft mixed LoRA"] = lambda: run_hf(model, tok, prompts, adapters, args.new_tokens)
    results = {label: [] for label in runners}
    for _ in range(args.repeats):
        for label, run in runners.items():
            results[label].append(run())
    if args.vllm_python:
        results["vLLM-cpu mixed LoRA"] = run_vllm(args, model_dir, adapter_dir, names, prompts, adapters)
    systems = {label: summarize(runs) for label, runs in results.items()}
    outputs = {label: runs[0]["outputs"] for label, runs in results.items()}

    ratios = {}
    ours = next((k for k in systems if k.startswith("caraserve mixed") and "compile=" not in k),
                f"caraserve mixed LoRA compile={'auto' if 'auto' in compiles else compiles[0]}")
    for comp in compiles[1:]:
        tag = f" compile={comp}"
        ratios[f"mixed LoRA{tag} vs compile={compiles[0]}"] = (
            systems[f"caraserve mixed LoRA{tag}"]["tokens_per_s"]
            / systems[f"caraserve mixed LoRA compile={compiles[0]}"]["tokens_per_s"])
        ratios[f"base only{tag} vs compile={compiles[0]}"] = (
            systems[f"caraserve base only{tag}"]["tokens_per_s"]
            / systems[f"caraserve base only compile={compiles[0]}"]["tokens_per_s"])
    for comp in compiles:
        tag = "" if len(compiles) == 1 else f" compile={comp}"
        mixed, base = systems[f"caraserve mixed LoRA{tag}"], systems[f"caraserve base only{tag}"]
        ratios[f"mixed LoRA vs own base-only{tag}"] = mixed["tokens_per_s"] / base["tokens_per_s"]
    if "transformers+peft mixed LoRA" in systems:
        ratios["mixed LoRA vs transformers+peft"] = (
            systems[ours]["tokens_per_s"] / systems["transformers+peft mixed LoRA"]["tokens_per_s"])
        same = sum(a == b for a, b in zip(outputs[ours], outputs["transformers+peft mixed LoRA"]))
        ratios["greedy outputs equal to transformers+peft"] = f"{same}/{len(prompts)}"
    if "vLLM-cpu mixed LoRA" in systems:
        vllm = systems["vLLM-cpu mixed LoRA"]["tokens_per_s"]
        ratios["mixed LoRA vs vLLM-cpu"] = systems[ours]["tokens_per_s"] / vllm
        same = sum(a == b for a, b in zip(outputs[ours], outputs["vLLM-cpu mixed LoRA"]))
        ratios["greedy outputs equal to vLLM-cpu"] = f"{same}/{len(prompts)}"

    print(f"\n{'system':38s} {'tok/s':>8s} {'TTFT p50':>9s} {'TTFT p99':>9s} {'TPOT p50':>9s} {'TPOT p99':>9s}")
    for name, s in systems.items():
        cells = [f"{s[k]:8.1f}ms" if s[k] is not None else f"{'n/a':>10s}"
                 for k in ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms")]
        print(f"{name:38s} {s['tokens_per_s']:8.1f} " + " ".join(cells))
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x" if isinstance(v, float) else f"{k}: {v}")
    result = {
        "header": {"device": "cpu", "cpu": cpu_name(), "threads": args.threads,
                   "model": str(args.model), "dtype": "float32", "torch": torch.__version__,
                   "created": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        "workload": {"requests": args.requests, "new_tokens": args.new_tokens, "adapters": names,
                     "repeats": args.repeats},
        "systems": systems, "ratios": ratios,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
