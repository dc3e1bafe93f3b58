"""The mixture-of-experts part of a Hugging Face config (`ModelArgs.moe`): how many experts, how
the router picks and weighs them, and where the checkpoint keeps them."""

from __future__ import annotations

from dataclasses import dataclass

from caraserve.config_checks import UnsupportedModelError


@dataclass(frozen=True)
class MoeArgs:
    """A mixture-of-experts feed-forward (every layer's): a router picks each token's top_k of
    num_experts SwiGLU experts of intermediate_size, whose outputs add up weighted by the router's
    probabilities (renormalized over the top k where norm_topk_prob)."""
    num_experts: int
    top_k: int
    intermediate_size: int
    norm_topk_prob: bool
    module: str  # the layer's feed-forward module: "mlp" (Qwen3-MoE) or "block_sparse_moe" (Mixtral)
    # an expert's gate, up and down projections in the checkpoint; with stacked_checkpoint, the
    # tensors of every expert's gate and up rows together, and of the down rows (GraniteMoE)
    expert_names: tuple[str, ...]
    float32_weights: bool  # the weighted sum takes the router's weights in float32 (Mixtral), else in the dtype
    router_name: str = "gate"  # the router's linear layer in the checkpoint, under the module
    stacked_checkpoint: bool = False  # the checkpoint holds the experts' weights as [E, rows, in] tensors
    # the router's softmax over the top-k logits (GraniteMoE), else top-k of the softmax over all
    softmax_after_topk: bool = False
    # a shared expert every token takes, of this size, its output gated by sigmoid(a linear of the
    # input) (Qwen2-MoE); 0: none
    shared_expert_size: int = 0



def _top_k(cfg, experts) -> int:
    top_k = cfg.num_experts_per_tok
    if not (isinstance(experts, int) and isinstance(top_k, int) and 0 < top_k <= experts):
        raise UnsupportedModelError(f"num_experts_per_tok={top_k!r} must be between 1 and the {experts!r} experts")
    return top_k


def moe_args(cfg, family: str) -> MoeArgs:
    """The experts of a Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE config; dense MLP layers among them
    are refused."""
    if family == "granitemoe":  # its router's softmax over the top-k logits, its experts stacked
        return MoeArgs(num_experts=cfg.num_local_experts, top_k=_top_k(cfg, cfg.num_local_experts),
                       intermediate_size=cfg.intermediate_size, norm_topk_prob=False, module="block_sparse_moe",
                       expert_names=("input_linear", "output_linear"), float32_weights=False,
                       router_name="router.layer", stacked_checkpoint=True, softmax_after_topk=True)
    qwen = family in ("qwen2_moe", "qwen3_moe", "olmoe")  # (the same router and expert names)
    if qwen and (getattr(cfg, "mlp_only_layers", None) or getattr(cfg, "decoder_sparse_step", 1) != 1):
        raise UnsupportedModelError(
            f"mlp_only_layers={cfg.mlp_only_layers!r}, decoder_sparse_step={cfg.decoder_sparse_step!r} is not "
            "supported: every layer's feed-forward must be the experts (mlp_only_layers empty, decoder_sparse_step 1)")
    experts = cfg.num_experts if qwen else cfg.num_local_experts
    return MoeArgs(
        num_experts=experts, top_k=_top_k(cfg, experts),
        intermediate_size=cfg.intermediate_size if family in ("mixtral", "olmoe") else cfg.moe_intermediate_size,
        norm_topk_prob=bool(cfg.norm_topk_prob) if qwen else True,
        module="mlp" if qwen else "block_sparse_moe",
        expert_names=("gate_proj", "up_proj", "down_proj") if qwen else ("w1", "w3", "w2"),
        float32_weights=not qwen,
        shared_expert_size=cfg.shared_expert_intermediate_size if family == "qwen2_moe" else 0,
    )
