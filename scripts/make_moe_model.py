"""A seeded random mixture-of-experts model and four attention adapters, for benchmarks on a CPU.

    python scripts/make_moe_model.py [--out /tmp/moe-demo] [--arch mixtral|qwen3_moe] [--experts 8] [--top-k 2]
    OMP_NUM_THREADS=1 python scripts/bench_engine.py --model /tmp/moe-demo/model --adapters /tmp/moe-demo/adapters \\
        --out profiles/cpu/bench_engine_moe.json

The model has the embedded default's size and tokenizer (hidden 256, 4 layers, vocab 8000), with
every layer's MLP replaced by `--experts` SwiGLU experts of the default's MLP size, `--top-k` a
token; the adapters (ranks 8, 16, 32, 64) adapt q/k/v/o, as LoRA on such a model does here.
Nothing is downloaded: the weights are drawn from a seed.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

RANKS = (8, 16, 32, 64)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def make_model(out: Path, arch: str, experts: int, top_k: int) -> None:
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    from caraserve.model.tiny import tiny_paths

    tiny, _ = tiny_paths()
    tok = AutoTokenizer.from_pretrained(str(tiny))
    shape = dict(vocab_size=len(tok), hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, head_dim=64, max_position_embeddings=2048, num_experts_per_tok=top_k,
                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "mixtral":
        cfg, cls = MixtralConfig(intermediate_size=688, num_local_experts=experts, **shape), MixtralForCausalLM
    else:
        cfg, cls = Qwen3MoeConfig(moe_intermediate_size=688, num_experts=experts, norm_topk_prob=True,
                                  **shape), Qwen3MoeForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.05)
    model.save_pretrained(str(out / "model"), safe_serialization=True)
    for f in tiny.iterdir():
        if "token" in f.name or f.suffix == ".jinja":
            shutil.copy(f, out / "model" / f.name)


def make_adapters(out: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    for i, r in enumerate(RANKS):
        base = AutoModelForCausalLM.from_pretrained(str(out / "model"), dtype=torch.float32)
        torch.manual_seed(100 + i)
        peft = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=ATTENTION, lora_dropout=0.0,
                                               task_type="CAUSAL_LM", init_lora_weights=False))
        peft.save_pretrained(str(out / "adapters" / f"moe-r{r}"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/moe-demo")
    ap.add_argument("--arch", choices=("mixtral", "qwen3_moe"), default="mixtral")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    args = ap.parse_args()
    if not 0 < args.top_k <= args.experts:
        ap.error(f"--top-k {args.top_k} must be between 1 and --experts {args.experts}")
    out = Path(args.out)
    make_model(out, args.arch, args.experts, args.top_k)
    make_adapters(out)
    print(f"model: {out / 'model'}\nadapters: {out / 'adapters'}")


if __name__ == "__main__":
    main()
