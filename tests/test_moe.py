"""Mixture-of-experts models (Mixtral, Qwen3-MoE): the experts' op against transformers' own
experts, its input checks, and what is refused (dense layers among the experts, LoRA on the
experts or the router); the models' logits and greedy tokens with LoRA on attention are checked in
test_model.py and test_arch_lora.py."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import save_peft_adapter, save_random_hf_model

from caraserve import ops  # noqa: F401  (registers caraserve::moe_experts)
from caraserve.model.args import ModelArgs, UnsupportedModelError
from caraserve.model.moe import moe_experts_reference


def _transformers_experts(num_experts=6, hidden=24, inter=10):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=num_experts)
    experts = Qwen3MoeExperts(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.3)
        experts.down_proj.normal_(0, 0.3)
    return experts


@pytest.mark.parametrize("rows, k", [(1, 1), (7, 2), (33, 3)])
def test_experts_op_matches_transformers_experts(rows, k):
    """Random routings (some experts unused, a row's experts in any order) give transformers'
    output, with the weights in float32 (Mixtral's) and in the activations' dtype."""
    experts = _transformers_experts()
    e, two_i, h = experts.gate_up_proj.shape
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, h, generator=g)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(rows)])
    w = torch.rand(rows, k, generator=g)
    with torch.no_grad():
        want = experts(x, ids, w)
    got = torch.ops.caraserve.moe_experts(x, ids, w, experts.gate_up_proj.detach().reshape(e * two_i, h),
                                          experts.down_proj.detach().reshape(e * h, -1))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    half = moe_experts_reference(x.bfloat16(), ids, w.bfloat16(), experts.gate_up_proj.detach().bfloat16().reshape(
        e * two_i, h), experts.down_proj.detach().bfloat16().reshape(e * h, -1))
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), want, rtol=0.05, atol=0.05)


def test_experts_op_refuses_inputs_it_would_misread():
    x, ids, w = torch.randn(3, 8), torch.zeros(3, 2, dtype=torch.int64), torch.rand(3, 2)
    gate_up, down = torch.randn(4 * 2 * 5, 8), torch.randn(4 * 8, 5)
    op = torch.ops.caraserve.moe_experts
    with pytest.raises(ValueError, match="expert id is outside 0..3"):
        op(x, ids + 4, w, gate_up, down)
    with pytest.raises(ValueError, match="top_ids must be int64"):
        op(x, ids.int(), w, gate_up, down)
    with pytest.raises(ValueError, match=r"must be \[T, H\], \[T, k\] and \[T, k\]"):
        op(x, ids, w[:, :1], gate_up, down)
    with pytest.raises(ValueError, match="are not the experts'"):
        op(x, ids, w, gate_up[:-1], down)


def test_dense_layers_among_experts_are_refused():
    from transformers import Qwen3MoeConfig

    cfg = Qwen3MoeConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_experts=4,
                         mlp_only_layers=[1], architectures=["Qwen3MoeForCausalLM"])
    with pytest.raises(UnsupportedModelError, match=r"mlp_only_layers=\[1\].*every layer's feed-forward"):
        ModelArgs.from_hf(cfg)


@pytest.mark.parametrize("arch, module", [("qwen3_moe", "mlp.experts.1.gate_proj"),
                                          ("qwen2_moe", "mlp.shared_expert.up_proj")])
def test_lora_on_experts_or_router_is_refused(tmp_path, arch, module):
    """PEFT's all-linear on a MoE model adapts the experts' parameters (target_parameters), and
    adapters saved when experts were linear layers hold tensors under mlp.experts.N (Qwen2-MoE's
    shared expert is one still): both are refused by name; an attention adapter loads, and the
    device pool holds attention slots only."""
    from safetensors.torch import load_file, save_file

    from caraserve.lora.checkpoint import AdapterError, inspect_adapter, load_adapter
    from caraserve.lora.device_pool import DevicePool
    from caraserve.model.loader import load_model

    save_random_hf_model(tmp_path / "base", arch)
    args = load_model(tmp_path / "base", "float32").args
    assert args.adapter_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    every = save_peft_adapter(tmp_path / "base", tmp_path / "all", seed=1, r=4, target_modules="all-linear")
    with pytest.raises(AdapterError, match=r"(target_parameters=|experts or router \().* is not supported"):
        inspect_adapter(every, args)
    good = save_peft_adapter(tmp_path / "base", tmp_path / "good", seed=2, r=4, target_modules=["q_proj", "o_proj"])
    assert load_adapter(good, args).targets == ("q_proj", "o_proj")
    tensors = load_file(good / "adapter_model.safetensors")
    a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    tensors[f"base_model.model.model.layers.0.{module}.lora_A.weight"] = a.clone()
    save_file(tensors, good / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"LoRA on a mixture-of-experts model's experts or router "
                                           rf"\(.*{re.escape(module)}.*\) is not supported: adapt q_proj"):
        inspect_adapter(good, args)
    pool = DevicePool(args, (4,), 1, torch.float32, [torch.device("cpu")] * args.num_layers)
    assert pool.targets == ("q_proj", "k_proj", "v_proj", "o_proj")
    with pytest.raises(ValueError, match=r"names none of the projections LoRA can adapt in this model"):
        DevicePool(args, (4,), 1, torch.float32, [torch.device("cpu")] * args.num_layers, targets=("gate_proj",))


def test_cuda_steps_of_a_moe_model_stay_eager(tmp_path, caplog):
    """The experts group rows on the host, which a CUDA graph cannot replay: on CUDA a MoE
    model's engine gets no compiled decode step whatever engine.compile says (decided before any
    CUDA work, so it runs here)."""
    from caraserve.config import EngineConfig, ModelConfig
    from caraserve.graphs import DecodeGraphs
    from caraserve.model.loader import load_model

    save_random_hf_model(tmp_path / "base", "mixtral")
    model = load_model(tmp_path / "base", "float32")
    cfg = EngineConfig(model=ModelConfig(path=str(tmp_path / "base")), compile="true")
    assert DecodeGraphs.for_engine(cfg, model, None, None, 64, tmp_path, torch.float32, torch.device("cuda")) is None
    assert "run eagerly" in caplog.text
