"""Building blocks of the decoder: RMSNorm, rotary embedding, and the LoRA-aware linear layer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from caraserve import cpu_kernels, kernel_library

SUPPORTED_ROPE = ("default", "linear", "llama3", "yarn", "longrope")
# model types whose attention turns the first partial_rotary_factor of each head and passes the rest
PARTIAL_ROPE = ("phi3", "glm", "glm4", "phi", "stablelm", "nemotron")


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    """The MLP's activation of x, in x's dtype, as transformers computes it: silu; gelu_tanh
    (torch's tanh form, gelu_pytorch_tanh); gelu_new (the same curve written out in tensor ops,
    Phi's: its roundings differ from gelu_tanh's); gelu (the exact erf form); relu2 (relu(x)^2:
    Nemotron, Arcee)."""
    if name == "silu":
        return F.silu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "gelu_new":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    if name == "gelu":
        return F.gelu(x)
    if name == "relu2":
        return torch.square(F.relu(x))
    raise ValueError(f"unknown activation {name!r}")


def add_rms_norm_reference(x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float, unit_offset: bool = False,
                           float32_weight: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantics (x, residual [T, D]; weight [D]; one dtype):
        r = residual + x        (r = residual when x is None; the sum in the activations' dtype)
        n = r32 / sqrt(mean(r32^2) + eps),  r32 = r in float32
        out = weight * n.to(dtype)                    (Llama)
        out = (n * (1 + weight32)).to(dtype)          (unit_offset: Gemma's weight is 1's offset)
        out = (weight32 * n).to(dtype)                (float32_weight: OLMo 2, Helium)
    -> (out, r): the normalized rows, and the residual stream carried on to the next add. (In
    float32 the Llama and float32_weight forms are the same numbers.)"""
    r = residual if x is None else residual + x
    h = r.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (h * (1.0 + weight.to(torch.float32))).to(r.dtype), r
    if float32_weight:
        return (weight.to(torch.float32) * h).to(r.dtype), r
    return weight * h.to(r.dtype), r


def fused_kernels(t: torch.Tensor) -> str | None:
    """Which fused elementwise kernel runs for activations t in this step: "cpu" (float32, the C
    library built), "cuda" (Triton), or None for the torch form. A compiled step always takes the
    torch form, which inductor fuses with the GEMMs' neighbours on its own."""
    if torch.compiler.is_compiling():
        return None
    if t.is_cuda:
        return "cuda"
    if t.dtype == torch.float32 and t.device.type == "cpu" and kernel_library.library() is not None:
        return "cpu"
    return None


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), the variance taken in float32 (as Llama does), or with
    unit_offset (1 + w) * ..., all in float32 (as Gemma does), with the residual add before it
    fused in (`add_rms_norm_reference`)."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False, float32_weight: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))  # [dim]
        self.eps = eps
        self.unit_offset = unit_offset
        self.float32_weight = float32_weight

    def forward(self, x: torch.Tensor | None, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x); x None: (norm(residual), residual). Eager steps run
        it as one kernel, which may write the sum into residual's own memory: the caller passes a
        residual it owns and uses only the one returned."""
        kind = fused_kernels(residual)
        if kind is None:
            return add_rms_norm_reference(x, residual, self.weight, self.eps, self.unit_offset, self.float32_weight)
        residual = residual.contiguous()
        if kind == "cpu":  # (float32 only: 1 + w then w' * n is Gemma's n * (1 + w), bit for bit)
            weight = self.weight + 1.0 if self.unit_offset else self.weight
            return cpu_kernels.add_rms_norm(x, residual, weight, self.eps), residual
        from caraserve import layer_ops_triton

        return layer_ops_triton.add_rms_norm(x, residual, self.weight, self.eps, self.unit_offset,
                                             self.float32_weight), residual


def layer_norm_reference(x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantics (Cohere's LayerNorm, without bias; x, residual [..., D]; weight broadcast over
    them: [D], or [heads, D] for rows of heads):
        r = residual + x        (r = residual when x is None; the sum in the activations' dtype)
        c = r32 - mean(r32),  r32 = r in float32        (over the last dimension)
        out = (weight32 * c / sqrt(mean(c^2) + eps)).to(dtype)
    -> (out, r)."""
    r = residual if x is None else residual + x
    h = r.to(torch.float32)
    centred = h - h.mean(-1, keepdim=True)
    h = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.to(torch.float32) * h).to(r.dtype), r


