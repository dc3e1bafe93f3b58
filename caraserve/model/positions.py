"""Where each layer of a Hugging Face config looks: the rope it turns (refusing those the layers
cannot), its sliding window, and the layers that take no rope at all."""

from __future__ import annotations

from caraserve.config_checks import UnsupportedModelError
from caraserve.model.layers import PARTIAL_ROPE, SUPPORTED_ROPE, is_ntk_alpha, rope_inv_freq, rope_params, rope_type_of

# families whose sliding layers have a rope of their own (rope_parameters per layer type)
LOCAL_ROPE = ("gemma3", "olmo3")
ROPE_LAYER_TYPES = ("full_attention", "sliding_attention")


def check_rope(cfg, family: str, head_dim: int) -> int | None:
    """Refuses the ropes the layers cannot turn; returns longrope's original_max_position_embeddings
    (ModelArgs.long_rope_from), else None."""
    long_from = None
    for layer_type in ROPE_LAYER_TYPES if family in LOCAL_ROPE else (None,):
        rope_type = rope_type_of(cfg, layer_type)
        # longrope switches a sequence to its long factors once it outgrows the original context;
        # transformers' Phi-3 then recomputes the sequence's cache with them, as the engine does
        # (its other models keep the keys turned with the short factors)
        if is_ntk_alpha(cfg):
            pass  # (HunYuan's fixed alpha)
        elif rope_type not in SUPPORTED_ROPE or (rope_type == "longrope" and family != "phi3"):
            raise UnsupportedModelError(f"rope type {rope_type!r} is not supported for {family} (supported: "
                                        f"{', '.join(r for r in SUPPORTED_ROPE if r != 'longrope')}; longrope "
                                        "for Phi-3)")
        if rope_type == "longrope":
            long_from = int(rope_params(cfg)["original_max_position_embeddings"])
        inv_freq, _ = rope_inv_freq(cfg, layer_type)
        factor = rope_params(cfg, layer_type).get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", None))
        rotary = 2 * inv_freq.numel()
        # Phi-3's and GLM's attention turn the heads' first dimensions and pass the rest (Phi-4-mini's
        # rope over 3/4 of each head, GLM's over half); the other families' attention turns whole heads
        if rotary != head_dim and not (family in PARTIAL_ROPE and 2 <= rotary <= head_dim):
            raise UnsupportedModelError(f"rope over {rotary} of the head's {head_dim} dimensions "
                                        f"(partial_rotary_factor={factor}) is not supported for {family}: its rope "
                                        "covers whole heads")
    return long_from


def sliding_windows(cfg, family: str, n_layers: int) -> tuple[int | None, ...]:
    """Each layer's sliding window, as transformers reads the family's config; None = full."""
    window = getattr(cfg, "sliding_window", None)
    if family in ("mistral", "phi3", "mixtral", "starcoder2") and window:
        return (int(window),) * n_layers
    if family == "qwen3_moe":  # one window over every layer where use_sliding_window
        return (int(window) if window and getattr(cfg, "use_sliding_window", False) else None,) * n_layers
    layer_types = getattr(cfg, "layer_types", None)
    slides = family in ("gemma2", "gemma3", "olmo3", "ministral", "exaone4", "cohere2") or (
        family in ("qwen2", "qwen3", "smollm3", "qwen2_moe") and getattr(cfg, "use_sliding_window", False))
    if slides and layer_types:
        if "sliding_attention" in layer_types and not window:
            what = "use_sliding_window is true and layers are" if family in ("qwen2", "qwen3", "smollm3", "qwen2_moe") \
                else "layers are"
            raise UnsupportedModelError(f"{what} sliding_attention, but sliding_window is not set")
        return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
    return (None,) * n_layers


def no_rope_layers(cfg, family: str, n_layers: int) -> tuple[int, ...]:
    """The layers without rotary: SmolLM3's no_rope_layers holds a flag per layer, 1 where it takes
    rope; EXAONE 4's full-attention layers take none when the model has a sliding window; Cohere 2's
    rope turns only its sliding layers."""
    if family == "exaone4":
        if getattr(cfg, "sliding_window", None) is None:
            return ()
        return tuple(i for i, t in enumerate(cfg.layer_types) if t != "sliding_attention")
    if family == "cohere2":  # rope on its sliding layers only (sliding_windows refuses them without a window)
        return tuple(i for i, t in enumerate(cfg.layer_types) if t != "sliding_attention")
    if family != "smollm3":
        return ()
    flags = getattr(cfg, "no_rope_layers", None)
    if not isinstance(flags, (list, tuple)) or len(flags) != n_layers or any(f not in (0, 1) for f in flags):
        raise UnsupportedModelError(f"no_rope_layers={flags!r} must hold a 0 or 1 for each of the {n_layers} layers")
    return tuple(i for i, f in enumerate(flags) if not f)
