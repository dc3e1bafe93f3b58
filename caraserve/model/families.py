"""The architectures served and what sets their families apart, as tables; and the readers of
the config fields whose meaning differs by family (biases, the MLP's activation, multipliers)."""

from __future__ import annotations

import math

from caraserve.config_checks import UnsupportedModelError
from caraserve.lora.module_patterns import FUSED_PARTS

# projections the checkpoint (and its adapters) name otherwise than we do, theirs -> ours: the MLPs
# without a gate (StarCoder2's c_fc / c_proj, Phi's fc1 / fc2: up and down) and Phi's attention output
RENAMED = {"starcoder2": {"c_fc": "up_proj", "c_proj": "down_proj"},
           "phi": {"dense": "o_proj", "fc1": "up_proj", "fc2": "down_proj"}}
# an MLP without a gate, down(act(up(x))): StarCoder2's, Phi's; Nemotron's and Arcee's (ReLU²)
PLAIN_MLPS = ("starcoder2", "phi", "nemotron", "arcee")
# activations of the MLPs that take any of transformers' (ACT2FN): the served ones, by our name
PLAIN_ACTIVATIONS = {"relu2": "relu2", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
                     "silu": "silu"}
# torch's LayerNorms with biases where the others have RMSNorms; Phi's and StableLM's attention
# turns the first partial_rotary_factor of each head (rotate_half), as Phi-3's does
TORCH_LAYER_NORMS = ("starcoder2", "phi", "stablelm", "nemotron")  # (Nemotron's weights 1's offset)
# PEFT's target_modules where an adapter's config names none (its defaults by model type); the
# other families with q_proj and v_proj take those two
PEFT_DEFAULT_TARGETS = {"phi": ("q_proj", "v_proj", "fc1", "fc2")}

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "GraniteForCausalLM": "granite",
    "MinistralForCausalLM": "ministral",
    "Olmo2ForCausalLM": "olmo2",
    "Olmo3ForCausalLM": "olmo3",
    "SmolLM3ForCausalLM": "smollm3",
    "Exaone4ForCausalLM": "exaone4",
    "SeedOssForCausalLM": "seed_oss",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "OlmoeForCausalLM": "olmoe",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "GraniteMoeForCausalLM": "granitemoe",
    "GlmForCausalLM": "glm",
    "Glm4ForCausalLM": "glm4",
    "CohereForCausalLM": "cohere",
    "Cohere2ForCausalLM": "cohere2",
    "HeliumForCausalLM": "helium",
    "Ernie4_5ForCausalLM": "ernie4_5",
    "Starcoder2ForCausalLM": "starcoder2",
    "HunYuanDenseV1ForCausalLM": "hunyuan",
    "PhiForCausalLM": "phi",
    "StableLmForCausalLM": "stablelm",
    "NemotronForCausalLM": "nemotron",
    "ArceeForCausalLM": "arcee",
    "OlmoForCausalLM": "olmo",
}
# mixture-of-experts families -> the family whose attention and norms they share (OLMoE's own:
# Llama's layers with q/k norms over all heads and clipped q/k/v)
MOE_BASES = {"mixtral": "mistral", "qwen3_moe": "qwen3", "olmoe": "olmoe", "qwen2_moe": "qwen2",
             "granitemoe": "granite"}
GEMMAS = ("gemma", "gemma2", "gemma3")
OLMOS = ("olmo2", "olmo3")
WHOLE_QK_NORMS = (*OLMOS, "olmoe")  # one q norm and one k norm over all heads
POST_NORMS = (*OLMOS, "exaone4")  # a norm after attention and after the MLP, none before them
GLMS = ("glm", "glm4")  # q/k/v bias, gate/up fused in the checkpoint, rope over pairs (2i, 2i + 1) of part of a head
# LayerNorms (no bias), attention and the MLP side by side on one normed input, rope over pairs (2i, 2i + 1)
COHERES = ("cohere", "cohere2")
# rope over the pairs (2i, 2i + 1) of a head (GLM's, Cohere's; Helium and ERNIE 4.5: Llama's layers otherwise)
INTERLEAVED_ROPE = (*GLMS, *COHERES, "helium", "ernie4_5")


def norm_fields(cfg, family: str) -> dict:
    """ModelArgs' fields of the family's norms: their kind, eps and forms, the final one's name,
    and the q/k norms."""
    return dict(
        rms_eps=cfg.layer_norm_eps if family in (*COHERES, "phi", "stablelm") else
        cfg.norm_epsilon if family == "starcoder2" else cfg.norm_eps if family == "nemotron" else
        1e-5 if family == "olmo" else cfg.rms_norm_eps,  # (OLMo's LayerNorms: a fixed eps)
        layer_norm="cohere" if family in COHERES else "torch" if family in TORCH_LAYER_NORMS else
        "plain" if family == "olmo" else "",
        norm_unit_offset=family in (*GEMMAS, "nemotron"),
        norm_float32_weight=family in (*OLMOS, "helium"),
        final_norm="final_layernorm" if family == "phi" else "norm",
        qk_norm=family in ("qwen3", "gemma3", "exaone4", "hunyuan", *WHOLE_QK_NORMS) or (
            family == "cohere" and bool(getattr(cfg, "use_qk_norm", False))) or (
            family in ("phi", "stablelm") and bool(getattr(cfg, "qk_layernorm", False))),
        qk_norm_per_head=family not in WHOLE_QK_NORMS,
        qk_norm_head_weights=family in ("cohere", "stablelm"),
        qk_norm_after_rope=family == "hunyuan",
    )


