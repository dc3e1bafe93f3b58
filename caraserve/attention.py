"""Attention over the paged KV cache: the semantics (a plain-torch reference, the oracle in tests)
and the dispatch to each device's kernel.

Every query row i is one token of sequence s = row_seq[i] at position lens[i] - 1, whose key and
value are already in the cache; it attends to that sequence's positions [lo, lens[i]) (lo =
lens[i] - window with a sliding window, else 0). A decode step has one row per sequence; a
prefill step one row per prompt token; a mixed step both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from caraserve import (
    cpu_kernels,
    ops,  # noqa: F401  (registers torch.ops.caraserve.*)
)
from caraserve.model.layers import apply_rotary, fused_kernels


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:
    """Semantics: for each token t, cache[slot_mapping[t] // bs, slot_mapping[t] % bs] = k[t] (and v).

    caches [blocks, bs, n_kv, hd]; slot_mapping [T] int64; k, v [T, n_kv, hd]."""
    n_kv, hd = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, n_kv, hd).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, n_kv, hd).index_copy_(0, slot_mapping, v)


def rotary_write_kv_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                              sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              slot_mapping: torch.Tensor) -> torch.Tensor:
    """Semantics: q_rot = apply_rotary(q, cos, sin); write_kv(caches, slot_mapping, apply_rotary(k,
    cos, sin), v); returns q_rot. q [T, H, hd], k / v [T, n_kv, hd], cos / sin [T, hd]."""
    write_kv(k_cache, v_cache, slot_mapping, apply_rotary(k, cos, sin), v)
    return apply_rotary(q, cos, sin)


def rotary_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """rotary_write_kv_reference's result (and cache writes) from one kernel in eager steps
    (`caraserve.model.layers.fused_kernels`), from the torch form in compiled ones."""
    kind = fused_kernels(q)
    if kind == "cpu":
        return cpu_kernels.rotary_write_kv(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    if kind == "cuda":
        from caraserve import layer_ops_triton

        return layer_ops_triton.rotary_write_kv(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    return rotary_write_kv_reference(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_tables: torch.Tensor, row_seq: torch.Tensor, lens: torch.Tensor,
                              window: int | None) -> torch.Tensor:
    """Semantics:
        for each row i, s = row_seq[i], n = lens[i]:
            K_s[j] = k_cache[block_tables[s, j // bs], j % bs]  (V_s alike), j in [lo, n)
            out[i, h] = softmax_j(q[i, h] . K_s[j, h // G] / sqrt(hd)) @ V_s[j, h // G]
        lo = max(0, n - window) with a window, else 0; G = H / n_kv (GQA).

    q [T, H, hd]; caches [blocks, bs, n_kv, hd]; block_tables [S, W] int64; row_seq, lens [T]
    int64 -> out [T, H, hd]. Gathers each row's W * bs keys: the reference and the fallback of
    small steps, not a fast path."""
    tables = block_tables[row_seq]  # [T, W]
    t, w = tables.shape
    bs = k_cache.shape[1]
    keys = k_cache[tables].reshape(t, w * bs, *k_cache.shape[2:]).transpose(1, 2)  # [T, n_kv, W*bs, hd]
    vals = v_cache[tables].reshape(t, w * bs, *v_cache.shape[2:]).transpose(1, 2)
    j = torch.arange(w * bs, device=q.device)
    mask = j[None, :] < lens[:, None]
    if window:
        mask &= j[None, :] >= (lens - window)[:, None]
    out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, vals, attn_mask=mask[:, None, None, :],
                                         enable_gqa=True)
    return out.squeeze(2)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    row_seq: torch.Tensor, lens: torch.Tensor, window: int | None) -> torch.Tensor:
    """paged_attention_reference's result from the device's kernel: on CPU an op running the C
    kernel (the reference where the kernel declines the tensors); on CUDA the Triton kernel
    (`caraserve.attention_triton`: each row reads its own blocks in place, where the reference
    gathers the table's whole width); elsewhere the reference."""
    if q.device.type == "cpu":
        return torch.ops.caraserve.paged_attention(q, k_cache, v_cache, block_tables, row_seq, lens, window or 0)
    if q.is_cuda:
        from caraserve import attention_triton

        return attention_triton.paged_attention(q.contiguous(), k_cache, v_cache, block_tables, row_seq, lens, window)
    return paged_attention_reference(q, k_cache, v_cache, block_tables, row_seq, lens, window)
