"""The decoder's self-attention: q/k/v in one projection, the norms and rope the model puts on
the queries and keys, the paged KV cache written and read, and each step kind's attention kernel
(decode rows: paged attention; prompts and chunks: the Triton prefill kernel on CUDA, the C kernel
on CPU, else an SDPA call per sequence)."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from caraserve import cpu_kernels
from caraserve.attention import capped_attention, paged_attention, rotary_write_kv, write_kv
from caraserve.kv_cache import blocks_for
from caraserve.model.args import ModelArgs
from caraserve.model.batch import ForwardBatch
from caraserve.model.layers import HeadLayerNorms, LayerNorm, LoraLinear, apply_rotary, norm_of

log = logging.getLogger(__name__)


def _attention_mask(q_pos: torch.Tensor, ctx: int, window: int | None) -> torch.Tensor:
    """[n, ctx] bool: key j is visible from query position p iff j <= p (and p - j < window)."""
    k_pos = torch.arange(ctx, device=q_pos.device)
    mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - window
    return mask


# Eager attention on CUDA leaves cuDNN's backend out: its host-side setup per call costs many
# times its device time, and eager decode steps are host-bound. Compiled steps keep torch's choice
# (a CUDA graph replays no host work).
_EAGER_CUDA_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def check_triton_prefill(model: nn.Module, block_size: int, dtype: torch.dtype) -> bool:
    """Builds and runs the Triton prefill attention kernel once on each CUDA device of a CausalLM's
    layers (one token over one block), in the variant its steps launch. Where Triton cannot build
    it, the model's prefill and mixed steps use an SDPA call per sequence from then on (logged).
    Called before serving, so a failure at a step is a fault, not a reason to switch. True when
    it ran."""
    from caraserve import attention_triton

    args = model.args
    for dev in dict.fromkeys(d for d in model.layer_devices() if d.type == "cuda"):
        try:
            q = torch.zeros(1, args.num_heads, args.head_dim, dtype=dtype, device=dev)
            cache = torch.zeros(1, block_size, args.num_kv_heads, args.head_dim, dtype=dtype, device=dev)
            table = torch.zeros(1, 1, dtype=torch.int64, device=dev)
            attention_triton.prefill_attention(q, cache, cache, table, (1,), (1,), None)
            torch.cuda.synchronize(dev)
        except Exception as e:  # whatever stops the kernel here would stop every prefill
            for layer in model.model.layers:
                layer.self_attn.triton_prefill = False
            log.warning("the Triton prefill attention kernel does not run on %s (%s: %s); prefill attention "
                        "uses an SDPA call per sequence", dev, type(e).__name__, e)
            return False
    return True


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
    """F.scaled_dot_product_attention with GQA over q [H, n, hd], k / v [KV, ctx, hd], minus
    cuDNN's backend on CUDA (see above). It runs as a batch of one: on CPU only 4-D inputs reach
    torch's flash kernel (3-D ones take the math path, several times slower on long prompts)."""
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q[None], k[None], v[None], enable_gqa=True, **kw)[0]
    with sdpa_kernel(_EAGER_CUDA_SDPA):
        return F.scaled_dot_product_attention(q[None], k[None], v[None], enable_gqa=True, **kw)[0]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.args = args
        self.window = args.sliding_windows[layer]
        # which of the model's ropes this layer takes (CausalLM.ropes): none is the identity
        self.rope = "none" if layer in args.no_rope_layers else \
            "local" if args.local_rope and self.window is not None else "global"
        self.softcap = args.attn_softcap
        h, q, kv = args.hidden_size, args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        self.widths = (q, kv, kv)
        self.qkv_proj = LoraLinear(h, self.widths, args.qkv_bias, layer, ("q_proj", "k_proj", "v_proj"),
                                   "qkv_proj" in args.fused_checkpoint)
        self.o_name = args.checkpoint_name("o_proj")  # (Phi's dense)
        setattr(self, self.o_name, LoraLinear(q, h, args.o_bias, layer, "o_proj"))
        # the q/k norms under the checkpoint's names: q_norm / k_norm, Phi's and StableLM's q_layernorm / k_layernorm
        self.qk_names = ("q_layernorm", "k_layernorm") if args.layer_norm == "torch" else ("q_norm", "k_norm")
        if args.qk_norm and args.layer_norm == "cohere":  # Cohere: a LayerNorm over each head, its weights per head
            self._qk_norm_modules(LayerNorm((args.num_heads, args.head_dim), args.rms_eps),
                                  LayerNorm((args.num_kv_heads, args.head_dim), args.rms_eps))
        elif args.qk_norm and args.qk_norm_head_weights:  # StableLM: torch's LayerNorm per head, no bias
            self._qk_norm_modules(HeadLayerNorms(args.num_heads, args.head_dim, args.rms_eps),
                                  HeadLayerNorms(args.num_kv_heads, args.head_dim, args.rms_eps))
        elif args.qk_norm and args.layer_norm:  # Phi: torch's LayerNorm over each head's vector, one for all heads
            self._qk_norm_modules(norm_of(args, args.head_dim), norm_of(args, args.head_dim))
        elif args.qk_norm_after_rope:  # HunYuan's, under its names
            self.query_layernorm, self.key_layernorm = norm_of(args, args.head_dim), norm_of(args, args.head_dim)
        elif args.qk_norm:  # over a head's vector (Qwen3, Gemma 3) or the whole projection (OLMo 2)
            self._qk_norm_modules(norm_of(args, args.head_dim if args.qk_norm_per_head else q),
                                  norm_of(args, args.head_dim if args.qk_norm_per_head else kv))
        self.triton_prefill = True  # False once the kernel could not be built (check_triton_prefill)

    @property
    def o_proj(self) -> LoraLinear:
        """The output projection (under the checkpoint's name, `o_name`)."""
        return self._modules[self.o_name]

    def _qk_norm_modules(self, q_norm: nn.Module, k_norm: nn.Module) -> None:
        setattr(self, self.qk_names[0], q_norm)
        setattr(self, self.qk_names[1], k_norm)

    def forward(self, x, cos, sin, fb: ForwardBatch, cache: tuple[torch.Tensor, torch.Tensor]):
        a = self.args
        t = x.shape[0]
        q, k, v = self.qkv_proj(x, fb).split(self.widths, dim=-1)
        if a.qk_norm and not a.qk_norm_after_rope:
            q, k = self._qk_norms(q, k)
        if a.clip_qkv:  # OLMoE
            q, k, v = (u.clamp(-a.clip_qkv, a.clip_qkv) for u in (q, k, v))
        if a.query_scale != 1.0:  # the kernels scale scores by 1/sqrt(head_dim); Gemma 3 by another
            q = q * a.query_scale
        q, k = q.view(t, a.num_heads, a.head_dim), k.view(t, a.num_kv_heads, a.head_dim)
        v = v.view(t, a.num_kv_heads, a.head_dim)
        k_cache, v_cache = cache
        q = self._rope_and_write(q, k, v, cos, sin, fb.slot_mapping, k_cache, v_cache)
        if fb.is_decode:
            out = paged_attention(q, k_cache, v_cache, fb.block_tables, fb.row_seq, fb.row_lens, self.window,
                                  self.softcap)
        else:
            out = self._prefill(q, fb, k_cache, v_cache)
        return self.o_proj(out.reshape(t, a.num_heads * a.head_dim), fb)

    def _qk_norms(self, q, k):
        """The queries and keys [T, heads * head_dim] normed before rope: each head's vector alone
        (Qwen3, Gemma 3, Phi; Cohere's and StableLM's LayerNorms with weights of each head's own),
        or a token's queries together and its keys (OLMo 2)."""
        a, t = self.args, q.shape[0]
        q_norm, k_norm = self._modules[self.qk_names[0]], self._modules[self.qk_names[1]]
        if a.layer_norm:
            return (q_norm(None, q.reshape(t, a.num_heads, a.head_dim))[0],
                    k_norm(None, k.reshape(t, a.num_kv_heads, a.head_dim))[0])
        if a.qk_norm_per_head:
            return (q_norm(None, q.reshape(t * a.num_heads, a.head_dim))[0],
                    k_norm(None, k.reshape(t * a.num_kv_heads, a.head_dim))[0])
        return q_norm(None, q.contiguous())[0], k_norm(None, k.contiguous())[0]

    def _rope_and_write(self, q, k, v, cos, sin, slots, k_cache, v_cache):
        """q [T, H, hd] turned; k turned and v written to the caches at `slots`. HunYuan norms each
        turned query and key head before the write."""
        a = self.args
        if not a.qk_norm_after_rope:  # one fused kernel in eager steps
            return rotary_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots, a.rope_interleaved, a.rope_float32)
        t = q.shape[0]
        q = self.query_layernorm(None, apply_rotary(q, cos, sin).reshape(t * a.num_heads, a.head_dim))[0]
        k = self.key_layernorm(None, apply_rotary(k, cos, sin).reshape(t * a.num_kv_heads, a.head_dim))[0]
        write_kv(k_cache, v_cache, slots, k.view(t, a.num_kv_heads, a.head_dim), v)
        return q.view(t, a.num_heads, a.head_dim)

    def _prefill(self, q, fb: ForwardBatch, k_cache, v_cache):
        if q.is_cuda and self.triton_prefill:
            # one launch for the step's prompts, chunks and decode rows, over the cache in place
            from caraserve import attention_triton

            return attention_triton.prefill_attention(q.contiguous(), k_cache, v_cache, fb.block_tables,
                                                      fb.query_lens, fb.context_lens, self.window, self.softcap)
        if not q.is_cuda:
            # every prompt token as a row of the C kernel (its keys are in the cache already): one
            # call for the batch instead of an SDPA call per prompt, whose fixed cost dominates short
            # ones; and each row's numbers are those it gets alone, however its prompt is chunked
            # or batched (SDPA's blocked sums differ from the kernel's in the last bits, and are
            # faster only on chunks of many hundred tokens)
            out = cpu_kernels.paged_attention(q, k_cache, v_cache, fb.block_tables, fb.row_seq, fb.row_lens,
                                              self.window, self.softcap)
            if out is not None:
                return out
        out = torch.empty_like(q)
        start, bs = 0, k_cache.shape[1]
        for i, (n, ctx) in enumerate(zip(fb.query_lens, fb.context_lens)):
            blocks = fb.block_tables[i, : blocks_for(ctx, bs)]
            keys = k_cache[blocks].flatten(0, 1)[:ctx].transpose(0, 1)  # [n_kv, ctx, hd]
            vals = v_cache[blocks].flatten(0, 1)[:ctx].transpose(0, 1)
            qi = q[start : start + n].transpose(0, 1)  # [H, n, hd]
            if self.softcap:  # (SDPA cannot cap the scores)
                mask = _attention_mask(fb.positions[start : start + n], ctx, self.window)
                o = capped_attention(qi, keys, vals, mask, self.softcap)
            elif n == ctx and (self.window is None or ctx <= self.window):
                o = sdpa(qi, keys, vals, is_causal=True)
            else:
                mask = _attention_mask(fb.positions[start : start + n], ctx, self.window)
                o = sdpa(qi, keys, vals, attn_mask=mask)
            out[start : start + n] = o.transpose(0, 1)
            start += n
        return out
