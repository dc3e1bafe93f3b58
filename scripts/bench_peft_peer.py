"""Mixed-LoRA decode throughput vs Hugging Face transformers + peft, same model, adapters and prompts.

    python scripts/bench_peft_peer.py [--shape llama2-7b|small] [--batch 32] [--adapters 32]
        [--targets all|attn] [--prompt-tokens 128] [--new-tokens 32] [--compile true|capture] [--out PATH]

Builds a model of the given shape with random weights on the device (caraserve.model.synthetic,
no checkpoint) and hands the very same weight tensors to a transformers LlamaForCausalLM (no
copy). `--adapters` random adapters of ranks 8/16/32/64 (caraserve.lora.synthetic, seeded) go into
the engine's host tier and, transposed into lora_A / lora_B, into a peft model with
lora_alpha = scale x rank, so both compute y += scale * (x A) B. One batch of `--batch` prompts
(random token ids of one length, request i on adapter i mod N) is generated greedily by both:
the engine (`engine.compile` as given) and peft's batched `generate(adapter_names=...)`. Each
system runs once to warm up, then `--repeats` times; the median tokens/s of each and their ratio
are printed and written as JSON with a provenance header, with how many greedy outputs agree
(random weights leave many near ties, so low-precision runs may differ). `--shape small` runs
on a CPU in under a minute (to check the script).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from caraserve.lora.synthetic import random_lora
from caraserve.model.llama import checkpoint_tensors
from caraserve.model.synthetic import SHAPES, random_model
from caraserve.profiling.machine import cpu_name, source_commit

RANKS = (8, 16, 32, 64)
TARGETS = {"all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
           "attn": ("q_proj", "k_proj", "v_proj", "o_proj")}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--targets", default="all", choices=sorted(TARGETS))
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--compile", default="true", choices=["false", "true", "auto", "capture"],
                    help="the engine's engine.compile; capture: true with engine.cuda_graphs=capture (CUDA "
                         "graphs of the eager forward, no inductor compile)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--out", default=None, help="default: profiles/<cpu|gpu>/peft_peer_<shape>.json")
    return ap.parse_args()


def hf_twin(model, shape: str):
    """A transformers LlamaForCausalLM over the same parameter tensors as `model` (assigned, not
    copied: `checkpoint_tensors` names them as the checkpoint does, fused projections as row views)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    device = model.lm_head.weight.device
    cfg = LlamaConfig(architectures=["LlamaForCausalLM"], **SHAPES[shape])
    with torch.device("meta"):
        hf = LlamaForCausalLM(cfg)
    state = checkpoint_tensors(model)
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    if unexpected or any("rotary_emb" not in k for k in missing):
        raise RuntimeError(f"weights do not map onto LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    with torch.device(device):
        hf.model.rotary_emb = LlamaRotaryEmbedding(config=cfg)
    return hf.eval()


def same_dtype(fn) -> dict:
    """autocast_adapter_dtype=False where peft's `fn` takes it."""
    import inspect

    return {"autocast_adapter_dtype": False} if "autocast_adapter_dtype" in inspect.signature(fn).parameters else {}


def with_adapters(hf, loras):
    """`hf` wrapped by peft with every adapter of `loras` (LoraWeights), weights copied in."""
    from peft import LoraConfig, get_peft_model

    model = None
    for w in loras:
        cfg = LoraConfig(r=w.rank, lora_alpha=w.scale * w.rank, target_modules=list(w.a), lora_dropout=0.0)
        # autocast_adapter_dtype=False: the adapters in the model's dtype, as ours (peft would
        # upcast bf16 adapters to float32 and compute them there); older peft has no such option
        if model is None:
            model = get_peft_model(hf, cfg, adapter_name=w.name, **same_dtype(get_peft_model))
        else:
            model.add_adapter(w.name, cfg, **same_dtype(model.add_adapter))
    layers = model.base_model.model.model.layers
    with torch.no_grad():
        for w in loras:
            for m in w.a:
                for i, layer in enumerate(layers):
                    mod = getattr(layer.self_attn if hasattr(layer.self_attn, m) else layer.mlp, m)
                    mod.lora_A[w.name].weight.copy_(w.a[m][i].T)  # [r, in] (copy_ casts and moves)
                    mod.lora_B[w.name].weight.copy_(w.b[m][i].T)  # [out, r]
    return model.eval()


def run_ours(engine, prompts, adapters, new_tokens) -> tuple[float, list[list[int]]]:
    from caraserve.request import SamplingParams

    engine.kv.reset_prefix_cache()  # cold, as the peer: the warm-up and earlier repeats ran these prompts
    t0 = time.perf_counter()
    reqs = engine.generate(prompts, SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True), adapters)
    wall = time.perf_counter() - t0
    return len(prompts) * new_tokens / wall, [r.output_ids for r in reqs]


