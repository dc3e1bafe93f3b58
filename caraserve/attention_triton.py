"""Paged attention as a Triton kernel (GPUs): the semantics of
`caraserve.attention.paged_attention_reference`, reading each row's KV blocks in place.

One program per (row, KV head): it walks the row's blocks through the block table, scores the
GROUP query heads that share the KV head against each block's keys at once, and keeps an online
softmax (running maximum and sum) so the values are read once, in one pass. Nothing is gathered
or copied: a row reads only its own positions [lo, len), block by block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_attention_kernel(
    out_ptr,  # [T, H, D]
    q_ptr,  # [T, H, D]
    k_ptr, v_ptr,  # [blocks, BS, KV, D] contiguous
    tables_ptr,  # [S, W] int64
    row_seq_ptr, lens_ptr,  # [T] int64
    scale,
    window,  # 0: none
    stride_qt, stride_qh,
    stride_ot, stride_oh,
    stride_tab,
    KV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0)
    kvh = tl.program_id(1)
    seq = tl.load(row_seq_ptr + row)
    length = tl.load(lens_ptr + row)
    lo = tl.where((window > 0) & (length > window), length - window, 0)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    d_mask = offs_d < D
    heads = kvh * GROUP + offs_g
    q = tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    m = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    offs_s = tl.arange(0, BLOCK_S)
    pos_stride = KV * D
    for b in range(lo // BS, (length + BS - 1) // BS):
        block = tl.load(tables_ptr + seq * stride_tab + b).to(tl.int64)
        pos = b * BS + offs_s
        p_mask = (offs_s < BS) & (pos >= lo) & (pos < length)
        base = block * BS * pos_stride + kvh * D
        kb = tl.load(k_ptr + base + offs_s[:, None] * pos_stride + offs_d[None, :],
                     mask=p_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)  # [BLOCK_S, BLOCK_D]
        scores = tl.sum(q[:, None, :] * kb[None, :, :], axis=2) * scale  # [BLOCK_G, BLOCK_S]
        scores = tl.where(p_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        vb = tl.load(v_ptr + base + offs_s[:, None] * pos_stride + offs_d[None, :],
                     mask=p_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vb[None, :, :], axis=1)
        s = s * alpha + tl.sum(p, axis=1)
        m = m_new
    o = acc / s[:, None]
    tl.store(out_ptr + row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    row_seq: torch.Tensor, lens: torch.Tensor, window: int | None) -> torch.Tensor:
    """paged_attention_reference's result; q [T, H, D] contiguous, caches [blocks, BS, KV, D]
    contiguous, block_tables [S, W] int64, row_seq / lens [T] int64, on one device. Every shape
    is checked here; block ids and lengths are the caller's (the scheduler's) to keep in range."""
    t, heads, d = q.shape
    blocks, bs, kv, dk = k_cache.shape
    if k_cache.shape != v_cache.shape or dk != d or heads % kv or q.dim() != 3:
        raise ValueError(f"paged attention: q {tuple(q.shape)} and caches {tuple(k_cache.shape)} / "
                         f"{tuple(v_cache.shape)} do not fit (heads a multiple of KV heads, one head size)")
    if block_tables.dim() != 2 or row_seq.shape != (t,) or lens.shape != (t,):
        raise ValueError(f"paged attention: block_tables {tuple(block_tables.shape)}, row_seq "
                         f"{tuple(row_seq.shape)}, lens {tuple(lens.shape)} for {t} rows")
    if not (q.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("paged attention: q and the caches must be contiguous")
    if any(x.dtype != torch.int64 for x in (block_tables, row_seq, lens)):
        raise ValueError("paged attention: block_tables, row_seq and lens must be int64")
    tables = block_tables.contiguous()
    out = torch.empty_like(q)
    group = heads // kv
    _paged_attention_kernel[(t, kv)](
        out, q, k_cache, v_cache, tables, row_seq, lens, d ** -0.5, window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), tables.stride(0),
        KV=kv, D=d, BS=bs, GROUP=group, BLOCK_G=max(2, triton.next_power_of_2(group)),
        BLOCK_D=triton.next_power_of_2(d), BLOCK_S=triton.next_power_of_2(bs),
    )
    return out
