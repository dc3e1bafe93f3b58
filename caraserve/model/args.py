"""What the decoder needs to know of a Hugging Face config (`ModelArgs.from_hf`), and the
checkpoints it can run: options that would make a layer compute something else are refused,
never run as something else."""

from __future__ import annotations

import math
from dataclasses import dataclass

from caraserve.config_checks import ConfigError, UnsupportedModelError
from caraserve.lora.module_patterns import FUSED_PARTS, SPLIT_MODULES
from caraserve.model.families import (  # noqa: F401  (ARCHITECTURES: the served architectures, read from here too)
    ARCHITECTURES,
    COHERES,
    GEMMAS,
    INTERLEAVED_ROPE,
    MOE_BASES,
    OLMOS,
    POST_NORMS,
    biases,
    clip_qkv,
    norm_fields,
    positive_number,
    projection_fields,
    softcap,
)
from caraserve.model.moe_args import MoeArgs, moe_args
from caraserve.model.positions import LOCAL_ROPE, check_rope, no_rope_layers, sliding_windows

ATTENTION_MODULES = SPLIT_MODULES[:4]  # q/k/v/o
# the checkpoint's names of a layer's norms by where they sit: before attention, after it, before
# the MLP, after it (None: no norm there)
LAYER_NORMS = {
    "pre": ("input_layernorm", None, "post_attention_layernorm", None),  # Llama's
    "sandwich": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"),  # Gemma 2, 3
    "post": (None, "post_attention_layernorm", None, "post_feedforward_layernorm"),  # OLMo 2, EXAONE 4
    "glm4": ("input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm", "post_mlp_layernorm"),
    "parallel": ("input_layernorm", None, None, None),  # Cohere's, Phi's: attention and the MLP read one norm
}
# a layer whose attention and MLP read one norm n adds both to the residual r, in one of two orders
# (the sums round differently): (r + attention(n)) + mlp(n) (Cohere, StableLM) or r + (attention(n)
# + mlp(n)) (Phi)
PARALLEL_SUMS = ("residual_first", "outputs_first")
# multimodal checkpoints whose language model is served (text in, text out): architecture -> {its
# text_config's model_type: the language model's family}, the language models served inside it
# (Mistral 3's ministral3, with its own query scaling, is not). Their text model's weights sit
# under a prefix, and their adapters' modules under model.language_model (the vision tower's
# LoRA, if any, is not used)
TEXT_OF_MULTIMODAL = {"Gemma3ForConditionalGeneration": {"gemma3_text": "gemma3"},
                      "Mistral3ForConditionalGeneration": {"mistral": "mistral"},
                      "LlavaForConditionalGeneration": {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"},
                      # (their multimodal rope turns text alike on its three axes: Qwen2's rope)
                      "Qwen2VLForConditionalGeneration": {"qwen2_vl_text": "qwen2"},
                      "Qwen2_5_VLForConditionalGeneration": {"qwen2_5_vl_text": "qwen2"}}
MULTIMODAL_LAYERS = "model.language_model.layers"


@dataclass(frozen=True)
class ModelArgs:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    tie_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool  # an RMSNorm over the queries and over the keys before rotary (Qwen3, Gemma 3, OLMo 2)
    # the fused projections the checkpoint (and adapters) hold: qkv_proj and gate_up_proj (Phi-3), gate_up_proj (GLM)
    fused_checkpoint: tuple[str, ...]
    sliding_windows: tuple[int | None, ...]  # per layer; None = full attention
    max_position: int
    activation: str = "silu"  # the MLP's (caraserve.model.layers.activation): silu, gelu_tanh (Gemma's), gelu_new, gelu
    # the norms' weights are 1's offset: an RMSNorm's applied in float32 (Gemma), a LayerNorm's w + 1
    # in the weights' dtype (Nemotron's LayerNorm1P)
    norm_unit_offset: bool = False
    embed_scale: float = 1.0  # the embeddings times this, rounded to the dtype (Gemma: sqrt(hidden); Granite's)
    qk_norm_per_head: bool = True  # the q/k norms span one head (Qwen3, Gemma 3), else all heads (OLMo 2, OLMoE)
    clip_qkv: float = 0.0  # queries, keys and values clamped to [-c, c] after the norms (OLMo, OLMoE); 0: none
    layer_norms: tuple[str | None, ...] = LAYER_NORMS["pre"]  # a layer's norms: LAYER_NORMS
    rope_interleaved: bool = False  # rope turns the pairs (2i, 2i + 1) of a head, not (i, i + r/2) (GLM, Cohere)
    # the norms' kind: "" RMSNorms; else a LayerNorm's kind (layers.LayerNorm): "cohere" Cohere's
    # without bias; "torch" torch's with bias (StarCoder2, Phi, StableLM, Nemotron); "plain" without
    # weight or bias (OLMo)
    layer_norm: str = ""
    mlp_gated: bool = True  # the MLP is down(act(gate(x)) * up(x)); else down(act(up(x))) (StarCoder2, Phi)
    renamed: tuple[tuple[str, str], ...] = ()  # (checkpoint name, ours): families.RENAMED
    peft_default_targets: tuple[str, ...] | None = None  # PEFT's target_modules for a config naming none
    final_norm: str = "norm"  # the checkpoint's name of the norm before the head (Phi's final_layernorm)
    head_bias: bool = False  # the LM head has a bias (Phi)
    qk_norm_head_weights: bool = False  # each head's q/k norm has weights of its own (Cohere, StableLM)
    norm_float32_weight: bool = False  # RMSNorm's weight applied in float32, rounded once (OLMo 2/3, Helium)
    # rope's products and sum in float32, rounded once (OLMo 2/3, Cohere, ERNIE 4.5), its cos / sin
    # tables too kept in float32 (rope_tables_float32: OLMo 2/3, ERNIE 4.5)
    rope_float32: bool = False
    rope_tables_float32: bool = False
    qk_norm_after_rope: bool = False  # the per-head q/k norms come after rope (HunYuan's query/key_layernorm)
    parallel_block: str = ""  # attention and the MLP of one norm, summed as PARALLEL_SUMS names; "": in turn
    logit_scale: float = 1.0  # logits times this (Cohere's logit_scale)
    # queries times this before attention: the model's score scale over 1/sqrt(head_dim) (Gemma 2/3's
    # 1/sqrt(query_pre_attn_scalar), Granite's attention_multiplier)
    query_scale: float = 1.0
    local_rope: bool = False  # sliding layers have a rope of their own (Gemma 3, OLMo 3)
    # Phi-3's longrope: a sequence of more tokens than this turns with the long factors (all of it)
    long_rope_from: int | None = None
    no_rope_layers: tuple[int, ...] = ()  # layers whose attention takes no rotary (NoPE: SmolLM3, EXAONE 4)
    attn_softcap: float = 0.0  # attention scores capped to cap * tanh(score / cap) (Gemma 2); 0: none
    final_softcap: float = 0.0  # logits capped alike (Gemma 2); 0: none
    residual_scale: float = 1.0  # each layer's attention and MLP outputs times this before they join the residual
    logits_divisor: float = 1.0  # logits divided by this (Granite's logits_scaling)
    multimodal: bool = False  # the language model of a multimodal checkpoint (TEXT_OF_MULTIMODAL)
    moe: MoeArgs | None = None  # the experts of a mixture-of-experts model; None: a dense MLP

    @property
    def layer_prefix(self) -> str:
        """The decoder layers' module name as the adapters' module names spell it."""
        return MULTIMODAL_LAYERS if self.multimodal else "model.layers"

    @classmethod
    def from_hf(cls, cfg) -> ModelArgs:
        family, arch = _family(cfg)
        multimodal = arch in TEXT_OF_MULTIMODAL
        # (a multimodal model ties its head as its own config says, whatever its text config says)
        tie = bool(getattr(cfg, "tie_word_embeddings", False))
        cfg = text_config_of(cfg)
        n_layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
        moe = moe_args(cfg, family) if family in MOE_BASES else None
        windows = sliding_windows(cfg, family, n_layers)
        qkv_bias = bool(getattr(cfg, "qkv_bias", True)) if family == "qwen2_moe" else None  # (Qwen2's: always)
        family = MOE_BASES.get(family, family)
        # (StableLM's attention takes heads of hidden / heads whatever head_dim says)
        head_dim = (None if family == "stablelm" else getattr(cfg, "head_dim", None)) or cfg.hidden_size // heads
        gemma = family in GEMMAS
        long_rope_from = check_rope(cfg, family, head_dim)
        if family == "gemma3" and getattr(cfg, "use_bidirectional_attention", False):
            raise UnsupportedModelError("use_bidirectional_attention=true is not supported: attention is causal")
        qkv_bias, o_bias, mlp_bias = biases(cfg, family) if qkv_bias is None else (qkv_bias, False, False)
        scalar = getattr(cfg, "query_pre_attn_scalar", None) if family in ("gemma2", "gemma3") else None
        # Gemma 2 caps attention scores and logits; transformers' Gemma 3 reads only the logits'
        # cap (its attention ignores attn_logit_softcapping), and so does this
        final_cap = family in ("gemma2", "gemma3")
        granite = {k: positive_number(cfg, k) for k in ("embedding_multiplier", "attention_multiplier",
                                                    "residual_multiplier", "logits_scaling")} \
            if family == "granite" else {}
        return cls(
            architecture=arch,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=n_layers,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            tie_embeddings=tie,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            clip_qkv=clip_qkv(cfg) if family in ("olmoe", "olmo") else 0.0,
            sliding_windows=windows,
            max_position=getattr(cfg, "max_position_embeddings", 2048),
            embed_scale=math.sqrt(cfg.hidden_size) if gemma else granite.get("embedding_multiplier", 1.0),
            rope_interleaved=family in INTERLEAVED_ROPE,
            rope_float32=family in (*OLMOS, "olmo", *COHERES, "ernie4_5"),
            rope_tables_float32=family in (*OLMOS, "olmo", "ernie4_5"),
            logit_scale=positive_number(cfg, "logit_scale") if family in COHERES else 1.0,
            query_scale=(math.sqrt(head_dim / scalar) if scalar else
                         granite["attention_multiplier"] * math.sqrt(head_dim) if granite else 1.0),
            local_rope=family in LOCAL_ROPE,
            long_rope_from=long_rope_from,
            no_rope_layers=no_rope_layers(cfg, family, n_layers),
            attn_softcap=softcap(cfg, "attn_logit_softcapping") if family == "gemma2" else 0.0,
            final_softcap=softcap(cfg, "final_logit_softcapping") if final_cap else 0.0,
            residual_scale=granite.get("residual_multiplier", 1.0),
            logits_divisor=granite.get("logits_scaling", 1.0),
            multimodal=multimodal,
            moe=moe,
            **_layout(cfg, family),
            **norm_fields(cfg, family),
            **projection_fields(cfg, family),
        )

    @property
    def adapter_modules(self) -> tuple[str, ...]:
        """The projections the checkpoint names, which its adapters' target_modules name: a
        mixture-of-experts model's attention projections only (LoRA on experts is not served)."""
        if self.moe is not None:
            return ATTENTION_MODULES
        theirs = {ours: name for name, ours in self.renamed}
        theirs.update((part, name) for name in self.fused_checkpoint for part in FUSED_PARTS[name])
        split = SPLIT_MODULES if self.mlp_gated else tuple(m for m in SPLIT_MODULES if m != "gate_proj")
        return tuple(dict.fromkeys(theirs.get(m, m) for m in split))

    def pool_targets(self, targets) -> tuple[str, ...]:
        """The projections among `targets` (adapters.target_modules) a LoRA can adapt in this
        model, which the device pool holds slots for: a mixture-of-experts model's attention only."""
        adaptable = tuple(part for m in self.adapter_modules for part, _, _ in self.module_parts(m))
        chosen = tuple(t for t in targets if t in adaptable)
        if not chosen:
            raise ConfigError(f"adapters.target_modules={tuple(targets)} names none of the projections LoRA can "
                              f"adapt in this model ({', '.join(adaptable)})")
        return chosen

    def module_shape(self, name: str) -> tuple[int, int]:
        """(in_features, out_features) of a LoRA-targetable projection (or of a fused one), by our
        name or the checkpoint's."""
        name = dict(self.renamed).get(name, name)
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        shapes = {
            "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
            "qkv_proj": (h, q + 2 * kv), "gate_up_proj": (h, 2 * i),
        }
        return shapes[name]

    def module_parts(self, name: str) -> tuple[tuple[str, int, int], ...]:
        """(projection, first, end output row) of each part of an adapter module: a fused one's
        q/k/v or gate/up rows, in the order the checkpoint stacks them; else the module whole. A
        fused module's LoRA is its parts' LoRAs: the same A, and B's rows split between them."""
        q, kv, i = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.intermediate_size
        if name == "qkv_proj":
            return ("q_proj", 0, q), ("k_proj", q, q + kv), ("v_proj", q + kv, q + 2 * kv)
        if name == "gate_up_proj":
            return ("gate_proj", 0, i), ("up_proj", i, 2 * i)
        ours = dict(self.renamed).get(name, name)  # (StarCoder2's, Phi's names for ours)
        return ((ours, 0, self.module_shape(name)[1]),)

    def checkpoint_name(self, ours: str) -> str:
        """The checkpoint's name of our projection `ours` (Phi's dense for o_proj)."""
        return {o: theirs for theirs, o in self.renamed}.get(ours, ours)


def _layout(cfg, family: str) -> dict:
    """ModelArgs' layer_norms and parallel_block: where a layer's norms sit, and whether attention
    and the MLP read one norm (PARALLEL_SUMS: Cohere's, Phi's, StableLM's where use_parallel_residual)."""
    parallel = "outputs_first" if family == "phi" else "residual_first" if family in COHERES or (
        family == "stablelm" and getattr(cfg, "use_parallel_residual", False)) else ""
    layout = "sandwich" if family in ("gemma2", "gemma3") else "post" if family in POST_NORMS else \
        "glm4" if family == "glm4" else "parallel" if parallel else "pre"
    return dict(layer_norms=LAYER_NORMS[layout], parallel_block=parallel)


def text_config_of(cfg):
    """The config of the language model: a multimodal checkpoint's text_config, else cfg."""
    archs = list(getattr(cfg, "architectures", None) or [])
    if archs and archs[0] in TEXT_OF_MULTIMODAL:
        return cfg.text_config
    return cfg


def _family(cfg) -> tuple[str, str]:
    archs = list(getattr(cfg, "architectures", None) or [])
    arch = archs[0] if archs else {v: k for k, v in ARCHITECTURES.items()}.get(cfg.model_type, cfg.model_type)
    if arch in TEXT_OF_MULTIMODAL:
        text_type, served = getattr(cfg.text_config, "model_type", None), TEXT_OF_MULTIMODAL[arch]
        if text_type not in served:
            raise UnsupportedModelError(f"{arch} with a {text_type!r} language model is not supported; "
                                        f"supported: {', '.join(served)}")
        return served[text_type], arch
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(f"architecture {arch!r} is not supported; supported: "
                                    f"{sorted([*ARCHITECTURES, *TEXT_OF_MULTIMODAL])}")
    return ARCHITECTURES[arch], arch
