"""Cold vs warm start of a compiled engine: the same job run twice in fresh processes.

    python scripts/bench_warm_start.py [--rounds 1] [--out profiles/cpu/bench_warm_start.json]
    python scripts/bench_warm_start.py --shape llama2-7b [--batch 8] [--out profiles/gpu/warm_start_llama2-7b.json]

Each round runs the job twice: first with an empty compile cache folder, then again with the
folder the first run filled; the two runs' outputs must be equal. Without --shape the job is
`scripts/generate.py` with `engine.compile=true` on the demo prompts (base and adapter rows, so
both the base and the LoRA decode variants compile), timed from process start to exit. With
--shape the job builds a model of that shape with random weights on the device
(caraserve.model.synthetic) and four random adapters (ranks 8-64, all seven modules), and serves
one batch of `--batch` requests (half base, half adapters; 8 tokens each) with
`engine.compile=true`: it reports the time from process launch to the first token and to the
batch's last token (the decode steps compile at their first use, so the second includes every
compile or cache load). With --shape, a third run per round uses engine.cuda_graphs=capture (CUDA
graphs of the eager forward, captured before the first step, nothing compiled) on an empty
cache: the start-up a server gets with no compile cache at all (on a CPU, where there is nothing
to capture, it compiles as the cold run does).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_once(cache_dir: Path, out: Path) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)  # the engine keeps inductor's cache beside its own
    cmd = [sys.executable, str(ROOT / "scripts" / "generate.py"), "engine.compile=true",
           f"engine.compile_cache_dir={cache_dir}", "engine.max_batch_size=8", f"output={out}", "progress=false"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def run_shape(args, cache_dir: Path, out: Path, graphs: str = "compile") -> dict:
    """One --shape job in a fresh process: seconds from launch to its first and last token."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    launched = time.time()
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "--shape", args.shape,
                    "--batch", str(args.batch), "--cache", str(cache_dir), "--result", str(out),
                    "--cuda-graphs", graphs],
                   check=True, cwd=ROOT, env=env)
    result = json.loads(out.read_text())
    return {"first_token_s": result["first_token_at"] - launched, "last_token_s": result["last_token_at"] - launched,
            "outputs": result["outputs"]}


