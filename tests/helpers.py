"""Shared builders for tests: random tiny Hugging Face checkpoints and a plain reference."""

from __future__ import annotations

import torch

from caraserve.kv_cache import KVCache, blocks_for
from caraserve.model.batch import ForwardBatch

# test architecture -> (transformers config class, model class); gemma3-mm is Gemma 3's language
# model inside its multimodal checkpoint, made from a text config (mistral3-mm: Mistral's inside
# Mistral 3's; llava-mm: Qwen2's inside LLaVA's; qwen2_5_vl-mm: Qwen2.5-VL's)
_HF_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    "granite": ("GraniteConfig", "GraniteForCausalLM"),
    "ministral": ("MinistralConfig", "MinistralForCausalLM"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM"),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM"),
    "exaone4": ("Exaone4Config", "Exaone4ForCausalLM"),
    "seed_oss": ("SeedOssConfig", "SeedOssForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM"),
    "glm": ("GlmConfig", "GlmForCausalLM"),
    "glm4": ("Glm4Config", "Glm4ForCausalLM"),
    "cohere": ("CohereConfig", "CohereForCausalLM"),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM"),
    "helium": ("HeliumConfig", "HeliumForCausalLM"),
    "ernie4_5": ("Ernie4_5Config", "Ernie4_5ForCausalLM"),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM"),
    "hunyuan": ("HunYuanDenseV1Config", "HunYuanDenseV1ForCausalLM"),
    "phi": ("PhiConfig", "PhiForCausalLM"),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM"),
    "nemotron": ("NemotronConfig", "NemotronForCausalLM"),
    "arcee": ("ArceeConfig", "ArceeForCausalLM"),
    "olmo": ("OlmoConfig", "OlmoForCausalLM"),
    "gemma3-mm": ("Gemma3TextConfig", "Gemma3ForConditionalGeneration"),
    "mistral3-mm": ("MistralConfig", "Mistral3ForConditionalGeneration"),
    "llava-mm": ("Qwen2Config", "LlavaForConditionalGeneration"),
    "qwen2_5_vl-mm": ("Qwen2Config", "Qwen2_5_VLForConditionalGeneration"),
}


def _hf_classes(arch: str):
    """(config class, model class) of a test architecture (_HF_CLASSES)."""
    import transformers

    config, model = _HF_CLASSES[arch]
    return getattr(transformers, config), getattr(transformers, model)


def save_random_hf_model(folder, arch: str = "llama", seed: int = 0, **overrides):
    """Writes a random tiny HF checkpoint of `arch` to folder and returns the HF model (float32)."""
    cfg_cls, model_cls = _hf_classes(arch)
    kw = dict(
        vocab_size=128, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    if arch in ("phi3", "gemma", "gemma2", "gemma3", "gemma3-mm", "mistral3-mm", "olmo2", "olmo3", "smollm3",
                "ministral", "exaone4", "seed_oss", "mixtral", "qwen3_moe", "olmoe",
                "qwen2_moe", "granitemoe", "glm", "glm4", "cohere", "cohere2", "helium", "ernie4_5",
                "starcoder2", "hunyuan", "phi", "stablelm", "nemotron", "arcee", "olmo"):
        # their defaults name token ids past this vocabulary, heads of 256, or no head_dim (Ministral)
        kw.update(pad_token_id=0, bos_token_id=1, eos_token_id=2, head_dim=16)
    if arch in ("mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "granitemoe"):  # 4 experts of 32, two a token
        kw.update(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
        if arch == "qwen2_moe":  # and a shared expert of 48
            kw["shared_expert_intermediate_size"] = 48
        if arch in ("olmoe", "granitemoe"):  # (their experts' size is intermediate_size)
            kw.pop("num_local_experts" if arch == "olmoe" else "num_experts")
            kw["intermediate_size"] = 32
    kw.update(overrides)
    cfg = cfg_cls(**kw)
    if arch == "gemma3-mm":  # the text model inside a multimodal checkpoint, a one-layer vision tower
        from transformers import Gemma3Config

        cfg = Gemma3Config(text_config=cfg.to_dict(), tie_word_embeddings=cfg.tie_word_embeddings,
                           vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                              num_attention_heads=2, image_size=28, patch_size=14),
                           mm_tokens_per_image=4, image_token_index=127, boi_token_index=125, eoi_token_index=126)
    if arch in ("mistral3-mm", "llava-mm"):  # a one-layer vision tower (Pixtral's, CLIP's)
        from transformers import LlavaConfig, Mistral3Config

        vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                      image_size=28, patch_size=14)
        mm_cls = Mistral3Config if arch == "mistral3-mm" else LlavaConfig
        cfg = mm_cls(text_config=cfg.to_dict(), tie_word_embeddings=cfg.tie_word_embeddings,
                     vision_config=vision | ({"head_dim": 16} if arch == "mistral3-mm" else {}), image_token_index=127)
    if arch == "qwen2_5_vl-mm":  # its text model's rope split over 3 axes; a one-block vision tower
        from transformers import Qwen2_5_VLConfig

        half = cfg.hidden_size // cfg.num_attention_heads // 2  # (its attention's heads: hidden / heads)
        sections = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
        text = cfg.to_dict() | {"rope_parameters": dict(cfg.rope_parameters, mrope_section=sections)}
        cfg = Qwen2_5_VLConfig(text_config=text, tie_word_embeddings=cfg.tie_word_embeddings, image_token_id=127,
                               video_token_id=126, vision_start_token_id=125,
                               vision_config=dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2,
                                                  out_hidden_size=cfg.hidden_size, window_size=28,
                                                  fullatt_block_indexes=[0]))
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # larger weights than the default init: sharper logits
            # (a LayerNorm's bias as large would add one vector to every position: tokens repeat;
            # Phi's projections and head all have biases, which as large do the same)
            p.normal_(0, 0.01 if "norm.bias" in name or (arch == "phi" and name.endswith(".bias")) else 0.1)
    model.save_pretrained(str(folder), safe_serialization=True)
    return model


