"""A Llama-family decoder built for serving: packed batches, explicit positions, paged KV cache.

Covers every architecture in `caraserve.model.args.ARCHITECTURES`: Llama's layers and what
the others change in them (biases, q/k norms per head or over all heads, norms after attention
and the MLP, fused checkpoint projections, scaled embeddings and scores, soft caps, sliding
windows per layer, a rope per layer type or none, over part of each head or its neighbouring
pairs (GLM), and the mixture-of-experts feed-forward of
`caraserve.model.moe`); `caraserve.model.args` reads which a checkpoint is. Parameter names
equal the Hugging Face checkpoint names, except that projections reading the same input are
fused (`self_attn.qkv_proj` stacks q/k/v, `mlp.gate_up_proj` stacks gate/up: one GEMM each) and
a mixture's experts are stacked; the loader stacks their checkpoint tensors (Phi-3's, and GLM's
gate/up, are stacked already), and `checkpoint_tensors` names them back.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from caraserve import cpu_kernels, ops  # noqa: F401  (ops registers torch.ops.caraserve.*)
from caraserve.lora.backend import backend_for, lora_mode
from caraserve.lora.batch import LoraBatch
from caraserve.lora.host_memory import usable_memory_bytes
from caraserve.model.args import ARCHITECTURES, PARALLEL_SUMS, ModelArgs, UnsupportedModelError, text_config_of  # noqa: F401  (ARCHITECTURES: read from here too)
from caraserve.model.batch import ForwardBatch
from caraserve.model.layers import LoraLinear, RMSNorm, Rotary, activation, norm_of, rope_inv_freq, rope_long_inv_freq
from caraserve.model.moe import Experts, SparseMoE
from caraserve.model.self_attention import Attention, check_triton_prefill  # noqa: F401  (the engine's)

log = logging.getLogger(__name__)

KVCacheLayers = Sequence[tuple[torch.Tensor, torch.Tensor]]  # per layer: k, v [blocks, block_size, n_kv, hd]


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.activation = args.activation
        h, i = args.hidden_size, args.intermediate_size
        self.gate_up_proj = LoraLinear(h, (i, i), args.mlp_bias, layer, ("gate_proj", "up_proj"),
                                       "gate_up_proj" in args.fused_checkpoint)
        self.down_proj = LoraLinear(i, h, args.mlp_bias, layer, "down_proj")

    def forward(self, x, fb: ForwardBatch):
        gate, up = self.gate_up_proj(x, fb).chunk(2, dim=-1)
        return self.down_proj(activation(self.activation, gate) * up, fb)


class PlainMLP(nn.Module):
    """An MLP without a gate, down(act(up(x))), under the checkpoint's names (StarCoder2's c_fc and
    c_proj, Phi's fc1 and fc2); its LoRA parts are the pool's up_proj and down_proj."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        h, i = args.hidden_size, args.intermediate_size
        self.activation = args.activation
        self.names = args.checkpoint_name("up_proj"), args.checkpoint_name("down_proj")
        setattr(self, self.names[0], LoraLinear(h, i, args.mlp_bias, layer, "up_proj"))
        setattr(self, self.names[1], LoraLinear(i, h, args.mlp_bias, layer, "down_proj"))

    def forward(self, x, fb: ForwardBatch):
        up, down = self._modules[self.names[0]], self._modules[self.names[1]]
        return down(activation(self.activation, up(x, fb)), fb)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        # the norms the model has (ModelArgs.layer_norms: before / after attention, before / after
        # the MLP), each under its checkpoint name
        self.norm_names = args.layer_norms
        pre_attn, post_attn, pre_mlp, post_mlp = self.norm_names
        if pre_attn is not None:
            setattr(self, pre_attn, norm_of(args, args.hidden_size))
        self.self_attn = Attention(args, layer)
        for name in (post_attn, pre_mlp, post_mlp):
            if name is not None:
                setattr(self, name, norm_of(args, args.hidden_size))
        self.residual_scale = args.residual_scale
        if args.parallel_block not in ("", *PARALLEL_SUMS):
            raise ValueError(f"parallel_block={args.parallel_block!r}: expected '' or one of {PARALLEL_SUMS}")
        self.parallel = args.parallel_block
        # the feed-forward under the checkpoint's name: mlp, or Mixtral's block_sparse_moe
        self.ffn_name = args.moe.module if args.moe is not None else "mlp"
        mlp = MLP if args.mlp_gated else PlainMLP
        setattr(self, self.ffn_name, SparseMoE(args) if args.moe is not None else mlp(args, layer))

    @property
    def ffn(self) -> nn.Module:
        return getattr(self, self.ffn_name)

    @property
    def device(self) -> torch.device:
        return self.self_attn.o_proj.weight.device

    def norms(self) -> list[RMSNorm | None]:
        """The norms before attention, after it, before the MLP and after it (None where there is none)."""
        return [None if name is None else getattr(self, name) for name in self.norm_names]

    def forward(self, x, residual, cos, sin, fb: ForwardBatch, cache):
        """(this layer's output, the residual stream before it is added): the add happens in the
        next norm, fused with it. The first layer gets x None and the embeddings as residual."""
        pre_attn, post_attn, pre_mlp, post_mlp = self.norms()
        if pre_attn is None:  # OLMo 2: r += norm(attention(r)); out = norm(mlp(r))
            residual = residual if x is None else residual + x
            h = post_attn(None, self.self_attn(residual, cos, sin, fb, cache))[0]
            residual = residual + h
            return post_mlp(None, self.ffn(residual, fb))[0], residual
        h, residual = pre_attn(x, residual)
        if self.parallel == "residual_first":  # Cohere, StableLM: (r + attention(n)) + mlp(n), of one norm n
            return self.ffn(h, fb), residual + self.self_attn(h, cos, sin, fb, cache)
        if self.parallel == "outputs_first":  # Phi: r + (attention(n) + mlp(n)) (the next norm adds r)
            return self.self_attn(h, cos, sin, fb, cache) + self.ffn(h, fb), residual
        h = self.self_attn(h, cos, sin, fb, cache)
        if self.residual_scale != 1.0:  # Granite: the outputs scaled before they join the residual
            h, residual = pre_mlp(h * self.residual_scale, residual)
            return self.ffn(h, fb) * self.residual_scale, residual
        if post_attn is not None:  # Gemma 2, GLM-4: a norm over attention's output alone
            h = post_attn(None, h)[0]
        h, residual = pre_mlp(h, residual)
        h = self.ffn(h, fb)
        return (h if post_mlp is None else post_mlp(None, h)[0]), residual


class Decoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.final_norm = args.final_norm  # (the checkpoint's name: Phi's final_layernorm)
        setattr(self, self.final_norm, norm_of(args, args.hidden_size))

    @property
    def norm(self) -> nn.Module:
        """The norm before the head."""
        return self._modules[self.final_norm]

    @property
    def norm_device(self) -> torch.device:
        """Where the norm before the head runs: its weights', or the last layer's (OLMo's norm has none)."""
        weight = next(iter(self.norm.parameters()), None)
        return self.layers[-1].device if weight is None else weight.device


class CausalLM(nn.Module):
    """The decoder plus LM head. `forward` returns logits of each sequence's last token (or of
    every token with all_logits=True)."""

    def __init__(self, args: ModelArgs, hf_config):
        super().__init__()
        self.args = args
        self.model = Decoder(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=args.head_bias)
        if args.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        hf_config = text_config_of(hf_config)
        with torch.device("cpu"):  # real values even when the model is built on the meta device
            rotary = Rotary(*rope_inv_freq(hf_config, "full_attention" if args.local_rope else None),
                            *(rope_long_inv_freq(hf_config) if args.long_rope_from is not None else ()))
            # each layer takes one of these by its Attention.rope: Gemma 3's and OLMo 3's sliding
            # layers a rope of their own; SmolLM3's NoPE layers the identity (cos 1, sin 0: x * 1 +
            # rotate_half(x) * 0 is x, bit for bit)
            self.ropes = nn.ModuleDict({"global": rotary})
            if args.local_rope:
                self.ropes["local"] = Rotary(*rope_inv_freq(hf_config, "sliding_attention"))
            if args.no_rope_layers:
                self.ropes["none"] = Rotary(torch.zeros_like(rotary.inv_freq), 1.0)
            # Gemma's embedding scale as transformers applies it: rounded to the weights' dtype first
            self.embed_scales = {dt: torch.tensor(args.embed_scale, dtype=dt).item()
                                 for dt in (torch.float32, torch.bfloat16, torch.float16)}
        self._packed_head: torch.Tensor | None = None  # see pack_weights
        self.lora_backends: dict = {}  # layer device -> LoraBackend (use_lora)

    def pack_weights(self, batch_hint: int, memory_share: float = 0.25) -> int:
        """On CPU in float32, keeps a copy of the LM head's and every projection's weight in
        oneDNN's blocked layout: F.linear re-packs the weight on every call, which at decode batch
        sizes costs about as much as the product itself. The copies cost the weights' size again
        in memory, so nothing is packed when they would take more than `memory_share` of the
        memory this process may use. Returns the number of weights packed (0 where it does not
        apply). Call it once the weights are final, and again after writing them: a copy does not
        follow later writes to its weight."""
        self.unpack_weights()  # copies of an earlier packing would not follow the weights now
        lins = [m for m in self.modules() if isinstance(m, LoraLinear)]
        experts = [m for m in self.modules() if isinstance(m, Experts)]
        weights = [self.lm_head.weight] + [m.weight for m in lins] + \
            [w for m in experts for w in (m.gate_up_proj, m.down_proj)]
        if any(w.device.type != "cpu" or w.dtype != torch.float32 for w in weights):
            return 0
        if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
            return 0
        need = sum(w.numel() * w.element_size() for w in weights)
        if need > memory_share * usable_memory_bytes():
            log.info("not packing the weights for oneDNN: the copies (%.1f GB) would not fit in %.0f%% of the "
                     "available memory", need / 2**30, memory_share * 100)
            return 0
        pack = torch.ops.mkldnn._reorder_linear_weight
        self._packed_head = pack(self.lm_head.weight.detach(), batch_hint)
        for m in lins:
            m.packed = pack(m.weight.detach(), batch_hint)
        for m in experts:
            m.pack(pack, batch_hint)
        return len(weights)

    def unpack_weights(self) -> None:
        """Drops the packed copies (pack_weights): every GEMM reads the weights themselves again."""
        self._packed_head = None
        for m in self.modules():
            if isinstance(m, (LoraLinear, Experts)):
                m.packed = None

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [T, vocab] of final hidden states [T, hidden] (already normed), divided where the
        model divides them (Granite) and soft-capped where it caps them (Gemma 2: cap * tanh(logits
        / cap)), in their dtype."""
        if self._packed_head is not None and h.dtype == torch.float32 and h.device.type == "cpu":
            logits = torch.ops.caraserve.packed_linear(h, self._packed_head, self.lm_head.bias, self.args.vocab_size)
        else:
            logits = self.lm_head(h)
        if self.args.logits_divisor != 1.0:  # Granite's logits_scaling
            logits = logits / self.args.logits_divisor
        if self.args.logit_scale != 1.0:  # Cohere's logit_scale
            logits = logits * self.args.logit_scale
        cap = self.args.final_softcap
        return torch.tanh(logits / cap) * cap if cap else logits

    def layer_devices(self) -> list[torch.device]:
        return [layer.device for layer in self.model.layers]

    def use_lora(self, pool, make=backend_for) -> None:
        """Attaches the adapter pool: every projection of a layer gets its device's LoRA backend
        (`make(device, pool)`; tests pass another backend class to run its form elsewhere)."""
        self.lora_backends = {}
        for layer in self.model.layers:
            dev = layer.device
            if dev not in self.lora_backends:
                self.lora_backends[dev] = make(dev, pool)
            for mod in layer.modules():
                if isinstance(mod, LoraLinear):
                    mod.backend = self.lora_backends[dev]
                    mod.backend.attach(mod)

    def prepare_lora(self, lora: LoraBatch | None) -> int:
        """Hands the step's LoRA rows to the backends; the ForwardBatch.lora_mode of an eager step."""
        if lora is not None and not self.lora_backends:
            raise ValueError("a step with LoRA rows needs the adapter pool: call use_lora(pool) first")
        for backend in self.lora_backends.values():
            backend.prepare(lora)
        return lora_mode(lora)

    @torch.inference_mode()
    def forward(self, fb: ForwardBatch, kv: KVCacheLayers, all_logits: bool = False) -> torch.Tensor:
        return self.run(fb, kv, all_logits)

    def run(self, fb: ForwardBatch, kv: KVCacheLayers, all_logits: bool = False) -> torch.Tensor:
        """`forward` without its inference-mode wrapper: the function eager steps run and compiled
        steps compile (caraserve.graphs), for every step kind."""
        dtype = self.model.embed_tokens.weight.dtype
        residual = self.model.embed_tokens(fb.input_ids.to(self.model.embed_tokens.weight.device))
        if self.args.embed_scale != 1.0:
            residual = residual * self.embed_scales[dtype]
        h = None  # each layer's output, added to the residual stream by the next norm
        batches: dict[torch.device, tuple[ForwardBatch, dict[str, tuple]]] = {}
        for layer, cache in zip(self.model.layers, kv):
            dev = layer.device
            if dev not in batches:
                fbd = fb if fb.input_ids.device == dev else fb.to(dev)
                rope_dtype = torch.float32 if self.args.rope_tables_float32 else dtype
                batches[dev] = fbd, {k: self._cos_sin(r, fbd, rope_dtype, dev) for k, r in self.ropes.items()}
            fbd, ropes = batches[dev]
            cos, sin = ropes[layer.self_attn.rope]
            h, residual = layer(None if h is None else h.to(dev), residual.to(dev), cos, sin, fbd, cache)
        dev = self.model.norm_device
        h, residual = h.to(dev), residual.to(dev)
        if fb.logit_rows is not None or (not all_logits and not fb.is_decode):
            rows = (fb.last_rows if fb.logit_rows is None else fb.logit_rows).to(dev)
            h, residual = h[rows], residual[rows]
        return self.head(self.model.norm(h, residual)[0].to(self.lm_head.weight.device))


    @staticmethod
    def _cos_sin(rotary: Rotary, fb: ForwardBatch, dtype: torch.dtype, dev: torch.device):
        at = rotary.inv_freq.device
        cos, sin = rotary.cos_sin(fb.positions.to(at), dtype, None if fb.rope_long is None else fb.rope_long.to(at))
        return cos.to(dev), sin.to(dev)


def checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters under the checkpoint's names, a fused projection's as views of its
    rows (e.g. to hand them to a transformers model of the same config without a copy)."""
    out = {}
    for name, p in model.named_parameters():
        prefix, _, attr = name.rpartition(".")
        mod = model.get_submodule(prefix)
        if hasattr(mod, "checkpoint_parts"):  # a fused projection, or the experts stacked
            out.update((ck, p[lo:hi]) for ck, lo, hi in mod.checkpoint_parts(prefix, attr))
        else:
            out[name] = p
    return out
