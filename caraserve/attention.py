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
                              slot_mapping: torch.Tensor, interleaved: bool = False,
                              float32: bool = False) -> torch.Tensor:
    """Semantics: q_rot = apply_rotary(q, cos, sin, interleaved, float32); write_kv(caches,
    slot_mapping, apply_rotary(k, cos, sin, interleaved, float32), v); returns q_rot. q [T, H, hd],
    k / v [T, n_kv, hd], cos / sin [T, r] (the first r <= hd dimensions of each head turn)."""
    write_kv(k_cache, v_cache, slot_mapping, apply_rotary(k, cos, sin, interleaved, float32), v)
    return apply_rotary(q, cos, sin, interleaved, float32)


def rotary_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                    interleaved: bool = False, float32: bool = False) -> torch.Tensor:
    """rotary_write_kv_reference's result (and cache writes) from one kernel in eager steps
    (`caraserve.model.layers.fused_kernels`), from the torch form in compiled ones."""
    kind = fused_kernels(q)
    args = (q, k, v, cos, sin, k_cache, v_cache, slot_mapping, interleaved)
    if kind == "cpu":  # (float32 activations: `float32` changes nothing)
        return cpu_kernels.rotary_write_kv(*args)
    if kind == "cuda":
        from caraserve import layer_ops_triton

        return layer_ops_triton.rotary_write_kv(*args, float32)
    return rotary_write_kv_reference(*args, float32)