class LayerNorm(nn.Module):
    """A LayerNorm with the residual add before it, in torch ops, of one of three kinds:
    "cohere" (`layer_norm_reference`, no bias; `shape` (heads, head_dim) gives each head weights of
    its own, Cohere's q/k norms); "torch", torch's own with a bias (StarCoder2's nn.LayerNorm), its
    weight 1's offset with `unit_offset` (Nemotron's LayerNorm1P: w + 1 in the weight's dtype);
    "plain", torch's without weight or bias, in float32, rounded once (OLMo's)."""

    def __init__(self, shape: int | tuple[int, ...], eps: float, kind: str = "cohere", unit_offset: bool = False):
        super().__init__()
        if kind not in ("cohere", "torch", "plain"):
            raise ValueError(f"LayerNorm kind {kind!r}: expected cohere, torch or plain")
        self.shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.weight = nn.Parameter(torch.ones(shape)) if kind != "plain" else None
        self.bias = nn.Parameter(torch.zeros(shape)) if kind == "torch" else None
        self.kind, self.eps, self.unit_offset = kind, eps, unit_offset

    def forward(self, x: torch.Tensor | None, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "cohere":
            return layer_norm_reference(x, residual, self.weight, self.eps)
        r = residual if x is None else residual + x
        if self.kind == "plain":
            return F.layer_norm(r.to(torch.float32), self.shape, None, None, self.eps).to(r.dtype), r
        weight = self.weight + 1.0 if self.unit_offset else self.weight
        return F.layer_norm(r, self.shape, weight, self.bias, self.eps), r


class HeadLayerNorms(nn.Module):
    """StableLM's q/k norms: torch's LayerNorm without bias over each head's vector, with that
    head's own weights (`norms.{i}`, as the checkpoint names them), one call per head as
    transformers makes them (one call over all heads, times the weights, rounds otherwise in
    half precision)."""

    def __init__(self, heads: int, dim: int, eps: float):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(dim, eps=eps, bias=False) for _ in range(heads))

    def forward(self, x: None, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """residual [T, heads, dim] -> (each head normed, residual)."""
        return torch.stack([norm(residual[:, i]) for i, norm in enumerate(self.norms)], dim=1), residual


def norm_of(args, shape: int | tuple[int, ...]) -> RMSNorm | LayerNorm:
    """A norm of the model's kind (a ModelArgs' layer_norm, rms_eps, norm_unit_offset and
    norm_float32_weight) over `shape`: Cohere's LayerNorm, else an RMSNorm."""
    if args.layer_norm:
        return LayerNorm(shape, args.rms_eps, args.layer_norm, args.norm_unit_offset)
    return RMSNorm(shape, args.rms_eps, args.norm_unit_offset, args.norm_float32_weight)


def rope_params(hf_config, layer_type: str | None = None) -> dict:
    """The config's rope parameters; a model with a rope per layer type (Gemma 3: a dict per
    "full_attention" / "sliding_attention") gives that type's."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    if layer_type is not None:
        params = dict(params.get(layer_type) or {})
    return params


def rope_type_of(hf_config, layer_type: str | None = None) -> str:
    params = rope_params(hf_config, layer_type)
    return params.get("rope_type", params.get("type", "default"))


def is_ntk_alpha(hf_config) -> bool:
    """HunYuan's "dynamic" rope with a fixed `alpha`: static frequencies of a stretched base (its
    transformers model calls it ntk_alpha), unlike the dynamic type, which changes with the length."""
    params = rope_params(hf_config)
    return getattr(hf_config, "model_type", None) == "hunyuan_v1_dense" and rope_type_of(hf_config) == "dynamic" \
        and bool(params.get("alpha"))


def rope_inv_freq(hf_config, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] float32 and the cos/sin scale of the config's rope type
    (one of SUPPORTED_ROPE: ModelArgs.from_hf refuses the others), for `layer_type`'s rope in a
    model with one per layer type."""
    params = rope_params(hf_config, layer_type)
    rope_type = rope_type_of(hf_config, layer_type)
    if rope_type == "default" or is_ntk_alpha(hf_config):
        base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        if rope_type != "default":  # HunYuan's fixed NTK alpha: a larger base, whatever the length
            base = base * params["alpha"] ** (dim / (dim - 2))
        if getattr(hf_config, "model_type", None) in PARTIAL_ROPE:  # their default rope reads it (Llama's does not)
            dim = int(dim * params.get("partial_rotary_factor", 1.0))
        inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kw = {} if layer_type is None else {"layer_type": layer_type}
    inv, scale = ROPE_INIT_FUNCTIONS[rope_type](hf_config, device=torch.device("cpu"), **kw)
    return inv.float(), float(scale)