def child(args) -> None:
    """The --shape job (runs in the process being timed)."""
    import torch

    from caraserve.config import AdapterConfig, EngineConfig, ModelConfig
    from caraserve.engine import Engine
    from caraserve.lora.synthetic import random_lora
    from caraserve.model.synthetic import random_model
    from caraserve.request import SamplingParams

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = random_model(args.shape, torch.bfloat16 if device.type == "cuda" else torch.float32, device)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    engine = Engine(EngineConfig(
        model=ModelConfig(path=f"random-{args.shape}"), device=device.type, compile="true",
        compile_cache_dir=args.cache, cuda_graphs=args.cuda_graphs, max_batch_size=args.batch, max_seq_len=64,
        num_kv_blocks=args.batch * 4, adapters=AdapterConfig(dir="none", rank_buckets=(8, 16, 32, 64),
                                                             target_modules=targets, device_slots=1)), model=model)
    names = []
    for i, rank in enumerate((8, 16, 32, 64)):
        engine.store.add(random_lora(f"a{rank}", rank, model.args, targets, seed=i))
        names.append(f"a{rank}")
    engine.warm_up()  # as a server does before it serves (captured graphs are made here)
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    for i in range(args.batch):
        prompt = torch.randint(0, model.args.vocab_size, (24,), generator=g).tolist()
        engine.add_request(prompt, params, None if i % 2 == 0 else names[i // 2 % len(names)])
    first, outputs = None, {}
    while engine.has_unfinished():
        for o in engine.step():
            first = first or time.time()
            outputs.setdefault(o.request_id, []).extend(o.new_token_ids)
    Path(args.result).write_text(json.dumps({"first_token_at": first, "last_token_at": time.time(),
                                             "outputs": [outputs[k] for k in sorted(outputs)]}))


def main_shape(args) -> None:
    import torch

    cold, warm, captured = [], [], []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="caraserve-warm-") as tmp:
            tmp = Path(tmp)
            cold.append(run_shape(args, tmp / "compiled", tmp / "cold.json"))
            warm.append(run_shape(args, tmp / "compiled", tmp / "warm.json"))
            try:  # (a failed captured start must not cost the cold and warm rows)
                captured.append(run_shape(args, tmp / "empty", tmp / "captured.json", graphs="capture"))
            except subprocess.CalledProcessError as e:
                captured.append({"error": f"exit {e.returncode}", "first_token_s": float("nan"),
                                 "last_token_s": float("nan"), "outputs": None})
        outputs = cold[-1].pop("outputs")
        if warm[-1].pop("outputs") != outputs:
            raise SystemExit("the warm start's outputs differ from the cold start's")
        # (bfloat16 GEMMs outside inductor may round differently: reported, not required)
        captured[-1]["same_outputs_as_compiled"] = captured[-1].pop("outputs") == outputs
        c, w, k = cold[-1], warm[-1], captured[-1]
        print(f"round {r + 1}: first token cold {c['first_token_s']:.1f} s / warm {w['first_token_s']:.1f} s / "
              f"captured {k['first_token_s']:.1f} s; last token cold {c['last_token_s']:.1f} s / warm "
              f"{w['last_token_s']:.1f} s / captured {k['last_token_s']:.1f} s")
    runs_of = (("cold", cold), ("warm", warm), ("captured", captured))
    med = {f"{kind}_{key}": statistics.median(x[key] for x in runs) for kind, runs in runs_of
           for key in ("first_token_s", "last_token_s")}
    ratios = {"warm_vs_cold_first_token": med["warm_first_token_s"] / med["cold_first_token_s"],
              "warm_vs_cold_last_token": med["warm_last_token_s"] / med["cold_last_token_s"],
              "captured_vs_cold_first_token": med["captured_first_token_s"] / med["cold_first_token_s"],
              "captured_vs_cold_last_token": med["captured_last_token_s"] / med["cold_last_token_s"]}
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"header": {"device": device, "model": args.shape, "torch": torch.__version__,
                         "command": f"python scripts/bench_warm_start.py --shape {args.shape} --batch {args.batch}",
                         "created": datetime.now(timezone.utc).isoformat(timespec="seconds")},
              "cold": cold, "warm": warm, "captured": captured, "medians": med, "ratios": ratios}
    out = Path(args.out or f"profiles/{'gpu' if torch.cuda.is_available() else 'cpu'}/warm_start_{args.shape}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    if any("error" in k for k in captured):
        raise SystemExit("a captured start failed (see its error in the report)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=1)
    from caraserve.model.synthetic import SHAPES

    ap.add_argument("--shape", default=None, choices=sorted(SHAPES), help="a caraserve.model.synthetic shape")
    ap.add_argument("--batch", type=int, default=8, help="--shape: requests in the batch")
    ap.add_argument("--out", default=None, help="default: profiles/cpu/bench_warm_start.json, "
                                                "or profiles/<cpu|gpu>/warm_start_<shape>.json with --shape")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--cuda-graphs", default="compile", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.shape:
        return main_shape(args)
    args.out = args.out or "profiles/cpu/bench_warm_start.json"
    from caraserve.profiling.machine import cpu_name

    cold, warm = [], []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="caraserve-warm-") as tmp:
            tmp = Path(tmp)
            cold.append(run_once(tmp / "compiled", tmp / "cold.jsonl"))
            warm.append(run_once(tmp / "compiled", tmp / "warm.jsonl"))
            if (tmp / "cold.jsonl").read_text() != (tmp / "warm.jsonl").read_text():
                raise SystemExit("the warm start's outputs differ from the cold start's")
        print(f"round {r + 1}: cold start {cold[-1]:.1f} s, warm start {warm[-1]:.1f} s")
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"\nmedian: cold {c:.1f} s, warm {w:.1f} s -> warm start {c / w:.1f}x faster")
    result = {"header": {"cpu": cpu_name(), "threads": int(os.environ.get("OMP_NUM_THREADS", "1")),
                         "created": datetime.now(timezone.utc).isoformat(timespec="seconds")},
              "cold_s": cold, "warm_s": warm, "ratio": c / w}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