def check_paged_attention(q, k_cache, v_cache, block_tables, row_seq, lens, window: int | None) -> None:
    """A ValueError naming what paged attention cannot compute: shapes that do not fit the
    semantics below, tensors on other devices, sequences outside the block table, lengths
    outside [1, table width x block size], block ids outside the cache for a position a row
    reads. Reads the index tensors' values (a host sync on a GPU): the check of calls a kernel
    declined, before the reference runs them, not of every step."""
    def bad(why: str):
        raise ValueError(f"paged attention: {why}")

    tensors = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, row_seq=row_seq, lens=lens)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            bad(f"{name} must be a tensor, got {type(t).__name__}")
        if t.device != q.device:
            bad(f"{name} is on {t.device}, q on {q.device}")
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        bad(f"expected q [T, H, hd] and caches [blocks, block_size, KV, hd] of one shape, got q {list(q.shape)}, "
            f"k_cache {list(k_cache.shape)}, v_cache {list(v_cache.shape)}")
    (t, heads, hd), (blocks, bs, kv_heads, cache_hd) = q.shape, k_cache.shape
    if hd < 1 or hd != cache_hd or kv_heads < 1 or heads % kv_heads or blocks < 1 or bs < 1:
        bad(f"q {list(q.shape)} does not fit caches {list(k_cache.shape)} (head sizes equal and at least 1, "
            "query heads a multiple of KV heads, at least one block of one position)")
    if not q.is_floating_point() or q.dtype != k_cache.dtype or q.dtype != v_cache.dtype:
        bad(f"q and the caches must share one floating dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    for name in ("block_tables", "row_seq", "lens"):
        if tensors[name].dtype not in (torch.int32, torch.int64):
            bad(f"{name} must hold int32 or int64, got {tensors[name].dtype}")
    if block_tables.dim() != 2 or block_tables.shape[1] < 1 or row_seq.shape != (t,) or lens.shape != (t,):
        bad(f"expected block_tables [S, W >= 1] and row_seq, lens [{t}], got {list(block_tables.shape)}, "
            f"{list(row_seq.shape)}, {list(lens.shape)}")
    if window is not None and window < 0:
        bad(f"window must be None or >= 0, got {window}")
    if not t:
        return
    seqs, width = block_tables.shape
    if int(row_seq.min()) < 0 or int(row_seq.max()) >= seqs:
        bad(f"row_seq holds {int(row_seq.min())}..{int(row_seq.max())}, outside the block table's {seqs} sequences")
    if int(lens.min()) < 1 or int(lens.max()) > width * bs:
        bad(f"lens hold {int(lens.min())}..{int(lens.max())}, outside [1, {width * bs}] (table width x block size)")
    lo = (lens - window).clamp(min=0) if window else torch.zeros_like(lens)
    j = torch.arange(width, device=q.device)
    read = (j[None, :] >= (lo // bs)[:, None]) & (j[None, :] <= ((lens - 1) // bs)[:, None])
    ids = block_tables[row_seq.long()]
    if bool((read & ((ids < 0) | (ids >= blocks))).any()):
        bad(f"a row reads a block id outside the cache's {blocks} blocks")


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_tables: torch.Tensor, row_seq: torch.Tensor, lens: torch.Tensor,
                              window: int | None, softcap: float = 0.0) -> torch.Tensor:
    """Semantics:
        for each row i, s = row_seq[i], n = lens[i]:
            K_s[j] = k_cache[block_tables[s, j // bs], j % bs]  (V_s alike), j in [lo, n)
            out[i, h] = softmax_j(cap(q[i, h] . K_s[j, h // G] / sqrt(hd))) @ V_s[j, h // G]
        lo = max(0, n - window) with a window, else 0; G = H / n_kv (GQA); cap(x) = softcap *
        tanh(x / softcap) with softcap > 0 (Gemma 2's soft cap, in float32), else x.

    q [T, H, hd]; caches [blocks, bs, n_kv, hd]; block_tables [S, W] int64; row_seq, lens [T]
    int64 -> out [T, H, hd]. Gathers each row's W * bs keys: the reference and the fallback of
    small steps, not a fast path. Table entries of blocks a row does not read may hold anything."""
    tables = block_tables[row_seq].clamp(0, k_cache.shape[0] - 1)  # [T, W] (unread entries masked below)
    t, w = tables.shape
    bs = k_cache.shape[1]
    keys = k_cache[tables].reshape(t, w * bs, *k_cache.shape[2:]).transpose(1, 2)  # [T, n_kv, W*bs, hd]
    vals = v_cache[tables].reshape(t, w * bs, *v_cache.shape[2:]).transpose(1, 2)
    j = torch.arange(w * bs, device=q.device)
    mask = j[None, :] < lens[:, None]
    if window:
        mask &= j[None, :] >= (lens - window)[:, None]
    if softcap:
        return capped_attention(q.unsqueeze(2), keys, vals, mask[:, None, None, :], softcap).squeeze(2)
    out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, vals, attn_mask=mask[:, None, None, :],
                                         enable_gqa=True)
    return out.squeeze(2)


def capped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     softcap: float) -> torch.Tensor:
    """SDPA's result with the scores soft-capped (which SDPA cannot do), in float32 (Gemma 2's
    eager attention caps them in the activations' dtype): q [..., H, n, hd], k / v [..., KV,
    ctx, hd], mask bool broadcasting to [..., H, n, ctx] (True: attended)."""
    group = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = torch.tanh(scores / softcap) * softcap
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return (weights @ v.float()).to(q.dtype)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    row_seq: torch.Tensor, lens: torch.Tensor, window: int | None,
                    softcap: float = 0.0) -> torch.Tensor:
    """paged_attention_reference's result from the device's kernel: on CPU an op running the C
    kernel (the reference where the kernel declines the tensors); on CUDA the Triton kernel
    (`caraserve.attention_triton`: each row reads its own blocks in place, where the reference
    gathers the table's whole width); elsewhere the reference."""
    if q.device.type == "cpu":
        return torch.ops.caraserve.paged_attention(q, k_cache, v_cache, block_tables, row_seq, lens, window or 0,
                                                   softcap)
    if q.is_cuda:
        from caraserve import attention_triton

        return attention_triton.paged_attention(q.contiguous(), k_cache, v_cache, block_tables, row_seq, lens, window,
                                                softcap=softcap)
    check_paged_attention(q, k_cache, v_cache, block_tables, row_seq, lens, window)
    return paged_attention_reference(q, k_cache, v_cache, block_tables, row_seq, lens, window, softcap)
