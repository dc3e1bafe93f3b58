"""The mixture-of-experts feed-forward (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GraniteMoE): a router picks
each token's top-k experts, and their SwiGLU outputs add up weighted by the router's
probabilities (plus Qwen2-MoE's gated shared expert).

The experts' work depends on the data (which rows each expert takes), so steps call it as one
opaque op (`caraserve::moe_experts`, registered in `caraserve.ops`), whose semantics are
`moe_experts_reference`; the router around it is plain torch, compiled with the rest of a step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from caraserve.model.args import ModelArgs


def check_moe_inputs(x, top_ids, top_weights, gate_up, down) -> None:
    """Refuses, by name, inputs `moe_experts_reference` would misread."""
    if x.dim() != 2 or top_ids.dim() != 2 or top_ids.shape != top_weights.shape or top_ids.shape[0] != x.shape[0]:
        raise ValueError(f"moe_experts: x {list(x.shape)}, top_ids {list(top_ids.shape)} and top_weights "
                         f"{list(top_weights.shape)} must be [T, H], [T, k] and [T, k]")
    hidden = x.shape[1]
    if down.dim() != 2 or gate_up.dim() != 2 or down.shape[0] % hidden or gate_up.shape[1] != hidden \
            or gate_up.shape[0] != 2 * down.shape[1] * (down.shape[0] // hidden):
        raise ValueError(f"moe_experts: gate_up {list(gate_up.shape)} and down {list(down.shape)} are not the "
                         f"experts' [E * 2I, {hidden}] and [E * {hidden}, I]")
    if top_ids.dtype != torch.int64:
        raise ValueError(f"moe_experts: top_ids must be int64, got {top_ids.dtype}")
    experts = down.shape[0] // hidden
    if top_ids.numel() and (int(top_ids.min()) < 0 or int(top_ids.max()) >= experts):
        raise ValueError(f"moe_experts: an expert id is outside 0..{experts - 1}")
    for t in (top_ids, top_weights, gate_up, down):
        if t.device != x.device:
            raise ValueError(f"moe_experts: a {list(t.shape)} input is on {t.device}, x on {x.device}")


def moe_experts_reference(x: torch.Tensor, top_ids: torch.Tensor, top_weights: torch.Tensor,
                          gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Semantics (x [T, H]; top_ids [T, k] int64 expert ids, distinct per row; top_weights [T, k]
    in x's dtype or float32; gate_up [E * 2I, H]: expert e's gate rows, then its up rows; down
    [E * H, I]):
        out = zeros [T, H] in x's dtype
        for e in ascending order, over the rows t that chose it (top_ids[t, j] == e):
            g, u = (x[t] @ gate_up[e].T).chunk(2)
            out[t] += ((silu(g) * u) @ down[e].T * top_weights[t, j]).to(x.dtype)
    -> out. Each row's experts add in ascending order, as transformers' loop adds them."""
    num_experts, hidden = down.shape[0] // x.shape[1], x.shape[1]
    gate_up = gate_up.view(num_experts, -1, hidden)
    down = down.view(num_experts, hidden, -1)
    return _run_experts(x, top_ids, top_weights, num_experts, lambda e, h: F.linear(h, gate_up[e]),
                        lambda e, h: F.linear(h, down[e]))


def moe_experts_packed(x: torch.Tensor, top_ids: torch.Tensor, top_weights: torch.Tensor,
                       gate_up: list[torch.Tensor], down: list[torch.Tensor]) -> torch.Tensor:
    """`moe_experts_reference` over each expert's weights in oneDNN's packed layout (float32 on
    the CPU, `Experts.pack`): F.linear re-packs a weight at every call, which at a decode step's
    few rows an expert costs about as much as its product."""
    def linear(packed):
        return lambda e, h: torch.ops.mkldnn._linear_pointwise(h, packed[e], None, "none", [], "")

    return _run_experts(x, top_ids, top_weights, len(gate_up), linear(gate_up), linear(down))


def _run_experts(x, top_ids, top_weights, num_experts: int, gate_up, down) -> torch.Tensor:
    """The loop of `moe_experts_reference`, gate_up(e, rows) and down(e, rows) its products."""
    k = top_ids.shape[1]
    flat = top_ids.flatten()
    order = torch.argsort(flat, stable=True)  # the (row, choice) pairs grouped by expert, ascending
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    weights = top_weights.flatten()
    out = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start : start + n]
        start += n
        rows = pairs // k
        g, u = gate_up(e, x[rows]).chunk(2, dim=-1)
        y = down(e, F.silu(g) * u) * weights[pairs, None]
        out.index_add_(0, rows, y.to(out.dtype))
    return out