def load_hf_model(folder):
    """The float32 transformers model of a checkpoint folder: AutoModelForCausalLM's, or for the
    multimodal classes it does not map (Mistral 3, LLaVA, Qwen2.5-VL) the checkpoint's own class."""
    import transformers

    arch = transformers.AutoConfig.from_pretrained(str(folder)).architectures[0]
    own = arch in ("Mistral3ForConditionalGeneration", "LlavaForConditionalGeneration",
                   "Qwen2_5_VLForConditionalGeneration")
    cls = getattr(transformers, arch) if own else transformers.AutoModelForCausalLM
    return cls.from_pretrained(str(folder), dtype=torch.float32)


def block_tables_for(lengths: list[int], block_size: int, layout: str = "in_order") -> tuple[list[list[int]], int]:
    """(a block table per sequence holding `lengths[i]` positions, blocks used). in_order: each
    sequence's blocks consecutive; scattered: every block id shuffled and dealt out round-robin,
    so no sequence's blocks are adjacent or ascending."""
    need = [blocks_for(n, block_size) for n in lengths]
    ids = list(range(1, sum(need) + 1))  # block 0 is the cache's scratch block
    if layout == "in_order":
        tables, start = [], 0
        for k in need:
            tables.append(ids[start : start + k])
            start += k
        return tables, len(ids)
    if layout != "scattered":
        raise ValueError(layout)
    ids = [ids[i] for i in torch.randperm(len(ids), generator=torch.Generator().manual_seed(0)).tolist()]
    tables = [[] for _ in lengths]
    while ids:
        for i, k in enumerate(need):
            if len(tables[i]) < k and ids:
                tables[i].append(ids.pop())
    return tables, sum(need)


def run_prefill_decode(model, prompts, decode_tokens, device="cpu", lora_fn=None, block_size=16, layout="in_order"):
    """Prefill all prompts in one packed batch, then decode the given tokens in batched steps.

    decode_tokens[i][t] is the token fed to sequence i at decode step t. lora_fn(is_decode): the
    step's LoraBatch (the model's adapter pool attached with use_lora). block_size and layout
    (block_tables_for) place each sequence's KV in the paged cache. Returns (prefill logits per
    prompt [len_i, V], decode logits per step [B, V]).
    """
    a = model.args
    dtype = model.model.embed_tokens.weight.dtype
    tables, used = block_tables_for([len(p) + len(d) for p, d in zip(prompts, decode_tokens)], block_size, layout)
    kv = KVCache(used, block_size, a.num_kv_heads, a.head_dim, dtype, model.layer_devices())
    mode = model.prepare_lora(lora_fn(False) if lora_fn else None)
    fb = ForwardBatch.build(prompts, [0] * len(prompts), tables, block_size, device, is_decode=False, lora_mode=mode)
    logits = model(fb, kv.layers, all_logits=True)
    pre, start = [], 0
    for p in prompts:
        pre.append(logits[start : start + len(p)])
        start += len(p)
    lens = [len(p) for p in prompts]
    steps = []
    for t in range(len(decode_tokens[0])):
        mode = model.prepare_lora(lora_fn(True) if lora_fn else None)
        fb = ForwardBatch.build([[d[t]] for d in decode_tokens], lens, tables, block_size, device, is_decode=True,
                                lora_mode=mode)
        steps.append(model(fb, kv.layers))
        lens = [n + 1 for n in lens]
    return pre, steps


def save_peft_adapter(base_folder, out_folder, seed: int, **lora_kwargs):
    """Trains nothing: wraps the HF model in peft with random (nonzero) A and B and saves it."""
    from peft import LoraConfig, get_peft_model
    base = load_hf_model(base_folder)
    kw = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
              bias="none", task_type="CAUSAL_LM", init_lora_weights=False)
    kw.update(lora_kwargs)
    torch.manual_seed(seed)
    pm = get_peft_model(base, LoraConfig(**kw))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(3.0)
    pm.save_pretrained(str(out_folder))
    return out_folder