def rope_long_inv_freq(hf_config) -> tuple[torch.Tensor, int]:
    """longrope's inverse frequencies for sequences longer than the original context (its long
    factors), and that context: original_max_position_embeddings."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    original = int(rope_params(hf_config)["original_max_position_embeddings"])
    inv, _ = ROPE_INIT_FUNCTIONS["longrope"](hf_config, device=torch.device("cpu"), seq_len=original + 1)
    return inv.float(), original


class Rotary(nn.Module):
    """Rotary position embedding for explicit positions (one per token). With `long_inv_freq`
    (longrope), the rows of long sequences turn with those frequencies instead."""

    def __init__(self, inv_freq: torch.Tensor, scale: float, long_inv_freq: torch.Tensor | None = None,
                 long_from: int = 0):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [rotary/2] float32
        self.register_buffer("long_inv_freq", long_inv_freq, persistent=False)  # [rotary/2] float32, or None
        self.long_from = long_from
        self.scale = scale

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype,
                long: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] int64 -> cos, sin [T, rotary] in `dtype`. long [T] bool: the rows of
        sequences longer than long_from (longrope); None: the rows at positions >= long_from, which
        for a decode step is the same (a sequence's cache is recomputed as it outgrows long_from)."""
        inv = self.inv_freq[None, :]
        if self.long_inv_freq is not None:
            long = positions >= self.long_from if long is None else long
            inv = torch.where(long[:, None], self.long_inv_freq[None, :], inv)
        freqs = positions[:, None].float() * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False,
                 float32: bool = False) -> torch.Tensor:
    """x [T, heads, head_dim]; cos/sin [T, r]: the first r dimensions of each head rotate,
    x_r*cos + rotate_half(x_r)*sin with each product and the sum in x's dtype (rotate_half(x_r) =
    (-x_r[r/2:], x_r[:r/2])), and the other head_dim - r pass unchanged (partial rotary: Phi-4-mini).
    interleaved (GLM's rope): the pairs turned together are (x_r[2i], x_r[2i+1]), not (x_r[i],
    x_r[i + r/2]): the same turn of x_r reordered evens first, then odds, and put back after.
    float32 (OLMo 2, Cohere, ERNIE 4.5): the products and the sum in float32, rounded once to x's
    dtype."""
    if float32 and x.dtype != torch.float32:
        return apply_rotary(x.float(), cos.float(), sin.float(), interleaved).to(x.dtype)
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat((apply_rotary(x[..., :r], cos, sin, interleaved), x[..., r:]), dim=-1)
    if interleaved:
        y = apply_rotary(torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1), cos, sin)
        return torch.stack((y[..., : r // 2], y[..., r // 2 :]), dim=-1).flatten(-2)
    half = r // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rot * sin[:, None, :]


class LoraLinear(nn.Module):
    """y = x W^T + b, plus each token's own LoRA delta scale * (x A) B when the step has LoRA rows.

    Projections that read the same input are fused into one (q/k/v, gate/up: one GEMM instead of
    three or two): `parts` names the projection behind each column range of y, and each part gets
    the delta of its own adapter module. The checkpoint keeps its separate tensors, which the
    loader stacks (`checkpoint_parts`), unless it stores them fused (`fused_checkpoint`: Phi-3).

    The adapter weights live in the device pool, not here: the layer's LoRA backend
    (`caraserve.lora.backend`, attached by CausalLM.use_lora) holds the step's rows and computes
    the delta; `layer` and each part's name pick its weights out of the pool's slots.
    """

    def __init__(self, in_features: int, out_features: int | tuple[int, ...], bias: bool, layer: int,
                 name: str | tuple[str, ...], fused_checkpoint: bool = False):
        super().__init__()
        names = (name,) if isinstance(name, str) else tuple(name)
        outs = (out_features,) if isinstance(out_features, int) else tuple(out_features)
        if len(names) != len(outs):
            raise ValueError(f"LoraLinear: {len(names)} part names for {len(outs)} output widths")
        ends = [sum(outs[: i + 1]) for i in range(len(outs))]
        self.parts = tuple((n, end - o, end) for n, o, end in zip(names, outs, ends))  # (name, first, end column)
        self.weight = nn.Parameter(torch.empty(ends[-1], in_features))  # [out, in]
        self.bias = nn.Parameter(torch.zeros(ends[-1])) if bias else None  # [out]
        self.layer = layer
        self.name = "+".join(names)
        self.fused_checkpoint = fused_checkpoint
        self.backend = None  # LoraBackend of this layer's device; None: a model without adapters
        self.packed: torch.Tensor | None = None  # weight in oneDNN's layout (CausalLM.pack_weights)

    def forward(self, x: torch.Tensor, fb) -> torch.Tensor:
        if self.backend is None:
            return self.base(x)
        return self.backend.linear(self, x, fb)

    def base(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T + b [T, out] of x [T, in], without any LoRA delta: from the packed copy of W
        when the model has one (the same numbers, computed faster on CPU)."""
        if self.packed is not None and x.dtype == torch.float32 and x.device.type == "cpu":
            return torch.ops.caraserve.packed_linear(x, self.packed, self.bias, self.weight.shape[0])
        return F.linear(x, self.weight, self.bias)

    def checkpoint_parts(self, prefix: str, attr: str) -> list[tuple[str, int, int]]:
        """(checkpoint tensor name, first row, end row) of this layer's parameter `attr` (weight
        or bias) for a module named `prefix`: a fused projection's parameter stacks the
        checkpoint tensors of its parts (their modules are the fused module's siblings), unless the
        checkpoint holds it fused under the module's own name."""
        if len(self.parts) == 1 or self.fused_checkpoint:
            return [(f"{prefix}.{attr}", 0, self.parts[-1][2])]
        parent = prefix.rpartition(".")[0]
        return [(f"{parent}.{name}.{attr}" if parent else f"{name}.{attr}", lo, hi) for name, lo, hi in self.parts]