class Experts(nn.Module):
    """Every expert's weights stacked in two parameters (`moe_experts_reference` gives their
    layout); the checkpoint holds them per expert, or stacked as [E, 2I, H] and [E, H, I]
    (`checkpoint_parts`, `stacked_checkpoint`: the loader reads such a tensor as its rows)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        moe = args.moe
        e, i, h = moe.num_experts, moe.intermediate_size, args.hidden_size
        self.num_experts, self.intermediate_size, self.hidden_size = e, i, h
        self.names = moe.expert_names
        self.stacked_checkpoint = moe.stacked_checkpoint
        self.gate_up_proj = nn.Parameter(torch.empty(e * 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e * h, i))
        self.packed: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # (gate_up, down) per expert

    def pack(self, pack, batch_hint: int) -> None:
        """Keeps each expert's two weights in oneDNN's packed layout (`pack`, as
        CausalLM.pack_weights packs the projections); a later write to the weights is not followed."""
        e = self.num_experts
        self.packed = ([pack(w.detach(), batch_hint) for w in self.gate_up_proj.view(e, -1, self.hidden_size)],
                       [pack(w.detach(), batch_hint) for w in self.down_proj.view(e, self.hidden_size, -1)])

    def checkpoint_parts(self, prefix: str, attr: str) -> list[tuple[str, int, int]]:
        """(checkpoint tensor name, first row, end row) of each expert's part of parameter `attr`
        of the module named `prefix` (e.g. model.layers.0.mlp.experts.3.gate_proj.weight)."""
        i, h = self.intermediate_size, self.hidden_size
        if self.stacked_checkpoint:
            name, rows = (self.names[0], 2 * i) if attr == "gate_up_proj" else (self.names[1], h)
            return [(f"{prefix.rpartition('.')[0]}.{name}.weight", 0, self.num_experts * rows)]
        gate, up, down = self.names
        if attr == "gate_up_proj":
            return [part for e in range(self.num_experts) for part in (
                (f"{prefix}.{e}.{gate}.weight", 2 * i * e, 2 * i * e + i),
                (f"{prefix}.{e}.{up}.weight", 2 * i * e + i, 2 * i * (e + 1)))]
        return [(f"{prefix}.{e}.{down}.weight", h * e, h * (e + 1)) for e in range(self.num_experts)]


class Router(nn.Linear):
    """The router's linear layer (no bias), named in the checkpoint as the model names it."""

    def __init__(self, hidden: int, experts: int, checkpoint_name: str):
        super().__init__(hidden, experts, bias=False)
        self.checkpoint_name = checkpoint_name

    def checkpoint_parts(self, prefix: str, attr: str) -> list[tuple[str, int, int]]:
        return [(f"{prefix.rpartition('.')[0]}.{self.checkpoint_name}.{attr}", 0, self.out_features)]


class SharedExpert(nn.Module):
    """Qwen2-MoE's expert every token takes: down(silu(gate(x)) * up(x)), no LoRA."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoE(nn.Module):
    """Router (`gate`, a linear layer without bias) and experts, and where the model has one a
    shared expert gated by sigmoid(shared_expert_gate(x)). The router's softmax, top-k and
    renormalization run in float32, as transformers runs them."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.moe = args.moe
        self.gate = Router(args.hidden_size, self.moe.num_experts, self.moe.router_name)
        self.experts = Experts(args)
        if self.moe.shared_expert_size:
            self.shared_expert = SharedExpert(args.hidden_size, self.moe.shared_expert_size)
            self.shared_expert_gate = nn.Linear(args.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor, fb=None) -> torch.Tensor:
        logits = self.gate(x).float()
        if self.moe.softmax_after_topk:
            top_logits, top_ids = torch.topk(logits, self.moe.top_k, dim=-1)
            top_weights = torch.softmax(top_logits, dim=-1)
        else:
            top_weights, top_ids = torch.topk(torch.softmax(logits, dim=-1), self.moe.top_k, dim=-1)
        if self.moe.norm_topk_prob:
            top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
        if not self.moe.float32_weights:
            top_weights = top_weights.to(x.dtype)
        packed = self.experts.packed
        if packed is not None and x.dtype == torch.float32 and x.device.type == "cpu":
            out = torch.ops.caraserve.moe_experts_packed(x.contiguous(), top_ids, top_weights, *packed)
        else:
            out = torch.ops.caraserve.moe_experts(x.contiguous(), top_ids, top_weights, self.experts.gate_up_proj,
                                                  self.experts.down_proj)
        if self.moe.shared_expert_size:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
