"""Randomized differential check of every supported architecture against transformers + peft.

    OMP_NUM_THREADS=1 python scripts/fuzz_architectures.py [--seeds 0:18] [--archs gemma3,phi3]
        [--compile-every 6] [--out profiles/cpu/fuzz_architectures.json]

Each seed draws a random tiny model of one architecture (seed mod the architectures listed),
1-3 random PEFT adapters and prompts (`scripts/arch_fuzz_cases.py`), computes each request's
greedy tokens with transformers + peft alone (EOS a token like any other, as ignore_eos), and
runs the same batch, mixed over the adapters and the base model, through the engine under
several settings (`engine_options`; with --compile-every K, every K-th seed also compiled).
A token that differs is a mismatch unless transformers' own forward there prefers its token by
no more than 1e-4 of the largest logit (a tie, or transformers against itself:
`first_difference`). Prints a line per seed and a summary, writes every difference with its
seed, configuration and setting to JSON; exits 1 when any is a mismatch.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "scripts")]

from arch_fuzz_cases import ARCHS, adapter_config, engine_options, model_config, prompts  # noqa: E402
from helpers import peft_greedy, peft_reference, save_peft_adapter, save_random_hf_model, with_adapter  # noqa: E402

from caraserve.config import AdapterConfig, CpuAssistConfig, EngineConfig, ModelConfig  # noqa: E402
from caraserve.engine import Engine  # noqa: E402
from caraserve.profiling.machine import cpu_header, write_json  # noqa: E402
from caraserve.request import SamplingParams  # noqa: E402


@torch.no_grad()
def first_difference(peft, prompt, adapter, want, got) -> dict | None:
    """Where got leaves want, and by how much transformers' own forward over the sequence so far
    prefers its token to ours there (relative to the largest logit). Within 1e-4, or below zero,
    it is no mismatch: a tie, or generate's rounding against its forward's (another attention
    kernel, the last row's head alone) on a model that amplifies it (random weights, large B)."""
    j = next((i for i, (x, y) in enumerate(zip(want, got)) if x != y), None)
    if j is None:
        return None
    logits = with_adapter(peft, adapter, lambda: peft(input_ids=torch.tensor([prompt + want[:j]])).logits[0, -1])
    gap = float(logits[want[j]] - logits[got[j]]) / max(float(logits.abs().max()), 1e-12)
    return {"position": j, "want": want[j], "got": got[j], "relative_gap": gap, "tie": gap <= 1e-4}


def engine_tokens(root: Path, opts: dict, batch, owners, first_round: int, new_tokens: int) -> list[list[int]]:
    kw = {k: opts[k] for k in ("kv_block_size", "num_kv_blocks", "max_tokens_per_step") if k in opts}
    if opts.get("cpu_assist"):
        kw["cpu_assist"] = CpuAssistConfig(mode="on", threads=1, emulate_copy_gbps=0.01, pipeline_layers=1)
    engine = Engine(EngineConfig(
        model=ModelConfig(path=str(root / "base"), dtype="float32"),
        adapters=AdapterConfig(dir=str(root / "adapters"), rank_buckets=(8, 16), device_slots=opts.get("slots", 2),
                               preload="host"),
        max_batch_size=opts.get("max_batch_size", 8), max_seq_len=64, device="cpu",
        compile=opts.get("compile", "false"), compile_cache_dir=str(root / "compiled"), **kw))
    try:
        params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
        rounds = [(0, first_round), (first_round, len(batch))] if opts.get("two_rounds") else [(0, len(batch))]
        return [r.output_ids for lo, hi in rounds for r in engine.generate(batch[lo:hi], params, owners[lo:hi])]
    finally:
        engine.close()


def run_seed(seed: int, archs: tuple[str, ...], compile_every: int, work: Path) -> dict:
    rng = random.Random(seed)
    arch = archs[seed % len(archs)]
    cfg = model_config(rng, arch)
    adapters = [adapter_config(rng, arch, cfg["num_hidden_layers"]) for _ in range(rng.randint(1, 3))]
    batch, owners, first_round = prompts(rng, len(adapters))
    new_tokens = rng.choice((8, 10, 12))
    root = work / f"seed{seed}"
    save_random_hf_model(root / "base", arch, seed=seed, **cfg)
    for i, kw in enumerate(adapters):
        save_peft_adapter(root / "base", root / "adapters" / f"a{i}", seed=1000 + 10 * seed + i, **kw)
    peft = peft_reference(root / "base", {f"a{i}": root / "adapters" / f"a{i}" for i in range(len(adapters))})
    want = peft_greedy(peft, list(zip(batch, owners)), new_tokens)
    options = engine_options(rng, max(map(len, batch)) + new_tokens)
    if compile_every and seed % compile_every == 0:
        options.append({"name": "compiled", "compile": "true"})
    found = []
    for opts in options:
        got = engine_tokens(root, opts, batch, owners, first_round, new_tokens)
        for i, (p, a, w, g) in enumerate(zip(batch, owners, want, got)):
            diff = first_difference(peft, p, a, w, g)
            if diff is not None:
                found.append({"setting": opts["name"], "request": i, "adapter": a, "prompt": p, **diff})
    return {"seed": seed, "arch": arch, "config": cfg, "adapters": adapters, "settings": [o["name"] for o in options],
            "mismatches": found}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default=f"0:{2 * len(ARCHS)}", help="first:end")
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--compile-every", type=int, default=0)
    ap.add_argument("--out", default="profiles/cpu/fuzz_architectures.json")
    args = ap.parse_args()
    archs = tuple(a for a in args.archs.split(",") if a)
    unknown = sorted(set(archs) - set(ARCHS))
    if unknown or not archs:
        ap.error(f"--archs: {unknown or 'none given'}; known: {', '.join(ARCHS)}")
    first, end = (int(x) for x in args.seeds.split(":"))
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory(prefix="fuzz-arch-") as work:
        for seed in range(first, end):
            t0 = time.perf_counter()
            res = run_seed(seed, archs, args.compile_every, Path(work))
            real = [m for m in res["mismatches"] if not m["tie"]]
            print(f"seed {seed:4d} {res['arch']:8s} {len(res['settings'])} settings  {len(real)} mismatches  "
                  f"{len(res['mismatches']) - len(real)} ties  {time.perf_counter() - t0:5.1f} s", flush=True)
            results.append(res)
    real = [(r["seed"], m) for r in results for m in r["mismatches"] if not m["tie"]]
    print(f"{len(results)} configurations, {sum(len(r['settings']) for r in results)} engine runs: "
          f"{len(real)} real mismatches, {sum(len(r['mismatches']) for r in results) - len(real)} ties")
    write_json(args.out, {"header": cpu_header(command=" ".join(sys.argv), torch=torch.__version__),
                          "summary": {"configurations": len(results), "mismatches": len(real)}, "results": results})
    return 1 if real else 0


if __name__ == "__main__":
    sys.exit(main())
