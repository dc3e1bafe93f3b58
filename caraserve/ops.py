"""CaraServe's custom torch ops, all in the one `caraserve` torch.library namespace.

Each is a plain dispatcher op (a Python kernel registered per device), whose call costs a
fraction of a torch.library.custom_op's: a step makes dozens of them. Compiled steps call them
as opaque nodes (each has a fake implementation giving its output's shape), so a C kernel or a
packed weight needs no lowering.
The C kernels' wrappers (`caraserve.cpu_kernels`) check every tensor before a pointer is
handed over; where a kernel declines its inputs the op computes the same with torch.
"""

from __future__ import annotations

import torch

from caraserve import cpu_kernels

_lib = torch.library.Library("caraserve", "DEF")


# x [T, in] @ W^T (+ bias) with W in oneDNN's packed layout (CausalLM.pack_weights): the packed
# weight has no strides inductor can lower.
_lib.define("packed_linear(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor")
def _packed_linear(x, packed, bias, out_features: int) -> torch.Tensor:
    if x.device.type != "cpu" or x.dtype != torch.float32:  # what the weights were packed for
        raise ValueError(f"packed_linear: x must be float32 on the CPU, got {x.dtype} on {x.device}")
    y = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    if y.shape[-1] != out_features:  # the fake kernel's shape must be the real one
        raise ValueError(f"packed_linear: the packed weight gives {y.shape[-1]} features, not {out_features}")
    return y


_lib.impl("packed_linear", _packed_linear, "CompositeExplicitAutograd")  # packed: an MkldnnCPU tensor, x a CPU one


@torch.library.register_fake("caraserve::packed_linear")
def _(x, packed, bias, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


# Attention over the paged KV cache (caraserve.attention.paged_attention_reference states it).
_lib.define("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor row_seq, "
            "Tensor lens, int window, float softcap=0.0) -> Tensor")


def _paged_attention(q, k_cache, v_cache, block_tables, row_seq, lens, window: int, softcap: float = 0.0):
    out = cpu_kernels.paged_attention(q, k_cache, v_cache, block_tables, row_seq, lens, window or None, softcap)
    if out is not None:
        return out
    from caraserve.attention import check_paged_attention, paged_attention_reference

    # the kernel declined: tensors it does not read (another dtype, a head size past its
    # limit) run through the reference, inputs no path computes are refused by name
    check_paged_attention(q, k_cache, v_cache, block_tables, row_seq, lens, window or None)
    return paged_attention_reference(q, k_cache, v_cache, block_tables, row_seq, lens, window or None, softcap)


_lib.impl("paged_attention", _paged_attention, "CPU")


@torch.library.register_fake("caraserve::paged_attention")
def _(q, k_cache, v_cache, block_tables, row_seq, lens, window, softcap=0.0):
    # (also what a call mixing meta and real tensors dispatches to: it must not hand back memory)
    for t in (k_cache, v_cache, block_tables, row_seq, lens):
        if t.device != q.device:
            raise ValueError(f"paged attention: a {list(t.shape)} input is on {t.device}, q on {q.device}")
    return torch.empty_like(q)


# y += the LoRA delta of one module of one layer for the step prepared in LoRA backend `backend`
# (caraserve.lora.cpu_backend.CpuLoraBackend): the step's rows and weights are Python objects the
# backend holds, so a compiled step passes only the backend's handle.
_lib.define("lora_runs_(Tensor(a!) y, Tensor x, int backend, int layer, str module) -> ()")


def _lora_runs(y: torch.Tensor, x: torch.Tensor, backend: int, layer: int, module: str) -> None:
    from caraserve.lora.backend import run_prepared

    run_prepared(backend, y, x, layer, module)


_lib.impl("lora_runs_", _lora_runs, "CPU")


@torch.library.register_fake("caraserve::lora_runs_")
def _(y, x, backend, layer, module) -> None:
    return None


# A mixture-of-experts layer's experts over the router's choices (caraserve.model.moe.
# moe_experts_reference states it): which rows each expert takes is data, so the op is opaque.
_lib.define("moe_experts(Tensor x, Tensor top_ids, Tensor top_weights, Tensor gate_up, Tensor down) -> Tensor")


def _moe_experts(x, top_ids, top_weights, gate_up, down) -> torch.Tensor:
    from caraserve.model.moe import check_moe_inputs, moe_experts_reference

    check_moe_inputs(x, top_ids, top_weights, gate_up, down)
    return moe_experts_reference(x, top_ids, top_weights, gate_up, down)


_lib.impl("moe_experts", _moe_experts, "CompositeExplicitAutograd")


@torch.library.register_fake("caraserve::moe_experts")
def _(x, top_ids, top_weights, gate_up, down):
    return torch.empty_like(x)


# The same over each expert's weights in oneDNN's packed layout (caraserve.model.moe.moe_experts_packed).
_lib.define("moe_experts_packed(Tensor x, Tensor top_ids, Tensor top_weights, Tensor[] gate_up, "
            "Tensor[] down) -> Tensor")


def _moe_experts_packed(x, top_ids, top_weights, gate_up, down) -> torch.Tensor:
    from caraserve.model.moe import moe_experts_packed

    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 2:
        raise ValueError(f"moe_experts_packed: x must be [T, H] float32 on the CPU, got {x.dtype} {list(x.shape)} "
                         f"on {x.device}")
    if len(gate_up) != len(down) or top_ids.dtype != torch.int64 or top_ids.shape != top_weights.shape:
        raise ValueError("moe_experts_packed: gate_up and down need a weight per expert, top_ids int64 shaped as "
                         "top_weights")
    if top_ids.numel() and (int(top_ids.min()) < 0 or int(top_ids.max()) >= len(gate_up)):
        raise ValueError(f"moe_experts_packed: an expert id is outside 0..{len(gate_up) - 1}")
    out = moe_experts_packed(x, top_ids, top_weights, gate_up, down)
    if out.shape != x.shape:  # the fake kernel's shape must be the real one
        raise ValueError(f"moe_experts_packed: the packed weights give {list(out.shape)}, not {list(x.shape)}")
    return out


_lib.impl("moe_experts_packed", _moe_experts_packed, "CompositeExplicitAutograd")


@torch.library.register_fake("caraserve::moe_experts_packed")
def _(x, top_ids, top_weights, gate_up, down):
    return torch.empty_like(x)