def projection_fields(cfg, family: str) -> dict:
    """ModelArgs' fields of the family's projections: fused or renamed in the checkpoint, the MLP's
    form and activation, the head's bias, PEFT's default targets."""
    return dict(
        fused_checkpoint=tuple(FUSED_PARTS) if family == "phi3" else ("gate_up_proj",) if family in GLMS else (),
        renamed=tuple(RENAMED.get(family, {}).items()),
        mlp_gated=family not in PLAIN_MLPS,
        activation=mlp_activation(cfg, family),
        head_bias=family == "phi",
        peft_default_targets=PEFT_DEFAULT_TARGETS.get(family),
    )


def biases(cfg, family: str) -> tuple[bool, bool, bool]:
    """(q/k/v, o, MLP) biases as transformers reads them: attention_bias on q/k/v and o for Llama,
    Qwen3, Gemma, OLMo (1-3), OLMoE, SmolLM3, Cohere, HunYuan, Nemotron and Arcee; none on attention for
    Mistral, Ministral, Phi-3 and EXAONE 4; Qwen2's on q/k/v always, GLM's and Helium's on q/k/v
    where attention_bias says (Helium's MLP's where mlp_bias does), ERNIE 4.5's and StarCoder2's
    everywhere where use_bias does, Phi's everywhere, StableLM's on q/k/v where use_qkv_bias says;
    Seed-OSS's on q/k/v where attention_bias says and on o where attention_out_bias does; mlp_bias
    for Llama, Granite, SmolLM3, Seed-OSS, Nemotron and Arcee."""
    attn = family in ("llama", "qwen3", "granite", "smollm3", "seed_oss", "hunyuan", "nemotron", "arcee", "olmo",
                      *GEMMAS, *WHOLE_QK_NORMS, *COHERES) \
        and bool(getattr(cfg, "attention_bias", False))
    if family == "qwen2":
        return True, False, False
    if family in GLMS:  # (attention_bias is on by default in their configs)
        return bool(getattr(cfg, "attention_bias", True)), False, False
    if family in ("ernie4_5", "starcoder2"):
        return (bool(getattr(cfg, "use_bias", family == "starcoder2")),) * 3
    if family == "phi":  # (every projection's)
        return True, True, True
    if family == "stablelm":
        return bool(getattr(cfg, "use_qkv_bias", False)), False, False
    if family == "helium":
        return bool(getattr(cfg, "attention_bias", False)), False, bool(getattr(cfg, "mlp_bias", False))
    o_bias = bool(getattr(cfg, "attention_out_bias", False)) if family == "seed_oss" else attn
    mlp = family in ("llama", "granite", "smollm3", "seed_oss", "nemotron", "arcee") and \
        bool(getattr(cfg, "mlp_bias", False))
    return attn, o_bias, mlp


def mlp_activation(cfg, family: str) -> str:
    """The MLP's activation, as transformers reads it for the family (caraserve.model.layers.activation)."""
    if family in PLAIN_MLPS and family != "starcoder2":  # (transformers' ACT2FN[hidden_act])
        act = getattr(cfg, "hidden_act", None)
        if act not in PLAIN_ACTIVATIONS:
            raise UnsupportedModelError(f"hidden_act={act!r} is not supported for {family}; supported: "
                                        f"{', '.join(PLAIN_ACTIVATIONS)}")
        return PLAIN_ACTIVATIONS[act]
    if family in (*GEMMAS, "starcoder2"):
        field = "hidden_act" if family in ("gemma", "starcoder2") else "hidden_activation"
        act = getattr(cfg, field, None)
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise UnsupportedModelError(f"{field}={act!r} is not supported: the MLP computes GELU's tanh form "
                                        "(gelu_pytorch_tanh)")
        return "gelu_tanh"
    act = getattr(cfg, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedModelError(f"hidden_act={act!r} is not supported: the MLP computes SiLU (silu)")
    return "silu"


def positive_number(cfg, field: str) -> float:
    value = getattr(cfg, field, 1.0)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
        raise UnsupportedModelError(f"{field}={value!r} must be a positive number")
    return float(value)


def softcap(cfg, field: str) -> float:
    value = getattr(cfg, field, None)
    if value is None:
        return 0.0
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
        raise UnsupportedModelError(f"{field}={value!r} must be a positive number or null")
    return float(value)


def clip_qkv(cfg) -> float:
    value = getattr(cfg, "clip_qkv", None)
    if value is None:
        return 0.0
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
        raise UnsupportedModelError(f"clip_qkv={value!r} must be a positive number or null")
    return float(value)