def peft_logits(base_folder, adapter_folder, tokens):
    """Logits [len, V] of transformers (+ peft when adapter_folder) for one sequence alone."""
    model = load_hf_model(base_folder).eval()
    if adapter_folder is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_folder)).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0]


def peft_reference(base_folder, adapters: dict):
    """transformers + peft with every adapter of `adapters` ({name: folder}) loaded by its name,
    in eval mode, with no end token: as the engine's ignore_eos, EOS is a token like any other."""
    from peft import PeftModel

    base = load_hf_model(base_folder).eval()
    base.generation_config.eos_token_id = None
    (first, folder), *rest = adapters.items()
    peft = PeftModel.from_pretrained(base, str(folder), adapter_name=first)
    for name, folder in rest:
        peft.load_adapter(str(folder), adapter_name=name)
    return peft.eval()


def with_adapter(peft, adapter: str | None, fn):
    """fn() with `adapter` active in a peft_reference model (None: the base model)."""
    if adapter is None:
        with peft.disable_adapter():
            return fn()
    peft.set_adapter(adapter)
    return fn()


@torch.no_grad()
def peft_greedy(peft, requests, new_tokens: int) -> list[list[int]]:
    """Each (prompt ids, adapter or None) request's greedy tokens alone, from a peft_reference
    model (the attention mask given: generate would mask out prompt tokens equal to the pad id)."""
    kw = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    out = []
    for ids, adapter in requests:
        x = torch.tensor([ids])
        seq = with_adapter(peft, adapter,
                           lambda x=x: peft.generate(input_ids=x, attention_mask=torch.ones_like(x), **kw))
        out.append(seq[0, len(ids):].tolist())
    return out


def copy_adapter(src, dst):
    """A copy of the adapter folder `src` at `dst` (to break without touching the original)."""
    import shutil

    shutil.copytree(src, dst)
    return dst


def edit_config(folder, **fields) -> None:
    """Overwrites fields of the adapter's adapter_config.json."""
    import json

    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(fields)
    path.write_text(json.dumps(cfg))


def failing_weight_reads(monkeypatch, *errors: BaseException) -> list:
    """Makes the next safetensors weight reads raise `errors` (in order), later ones read as
    usual; returns the queue, to which a test may add more."""
    import safetensors.torch

    real, queue = safetensors.torch.load_file, list(errors)

    def flaky(*a, **k):
        if queue:
            raise queue.pop(0)
        return real(*a, **k)

    monkeypatch.setattr(safetensors.torch, "load_file", flaky)
    return queue


def make_runs(layout, in_f, out_f, ranks, g):
    """Runs over consecutive rows: layout = rows per run (0 = a gap of base rows)."""
    runs, row = [], 0
    for i, n in enumerate(layout):
        if n > 0:
            r = ranks[i % len(ranks)]
            a = torch.randn(in_f, r, generator=g) * 0.1
            b = torch.randn(r, out_f, generator=g) * 0.1
            runs.append((row, row + n, a, b, 0.25 + i))
        row += max(n, 2)
    return runs, row


class RunsGroup:
    """The part of a LoraGroup that add_lora_runs reads."""

    def __init__(self, runs, modules=("q_proj",)):
        self._runs, self.modules = runs, frozenset(modules)

    def cpu_runs(self, layer, name):
        return self._runs


def lora_reference(y, x, runs):
    """y + scale * (x A) B over each (start, end, A, B, scale) run's rows, in float64."""
    out = y.double().clone()
    for start, end, a, b, scale in runs:
        out[start:end] += scale * (x[start:end].double() @ a.double()) @ b.double()
    return out


def assert_lora_runs_exact() -> None:
    """add_lora_runs over two runs equals the float64 reference (whichever path it takes)."""
    from caraserve.lora.ops import add_lora_runs

    g = torch.Generator().manual_seed(5)
    runs, rows = make_runs([3, 5], 16, 24, (8,), g)
    x, y = torch.randn(rows, 16, generator=g), torch.randn(rows, 24, generator=g)
    want = lora_reference(y, x, runs)
    add_lora_runs(y, x, (RunsGroup(runs),), 0, "q_proj", {})
    assert torch.allclose(y.double(), want, rtol=1e-5, atol=1e-5)


def tiny_pool(rank_buckets=(8, 16, 32, 64), slots: int = 2, device="cpu", targets=None):
    """(model args, host store of the demo adapters, an empty DevicePool) for the embedded tiny
    model: what the LoRA backend tests build their layouts from."""
    from transformers import AutoConfig

    from caraserve.lora.device_pool import DevicePool
    from caraserve.lora.host_store import HostStore
    from caraserve.model.llama import ModelArgs
    from caraserve.model.tiny import tiny_paths

    model_dir, adapters = tiny_paths()
    args = ModelArgs.from_hf(AutoConfig.from_pretrained(str(model_dir)))
    store = HostStore(args)
    store.register_dir(adapters)
    kw = {} if targets is None else {"targets": tuple(targets)}
    pool = DevicePool(args, tuple(rank_buckets), slots, torch.float32, [torch.device(device)] * args.num_layers, **kw)
    return args, store, pool