def run_peft(model, prompts, adapters, new_tokens) -> tuple[float, list[list[int]]]:
    device = model.base_model.model.lm_head.weight.device
    ids = torch.tensor(prompts, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        sync()
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=adapters,
                             do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
        sync()
        wall = time.perf_counter() - t0
    return len(prompts) * new_tokens / wall, out[:, ids.shape[1]:].tolist()



def main() -> None:
    from caraserve.config import AdapterConfig, EngineConfig, ModelConfig
    from caraserve.engine import Engine

    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    targets = TARGETS[args.targets]
    model = random_model(args.shape, dtype, device)
    names = [f"lora{i}-r{RANKS[i % len(RANKS)]}" for i in range(args.adapters)]
    loras = [random_lora(n, RANKS[i % len(RANKS)], model.args, targets, seed=i) for i, n in enumerate(names)]
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, model.args.vocab_size, (args.prompt_tokens,), generator=g).tolist()
               for _ in range(args.batch)]
    adapters = [names[i % len(names)] for i in range(args.batch)]
    peer = with_adapters(hf_twin(model, args.shape), loras)
    engine = Engine(EngineConfig(
        model=ModelConfig(path=f"random-{args.shape}"),
        adapters=AdapterConfig(dir="none", rank_buckets=RANKS, target_modules=targets,
                               device_slots=-(-args.adapters // len(RANKS))),
        device=device.type, max_batch_size=args.batch, max_seq_len=args.prompt_tokens + args.new_tokens + 8,
        num_kv_blocks=args.batch * -(-(args.prompt_tokens + args.new_tokens + 8) // 16),
        compile="true" if args.compile == "capture" else args.compile, compile_cache_dir="",
        cuda_graphs="capture" if args.compile == "capture" else "compile"), model=model)
    for w in loras:
        engine.store.add(w)
    systems = {"caraserve": lambda: run_ours(engine, prompts, adapters, args.new_tokens),
               "transformers+peft": lambda: run_peft(peer, prompts, adapters, args.new_tokens)}
    runs, outputs = {k: [] for k in systems}, {}
    for fn in systems.values():
        fn()  # warm-up (and, for ours, the compile)
    for _ in range(args.repeats):  # alternating, so drift hits both alike
        for name, fn in systems.items():
            tps, outputs[name] = fn()
            runs[name].append(tps)
    med = {k: statistics.median(v) for k, v in runs.items()}
    same = sum(a == b for a, b in zip(outputs["caraserve"], outputs["transformers+peft"]))
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    report = {
        "header": {"device": dev_name, "model": args.shape, "dtype": str(dtype), "torch": torch.__version__,
                   "commit": source_commit(), "command": "python scripts/bench_peft_peer.py " + " ".join(
                       f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
                   "created": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        "workload": {"batch": args.batch, "adapters": args.adapters, "ranks": RANKS, "targets": targets,
                     "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "compile": args.compile},
        "tokens_per_s": runs, "median_tokens_per_s": med,
        "ratio_caraserve_vs_peft": med["caraserve"] / med["transformers+peft"],
        "greedy_outputs_equal": f"{same}/{len(prompts)}",
    }
    out = Path(args.out or f"profiles/{'gpu' if device.type == 'cuda' else 'cpu'}/peft_peer_{args.shape}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{dev_name}: {args.shape} {dtype}, batch {args.batch}, {args.adapters} adapters r{RANKS} on "
          f"{','.join(targets)}, {args.new_tokens} new tokens")
    for k, v in med.items():
        print(f"{k:20s} {v:9.0f} tok/s  (runs {', '.join(f'{x:.0f}' for x in runs[k])})")
    print(f"caraserve / transformers+peft: {report['ratio_caraserve_vs_peft']:.2f}x; greedy outputs equal "
          f"{report['greedy_outputs_equal']}\nwrote {out}")


if __name__ == "__main__":
    main()
