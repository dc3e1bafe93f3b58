"""Random model configurations, PEFT adapters and prompts for scripts/fuzz_architectures.py: each
architecture's options drawn over what its transformers config accepts (GQA/MQA/MHA, head sizes
apart from hidden / heads, tied heads, biases, sliding windows shorter than the prompts, every
supported rope type, Gemma 3's and OLMo 3's rope per layer type, rope over part of each head
(Phi-3, GLM, Phi, StableLM, Nemotron), soft caps, Granite's and Cohere's multipliers, SmolLM3's
layers without rope, Cohere's, Phi's and StableLM's q/k LayerNorms, parallel layers, the
activations of MLPs without a gate), and adapters over random targets with rank / alpha
patterns, layers_to_transform and rsLoRA."""

from __future__ import annotations

import random

# (gemma3-mm: Gemma 3's language model inside its multimodal checkpoint; mistral3-mm: Mistral's inside
# Mistral 3's; llava-mm: Qwen2's inside LLaVA's; qwen2_5_vl-mm: Qwen2.5-VL's)
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3", "granite", "gemma3-mm",
         "olmo2", "olmo3", "smollm3", "ministral", "exaone4", "seed_oss", "mixtral", "qwen3_moe",
         "olmoe", "qwen2_moe", "granitemoe", "glm", "glm4", "cohere", "cohere2", "helium",
         "ernie4_5", "starcoder2", "mistral3-mm", "llava-mm",
         "hunyuan", "qwen2_5_vl-mm", "phi", "stablelm", "nemotron", "arcee", "olmo")
