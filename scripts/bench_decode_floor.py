"""Decode step time vs the memory-bandwidth floor, LoRA vs base, compiled (CUDA graphs) vs eager.

    python scripts/bench_decode_floor.py [--shape llama2-7b|small] [--batch 32] [--adapters 32]
        [--targets attn|all] [--prompt-tokens 128] [--steps 32] [--dtype bfloat16]
        [--out profiles/<device>/decode_floor.json]

Builds a model of the given shape with random weights directly on the device (no download, no
checkpoint on disk) and `--adapters` random in-memory LoRA adapters of ranks 8/16/32/64 on
q/k/v/o (`--targets attn`) or on all seven projections (`--targets all`). In the same run it
measures the device's copy bandwidth and reports
  floor       = bytes of the base weights / bandwidth (a decode step must read them all once)
  step        = median decode step time of a full batch (TPOT), per mode:
                {eager, compiled, captured} x {base only, mixed LoRA}
                (captured: engine.cuda_graphs=capture, CUDA graphs of the eager forward, no compile)
and the ratios step/floor, LoRA/base and compiled/eager. The floor counts what every step must
read: the base weights, and the KV cache of the batch's contexts (`kv_floor_ms`: weights + KV, the
base rows' own floor); a mixed-LoRA step also reads the weights of each distinct adapter in the
batch (`lora_floor_ms`), so `lora_floor_ms / kv_floor_ms` is the smallest LoRA / base step ratio
the memory allows. Each row reports its step over the weights-only floor (`step_over_floor`) and
over its own floor (`step_over_own_floor`). Writes JSON with a provenance header.
`--shape small` runs the same on a CPU in a minute (to check the script).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

from caraserve.model.synthetic import SHAPES, random_model
from caraserve.profiling.machine import cpu_name
from caraserve.profiling.timing import copy_bandwidth_gbs

RANKS = (8, 16, 32, 64)
MODE_LABELS = {"false": "eager", "true": "compiled", "capture": "captured"}
TARGETS = {"attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
           "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}


def kv_bytes_per_step(model_args, batch: int, prompt_tokens: int, steps: int, elem: int) -> float:
    """Mean KV bytes a decode step of the measured run reads: every row its own context (keys and
    values of every layer), which runs from prompt_tokens + 1 to prompt_tokens + steps - 1."""
    per_token = model_args.num_layers * 2 * model_args.num_kv_heads * model_args.head_dim * elem
    return batch * (prompt_tokens + steps / 2) * per_token


def adapter_bytes(model_args, ranks, targets, elem: int) -> int:
    """Bytes of the A and B weights of adapters of these ranks on these modules, every layer."""
    per_rank = sum(sum(model_args.module_shape(m)) for m in targets) * model_args.num_layers * elem
    return sum(ranks) * per_rank


def measure(engine, prompts, adapters, steps) -> dict:
    from caraserve.request import SamplingParams

    sp = SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True)
    engine.generate(prompts, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), adapters)  # warm
    t0 = time.perf_counter()
    reqs = engine.generate(prompts, sp, adapters)
    wall = time.perf_counter() - t0
    tpot = statistics.median((r.finish_s - r.first_token_s) / (len(r.output_ids) - 1) for r in reqs)
    return {"tpot_ms": tpot * 1e3, "tokens_per_s": len(reqs) * steps / wall}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--targets", default="attn", choices=sorted(TARGETS), help="modules the adapters adapt")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--modes", default="false,true",
                    help="engine.compile modes to run, and capture (compile=true with engine.cuda_graphs=capture)")
    ap.add_argument("--workloads", default="base,mixed", help="base (no adapters) and/or mixed (LoRA rows)")
    ap.add_argument("--out", default=None)
    return ap.parse_args()


def run_mode(args, mode: str, model, device: torch.device, names: list[str], prompts) -> tuple[dict, dict | None]:
    """The rows of one engine.compile mode (base only and/or mixed LoRA) and its compile notes."""
    from caraserve.config import AdapterConfig, EngineConfig, ModelConfig
    from caraserve.engine import Engine
    from caraserve.lora.synthetic import random_lora

    cfg = EngineConfig(
        model=ModelConfig(path=f"random-{args.shape}"),
        adapters=AdapterConfig(dir="none", rank_buckets=RANKS, target_modules=TARGETS[args.targets],
                               device_slots=-(-args.adapters // len(RANKS))),
        device=device.type, max_batch_size=args.batch, max_seq_len=args.prompt_tokens + args.steps + 8,
        num_kv_blocks=args.batch * -(-(args.prompt_tokens + args.steps + 8) // 16),  # what the batch needs
        compile="true" if mode == "capture" else mode, compile_cache_dir="",
        cuda_graphs="capture" if mode == "capture" else "compile")
    engine = Engine(cfg, model=model)
    engine.warm_up()  # (captured graphs are made here; compiled ones at their first step)
    for i, n in enumerate(names):
        engine.store.add(random_lora(n, RANKS[i % len(RANKS)], model.args, TARGETS[args.targets], seed=i))
    label = MODE_LABELS.get(mode, f"compile={mode}")
    rows = {}
    if "base" in args.workloads.split(","):
        rows[f"{label} base only"] = measure(engine, prompts, [None] * args.batch, args.steps)
    if "mixed" in args.workloads.split(","):
        mixed = [names[i % len(names)] for i in range(args.batch)]
        rows[f"{label} mixed LoRA"] = measure(engine, prompts, mixed, args.steps)
    notes = None
    if engine.graphs is not None:  # variants that failed to compile or capture ran eagerly
        notes = {"compile_s": engine.graphs.compile_s, "cudagraph_skips": cudagraph_skips(),
                 "failed_variants": sorted(map(list, engine.graphs.failed))}
    del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, notes


def print_report(report: dict) -> None:
    h, w = report["header"], report["workload"]
    print(f"\n{h['device']}: {h['model']} {h['dtype']}, batch {w['batch']}, {w['adapters']} adapters ranks {RANKS}")
    print(f"weights {report['weight_bytes'] / 1e9:.2f} GB, KV {report['kv_bytes_per_step'] / 1e9:.2f} GB/step, "
          f"adapters {report['adapter_bytes_per_step'] / 1e9:.2f} GB/step, copy bandwidth "
          f"{report['copy_bandwidth_gbs']:.0f} GB/s; floors (ms/step): weights {report['floor_ms']:.3f}, "
          f"+ KV {report['kv_floor_ms']:.3f}, + adapters {report['lora_floor_ms']:.3f}")
    print(f"{'mode':26s} {'step ms':>9s} {'tok/s':>9s} {'step/weights':>12s} {'step/own floor':>14s}")
    for k, r in report["rows"].items():
        print(f"{k:26s} {r['tpot_ms']:9.3f} {r['tokens_per_s']:9.0f} {r['step_over_floor']:11.2f}x "
              f"{r['step_over_own_floor']:13.2f}x")
    for k, v in report["ratios"].items():
        print(f"{k}: {v:.2f}x")
    for k, v in report["compile"].items():
        if "error" in v:
            print(f"{k}: FAILED ({v['error']})")
            continue
        print(f"{k}: compile {v['compile_s']:.1f} s, CUDA-graph skips {v['cudagraph_skips'] or 'none'}"
              + (f", variants left eager {v['failed_variants']}" if v["failed_variants"] else ""))


def main():
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch._logging.set_logs(perf_hints=True)  # prints why a compiled step was not CUDA-graphed
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = random_model(args.shape, dtype, device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = copy_bandwidth_gbs(device)
    floor_ms = weight_bytes / (bw * 1e9) * 1e3
    names = [f"lora{i}-r{RANKS[i % len(RANKS)]}" for i in range(args.adapters)]
    elem = torch.empty((), dtype=dtype).element_size()
    kv_bytes = kv_bytes_per_step(model.args, args.batch, args.prompt_tokens, args.steps, elem)
    in_batch = [RANKS[i % len(RANKS)] for i in range(min(args.batch, args.adapters))]  # the distinct adapters
    lora_bytes = adapter_bytes(model.args, in_batch, TARGETS[args.targets], elem)
    floors = {"weights": floor_ms, "base": (weight_bytes + kv_bytes) / (bw * 1e9) * 1e3,
              "lora": (weight_bytes + kv_bytes + lora_bytes) / (bw * 1e9) * 1e3}
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, model.args.vocab_size, (args.prompt_tokens,), generator=g).tolist()
               for _ in range(args.batch)]
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    out = Path(args.out or f"profiles/{device.type}/decode_floor_{args.shape}.json")
    rows, notes, failed = {}, {}, []
    for mode in args.modes.split(","):
        label = MODE_LABELS.get(mode, f"compile={mode}")
        try:
            mode_rows, mode_notes = run_mode(args, mode, model, device, names, prompts)
        except Exception as e:  # the other modes' rows are still worth the device time
            traceback.print_exc()
            failed.append(mode)
            mode_rows, mode_notes = {}, {"error": f"{type(e).__name__}: {e}"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.update(mode_rows)
        if mode_notes is not None:
            notes[label] = mode_notes
        # written after every mode: a run stopped during a later mode's compile keeps the earlier rows
        report = {
            "header": {"device": dev_name, "model": args.shape, "dtype": str(dtype), "torch": torch.__version__,
                       "created": datetime.now(timezone.utc).isoformat(timespec="seconds")},
            "workload": {"batch": args.batch, "adapters": args.adapters, "ranks": RANKS,
                         "targets": TARGETS[args.targets],
                         "prompt_tokens": args.prompt_tokens, "steps": args.steps},
            "weight_bytes": weight_bytes, "kv_bytes_per_step": kv_bytes, "adapter_bytes_per_step": lora_bytes,
            "copy_bandwidth_gbs": bw, "floor_ms": floor_ms, "kv_floor_ms": floors["base"],
            "lora_floor_ms": floors["lora"], "rows": rows, "ratios": ratios_of(rows, floors), "compile": notes,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
    print_report(report)
    print(f"wrote {out}")
    if failed:
        raise SystemExit(f"modes that failed: {', '.join(failed)} (their errors are in the report)")


def cudagraph_skips() -> int:
    """Compiled graphs that torch's CUDA-graph trees declined to record (the reasons go to the
    perf-hints log, switched on in main)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def ratios_of(rows: dict, floors: dict) -> dict:
    """Each row's step over the weights-only floor and over its own (base: + KV; LoRA: + adapters),
    and the ratios between rows."""
    for label, r in rows.items():
        r["step_over_floor"] = r["tpot_ms"] / floors["weights"]
        r["step_over_own_floor"] = r["tpot_ms"] / floors["lora" if label.endswith("mixed LoRA") else "base"]
    ratios = {"floors: LoRA / base (the least a LoRA step can cost)": floors["lora"] / floors["base"]}
    for label in MODE_LABELS.values():
        if f"{label} base only" in rows and f"{label} mixed LoRA" in rows:
            lora, base = rows[f"{label} mixed LoRA"], rows[f"{label} base only"]
            ratios[f"{label}: LoRA / base step"] = lora["tpot_ms"] / base["tpot_ms"]
    for kind in ("base only", "mixed LoRA"):
        if f"captured {kind}" in rows and f"compiled {kind}" in rows:
            ratios[f"{kind}: captured / compiled step"] = (rows[f"captured {kind}"]["tpot_ms"]
                                                           / rows[f"compiled {kind}"]["tpot_ms"])
    if any(k.startswith("compiled") for k in rows) and any(k.startswith("eager") for k in rows):
        for kind in ("base only", "mixed LoRA"):
            if f"compiled {kind}" not in rows or f"eager {kind}" not in rows:
                continue
            compiled, eager = rows[f"compiled {kind}"], rows[f"eager {kind}"]
            ratios[f"{kind}: compiled / eager step"] = compiled["tpot_ms"] / eager["tpot_ms"]
    return ratios


if __name__ == "__main__":
    main()
