"""The embedded default: a small Llama with seeded random weights, a byte-level BPE tokenizer
trained offline on the Python standard library's sources, and four demo PEFT adapters.

Everything is made locally once, written into a cache folder (`$CARASERVE_CACHE`, default
`~/.cache/caraserve`) and reused; nothing is downloaded.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

if TYPE_CHECKING:
    from caraserve.config import EngineConfig

log = logging.getLogger(__name__)

VERSION = "v1"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)
TINY_SHAPE = dict(
    hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=4096,
)
# name -> (rank, alpha, target modules, rslora): different ranks, targets and scalings on purpose
DEMO_ADAPTERS = {
    "demo-r8": (8, 16, ["q_proj", "v_proj"], False),
    "demo-r16": (16, 16, ["q_proj", "k_proj", "v_proj", "o_proj"], False),
    "demo-r32": (32, 64, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False),
    "demo-r64": (64, 32, ["o_proj", "gate_proj", "up_proj", "down_proj"], True),
}


def cache_root() -> Path:
    return Path(os.environ.get("CARASERVE_CACHE", Path.home() / ".cache" / "caraserve"))


def tiny_paths() -> tuple[Path, Path]:
    """(model folder, demo adapter folder) of the embedded default, made on first use."""
    root = cache_root() / f"tiny-{VERSION}"
    if not (root / "done").is_file():
        _build(root)
    return root / "model", root / "adapters"


def resolve_paths(cfg: EngineConfig) -> tuple[Path, Path | None]:
    """(model folder, adapter folder or None); "tiny" and "demo" name the embedded default."""
    model_path, adapter_dir = cfg.model.path, cfg.adapters.dir
    if model_path == "tiny" or adapter_dir == "demo":
        tiny_model, tiny_adapters = tiny_paths()
        model_path = tiny_model if model_path == "tiny" else model_path
        adapter_dir = tiny_adapters if adapter_dir == "demo" else adapter_dir
    return Path(model_path), (Path(adapter_dir) if adapter_dir not in ("", None, "none") else None)


def _build(root: Path) -> None:
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=root.parent))
    try:
        log.info("building the embedded tiny model in %s (once)", root)
        vocab = _build_tokenizer(tmp / "model")
        _build_model(tmp / "model", vocab)
        for name, spec in DEMO_ADAPTERS.items():
            write_random_adapter(tmp / "adapters" / name, *spec, seed=sum(map(ord, name)))
        (tmp / "done").write_text(VERSION)
        try:
            tmp.rename(root)
        except OSError:  # another process finished first: keep its copy
            if not (root / "done").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _build_tokenizer(folder: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:120]
    if not files:
        raise RuntimeError("no training text for the tiny tokenizer: the Python stdlib sources are missing")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=8000, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train(files, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        model_max_length=TINY_SHAPE["max_position_embeddings"],
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(str(folder))
    return len(hf_tok)


def _build_model(folder: Path, vocab: int) -> None:
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"], dtype="float32", **TINY_SHAPE,
    )
    cfg.save_pretrained(str(folder))
    g = torch.Generator().manual_seed(0)
    h, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    hd = h // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * hd

    def w(*shape, std=0.05):
        return torch.randn(*shape, generator=g) * std

    tensors = {"model.embed_tokens.weight": w(vocab, h, std=0.5), "model.norm.weight": torch.ones(h),
               "lm_head.weight": w(vocab, h, std=0.1)}
    for layer in range(n):
        p = f"model.layers.{layer}."
        tensors.update({
            p + "input_layernorm.weight": torch.ones(h),
            p + "post_attention_layernorm.weight": torch.ones(h),
            p + "self_attn.q_proj.weight": w(h, h), p + "self_attn.k_proj.weight": w(kv, h),
            p + "self_attn.v_proj.weight": w(kv, h), p + "self_attn.o_proj.weight": w(h, h),
            p + "mlp.gate_proj.weight": w(i, h), p + "mlp.up_proj.weight": w(i, h),
            p + "mlp.down_proj.weight": w(h, i),
        })
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def write_random_adapter(
    folder: Path,
    rank: int,
    alpha: float,
    targets: list[str],
    rslora: bool = False,
    seed: int = 0,
    shape: dict | None = None,
    std: float = 0.05,
) -> None:
    """Writes a PEFT-format LoRA adapter with seeded random A and B (both nonzero, so it changes
    the model's output) for a Llama of `shape` (default: the tiny model)."""
    shape = shape or TINY_SHAPE
    h, i = shape["hidden_size"], shape["intermediate_size"]
    hd = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * hd
    dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(shape["num_hidden_layers"]):
        for t in targets:
            parent = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{parent}.{t}"
            fan_in, fan_out = dims[t]
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) / fan_in**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * std
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
        "target_modules": targets, "lora_dropout": 0.0, "bias": "none", "use_rslora": rslora,
        "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None,
        "base_model_name_or_path": None, "inference_mode": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