MOE = ("mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "granitemoe")
SPLIT = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # Phi-3's checkpoint and adapter names
GLM = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")  # GLM's (gate/up fused)
STARCODER2 = ("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj")  # (an MLP without a gate)
PHI = ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")  # (o named dense, an MLP without a gate)
VOCAB = 128  # tests/helpers.save_random_hf_model's


def rope(rng: random.Random, theta: float | None = None) -> dict:
    kind = rng.choice(("default", "linear", "llama3", "yarn"))
    out = {"rope_type": kind, "rope_theta": theta or rng.choice((10000.0, 500.0, 1e6, 50.0))}
    if kind == "linear":
        out["factor"] = rng.choice((2.0, 4.0, 8.0))
    elif kind == "llama3":
        out.update(factor=rng.choice((4.0, 8.0)), low_freq_factor=1.0, high_freq_factor=rng.choice((2.0, 4.0)),
                   original_max_position_embeddings=rng.choice((16, 32, 64)))
    elif kind == "yarn":
        out.update(factor=rng.choice((2.0, 4.0, 8.0)), original_max_position_embeddings=rng.choice((64, 128)))
    return out


def _biases_and_norms(rng: random.Random, arch: str, cfg: dict, hidden: int, heads: int) -> None:
    """Draws the family's biases, norm options, activation and head size constraints into cfg."""
    gemma3 = arch in ("gemma3", "gemma3-mm")
    if (arch in ("llama", "qwen3", "gemma", "gemma2", "granite", "olmo2", "olmo3", "smollm3", "olmoe", "granitemoe",
                 "hunyuan") or gemma3) \
            and rng.random() < 0.4:
        cfg["attention_bias"] = True
    if arch in ("glm", "glm4"):
        cfg["attention_bias"] = rng.random() < 0.7
    if arch in ("cohere", "cohere2"):  # (LayerNorms: their eps is layer_norm_eps)
        cfg.update(attention_bias=rng.random() < 0.4, layer_norm_eps=cfg["rms_norm_eps"],
                   logit_scale=rng.choice((0.0625, 0.5, 1.0, 2.0)))
    if arch == "cohere":
        cfg["use_qk_norm"] = rng.random() < 0.5
    if arch == "helium":  # (its o_proj reads hidden_size columns: heads of hidden / heads)
        cfg.update(attention_bias=rng.random() < 0.4, mlp_bias=rng.random() < 0.3, head_dim=hidden // heads)
    if arch == "qwen2_5_vl-mm":  # (its text attention's heads are hidden / heads, whatever head_dim says)
        cfg["head_dim"] = hidden // heads
    if arch == "ernie4_5":
        cfg["use_bias"] = rng.random() < 0.5
    if arch == "starcoder2":  # (LayerNorms: their eps is norm_epsilon)
        cfg.update(use_bias=rng.random() < 0.5, norm_epsilon=cfg["rms_norm_eps"])
    if arch in ("phi", "stablelm"):  # (LayerNorms: their eps is layer_norm_eps; heads of hidden / heads)
        cfg.update(layer_norm_eps=cfg["rms_norm_eps"], head_dim=hidden // heads, qk_layernorm=rng.random() < 0.5)
    if arch == "phi":
        cfg["hidden_act"] = rng.choice(("gelu_new", "gelu_pytorch_tanh", "gelu"))
    if arch == "stablelm":
        cfg.update(use_qkv_bias=rng.random() < 0.5, use_parallel_residual=rng.random() < 0.5)
    if arch == "olmo":
        cfg.update(attention_bias=rng.random() < 0.4, clip_qkv=rng.choice((None, 0.5, 3.0)))
    if arch in ("nemotron", "arcee"):  # (Nemotron's LayerNorms: their eps is norm_eps)
        cfg.update(attention_bias=rng.random() < 0.4, mlp_bias=rng.random() < 0.4, norm_eps=cfg["rms_norm_eps"],
                   hidden_act=rng.choice(("relu2", "relu2", "gelu_new", "silu")))
    if arch == "seed_oss":
        cfg.update(attention_bias=rng.random() < 0.7, attention_out_bias=rng.random() < 0.4)
    if arch in ("llama", "granite", "smollm3", "seed_oss") and rng.random() < 0.3:
        cfg["mlp_bias"] = True


def model_config(rng: random.Random, arch: str) -> dict:
    """save_random_hf_model overrides of one random model of `arch`."""
    heads = rng.choice((1, 2, 3, 4, 6))
    layers = rng.randint(1, 3)
    hidden = rng.choice([h for h in range(32, 97, 8) if h % heads == 0])  # (Gemma 3 checks it)
    cfg = dict(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
               num_key_value_heads=rng.choice([d for d in range(1, heads + 1) if heads % d == 0]),
               head_dim=rng.choice((8, 12, 16, 24, 32)), intermediate_size=rng.choice((32, 48, 80, 112)),
               tie_word_embeddings=rng.random() < 0.5, rms_norm_eps=rng.choice((1e-6, 1e-5)))
    gemma3 = arch in ("gemma3", "gemma3-mm")
    _biases_and_norms(rng, arch, cfg, hidden, heads)
    window = rng.randint(3, 8)
    types = [rng.choice(("sliding_attention", "full_attention")) for _ in range(layers)]
    if arch in ("mistral", "phi3", "mixtral", "starcoder2", "mistral3-mm") and rng.random() < 0.7:
        cfg["sliding_window"] = window
    if arch in MOE:
        experts = rng.choice((2, 3, 4, 8))
        cfg.update(num_local_experts=experts, num_experts=experts, num_experts_per_tok=rng.randint(1, min(experts, 4)),
                   moe_intermediate_size=rng.choice((16, 24, 40)), norm_topk_prob=rng.random() < 0.5)
    if arch == "olmoe":  # (its experts' size is intermediate_size; q/k norms over all heads need head_dim apart)
        cfg.update(intermediate_size=cfg["moe_intermediate_size"], head_dim=hidden // heads,
                   clip_qkv=rng.choice((None, 0.5, 3.0)))
    if arch == "granitemoe":  # (its experts' size is intermediate_size; Llama's heads of hidden / heads)
        cfg.update(intermediate_size=cfg["moe_intermediate_size"], head_dim=hidden // heads)
    if arch == "qwen2_moe":
        cfg.update(shared_expert_intermediate_size=rng.choice((16, 48)), qkv_bias=rng.random() < 0.7)
    if arch == "qwen2_moe" and rng.random() < 0.6:  # (Qwen2's windows: below max_window_layers)
        cfg.update(use_sliding_window=True, sliding_window=window, max_window_layers=rng.randint(0, layers))
    if arch == "qwen3_moe" and rng.random() < 0.4:
        cfg.update(use_sliding_window=True, sliding_window=window)
    if arch in ("qwen2", "qwen3", "llava-mm", "qwen2_5_vl-mm") and rng.random() < 0.6:
        cfg.update(use_sliding_window=True, sliding_window=window, max_window_layers=rng.randint(0, layers))
    if arch == "gemma2" or gemma3:
        cfg.update(sliding_window=window, layer_types=types, query_pre_attn_scalar=rng.choice((8, 24, 100)),
                   final_logit_softcapping=rng.choice((None, 3.0, 30.0)))
    if arch == "gemma2":
        cfg["attn_logit_softcapping"] = rng.choice((None, 2.0, 50.0))
    if arch in ("olmo3", "ministral", "cohere2") or (arch in ("smollm3", "exaone4") and rng.random() < 0.6):
        cfg.update(sliding_window=window, layer_types=types, use_sliding_window=True)
    elif arch == "exaone4":  # no window: every layer full, with rope
        cfg.update(sliding_window=None, layer_types=["full_attention"] * layers)
    if arch == "smollm3":
        cfg["no_rope_layers"] = [rng.choice((0, 1)) for _ in range(layers)]
    if gemma3 or arch == "olmo3":
        cfg["rope_parameters"] = {"full_attention": rope(rng, rng.choice((1e6, 1e4))),
                                  "sliding_attention": rope(rng, rng.choice((1e4, 100.0)))}
    elif arch in ("glm", "glm4", "phi", "stablelm", "nemotron"):  # rope over part of each head (GLM's: pairs)
        cfg["rope_parameters"] = rope(rng) | {"partial_rotary_factor": rng.choice((1.0, 0.5, 0.4, 0.25))}
        if int(cfg["head_dim"] * cfg["rope_parameters"]["partial_rotary_factor"]) % 2:
            cfg["rope_parameters"]["partial_rotary_factor"] = 1.0
    elif arch == "hunyuan" and rng.random() < 0.5:  # its fixed NTK alpha
        cfg["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": rng.choice((1e4, 500.0)),
                                  "alpha": rng.choice((10.0, 1000.0)), "factor": 1.0}
    elif arch != "phi3":
        cfg["rope_parameters"] = rope(rng)
    else:  # Phi-4-mini's rope over part of each head; Phi-3.5's longrope over a short original context
        partial = rng.choice((1.0, 0.5, 0.75))
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": partial}
        if rng.random() < 0.5:  # (transformers checks the factors against heads of hidden / heads)
            cfg["head_dim"] = hidden // heads
            if int(cfg["head_dim"] * partial) % 2:  # (its factors cannot cover an odd rotary width)
                cfg["rope_parameters"]["partial_rotary_factor"] = partial = 1.0
            half = int(cfg["head_dim"] * partial) // 2
            cfg["rope_parameters"].update(rope_type="longrope", short_factor=[rng.uniform(1, 3) for _ in range(half)],
                                          long_factor=[rng.uniform(0.05, 8) for _ in range(half)])
            cfg.update(original_max_position_embeddings=rng.randint(4, 24), max_position_embeddings=512)
    if arch in ("granite", "granitemoe"):
        cfg.update(embedding_multiplier=rng.choice((1.0, 3.0, 12.0)), attention_multiplier=rng.choice((0.05, 0.2)),
                   residual_multiplier=rng.choice((0.2, 0.5, 1.0)), logits_scaling=rng.choice((1.0, 2.0, 8.0)))
    return cfg


def adapter_config(rng: random.Random, arch: str, layers: int) -> dict:
    """save_peft_adapter keywords of one random adapter for a model of `arch`."""
    names = FUSED if arch == "phi3" else GLM if arch in ("glm", "glm4") else STARCODER2 if arch == "starcoder2" \
        else PHI if arch == "phi" else SPLIT[:4] if arch in MOE else \
        tuple(m for m in SPLIT if m != "gate_proj") if arch in ("nemotron", "arcee") else SPLIT
    # (all-linear on a mixture-of-experts model adapts its experts, which is refused)
    targets = "all-linear" if rng.random() < 0.2 and arch not in MOE else rng.sample(names, rng.randint(1, len(names)))
    used = names if targets == "all-linear" else targets
    kw = dict(r=rng.choice((2, 4, 8, 16)), lora_alpha=rng.choice((1, 4, 8, 16, 32)), target_modules=targets)
    if rng.random() < 0.3:
        module = rng.choice(used)
        parent = "mlp" if any(w in module for w in ("gate", "up", "down", "fc", "c_proj")) else "self_attn"
        key = module if rng.random() < 0.5 else f"layers.{rng.randrange(layers)}.{parent}.{module}"
        kw["rank_pattern"] = {key: rng.choice((2, 4, 8, 16))}
    if rng.random() < 0.3:
        kw["alpha_pattern"] = {rng.choice(used): rng.choice((2, 64))}
    if rng.random() < 0.3 and layers > 1 and targets != "all-linear":
        kw["layers_to_transform"] = sorted(rng.sample(range(layers), rng.randint(1, layers - 1)))
    if rng.random() < 0.15:
        kw["use_rslora"] = True
    return kw


def prompts(rng: random.Random, adapters: int) -> tuple[list[list[int]], list[str | None], int]:
    """(prompts, each one's adapter, n): the first n of 3-5 random prompts, then as many sharing a
    prefix of 8 tokens or more with them, on the same adapter (prefix-cache hits)."""
    names = [None] + [f"a{i}" for i in range(adapters)]
    first = [[rng.randrange(VOCAB) for _ in range(rng.choice((1, 2, 5, 9, 13, 17, 20, 31, 40)))]
             for _ in range(rng.randint(3, 5))]
    owners = [names[i % len(names)] for i in range(len(first))]
    second = []
    for p in first:
        if len(p) >= 9:
            second.append(p[: rng.randint(8, len(p))] + [rng.randrange(VOCAB) for _ in range(rng.randint(0, 6))])
        else:
            second.append([rng.randrange(VOCAB) for _ in range(rng.randint(1, 12))])
    return first + second, owners + owners, len(first)


def engine_options(rng: random.Random, longest: int) -> list[dict]:
    """The engine settings each configuration runs under: eager with the default cache; a cache
    small enough to preempt; chunked prefill; two rounds (the second hits the prefix cache); one
    device slot a bucket with odd block sizes; CPU-assisted prefill."""
    return [
        {"name": "eager"},
        {"name": "small_kv", "kv_block_size": 4, "num_kv_blocks": -(-longest // 4) + rng.randint(1, 3)},
        {"name": "chunked", "max_batch_size": 4, "max_tokens_per_step": rng.choice((4, 5, 7))},
        {"name": "prefix_hits", "kv_block_size": 4, "two_rounds": True},
        {"name": "one_slot", "slots": 1, "kv_block_size": rng.choice((1, 2, 8))},
        {"name": "cpu_assist", "slots": 1, "cpu_assist": True},
    ]
