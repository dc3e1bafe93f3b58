"""Multi-bucket BGMV: the LoRA delta of a decode batch whose rows use adapters of several rank
buckets, in one Triton launch pair per adapted module.

    y[i] += scale[i] * (x[i] @ A_b[s]) @ B_b[s]    for row i of bucket b, slot s (b = -1: no adapter)

Each rank bucket is a separate pool tensor (A [S, in, R_b], B [S, R_b, out]), so one launch
takes up to MULTI_BUCKETS of them as separate pointer arguments and each row picks its own with
scalar branches; more buckets take further launches. Rows are described by a [3, N] int32 table
(bucket, slot, rank) and a [N] float32 scale, so a compiled decode step issues the same two
kernels whatever the batch's adapter mix (used by graphs.DecodeGraphs on CUDA). The shrink
splits the input features over several programs per row and the expand adds their partial sums
in a fixed order: results repeat bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from caraserve.lora.triton_common import BGMV_TILE, auto_split_k, np2

MULTI_BUCKETS = 8


@triton.jit
def _pick(bucket, p0, p1, p2, p3, p4, p5, p6, p7):
    """The pointer of the row's bucket among the launch's buckets (scalar branches, no gather)."""
    p = p0
    if bucket == 1:
        p = p1
    if bucket == 2:
        p = p2
    if bucket == 3:
        p = p3
    if bucket == 4:
        p = p4
    if bucket == 5:
        p = p5
    if bucket == 6:
        p = p6
    if bucket == 7:
        p = p7
    return p


@triton.jit
def _bgmv_multi_shrink_kernel(
    v_ptr,  # [SPLIT, N, BLOCK_R] float32: partial sums, one per input-feature chunk
    x_ptr,  # [N, IN]
    meta_ptr,  # [3, N] int32: bucket, slot, rank of each row
    a0, a1, a2, a3, a4, a5, a6, a7,  # [S, IN, R_b] contiguous, one per bucket of the launch
    first,  # int, the bucket that a0 holds
    IN,  # int, input features
    K_PER_SPLIT,  # int, input features per program along axis 1 (multiple of BLOCK_K)
    stride_vs, stride_vm,  # v split and row strides (elements)
    stride_xm, stride_xk,  # x strides (elements)
    stride_meta,  # meta row stride (elements)
    NB: tl.constexpr,  # buckets in this launch
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,  # next_power_of_2 of the launch's largest rank
):
    """v[pid1, i] = x[i, K] @ A_b[s][K, :] over the pid1-th chunk K, for rows of this launch's buckets."""
    i = tl.program_id(0)
    bucket = tl.load(meta_ptr + i) - first
    if (bucket >= 0) & (bucket < NB):
        slot = tl.load(meta_ptr + stride_meta + i).to(tl.int64)
        rank = tl.load(meta_ptr + 2 * stride_meta + i)
        a_ptr = _pick(bucket, a0, a1, a2, a3, a4, a5, a6, a7) + slot * IN * rank
        k_begin = tl.program_id(1) * K_PER_SPLIT
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(0, K_PER_SPLIT, BLOCK_K):
            offs_k = k_begin + k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < IN
            xb = tl.load(x_ptr + i.to(tl.int64) * stride_xm + offs_k * stride_xk, mask=k_mask, other=0.0)
            ab = tl.load(a_ptr + offs_k[:, None] * rank + offs_r[None, :],
                         mask=k_mask[:, None] & r_mask[None, :], other=0.0)
            acc += tl.sum(xb.to(tl.float32)[:, None] * ab.to(tl.float32), axis=0)
        tl.store(v_ptr + tl.program_id(1) * stride_vs + i * stride_vm + offs_r, acc, mask=r_mask)


@triton.jit
def _bgmv_multi_expand_kernel(
    y_ptr,  # [N, OUT], accumulated in place
    v_ptr,  # [SPLIT, N, BLOCK_R] float32 from the shrink kernel
    meta_ptr,  # [3, N] int32
    scale_ptr,  # [N] float32, each row's adapter scale
    b0, b1, b2, b3, b4, b5, b6, b7,  # [S, R_b, OUT] contiguous
    first,
    OUT,
    stride_ym, stride_yn,
    stride_vs, stride_vm,
    stride_meta,
    NB: tl.constexpr,
    SPLIT: tl.constexpr,  # partial sums to add, in a fixed order (deterministic)
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """y[i, n] += scale[i] * (sum of v[:, i]) @ B_b[s][:, n] over the pid1-th column block n."""
    i = tl.program_id(0)
    bucket = tl.load(meta_ptr + i) - first
    if (bucket >= 0) & (bucket < NB):
        slot = tl.load(meta_ptr + stride_meta + i).to(tl.int64)
        rank = tl.load(meta_ptr + 2 * stride_meta + i)
        b_ptr = _pick(bucket, b0, b1, b2, b3, b4, b5, b6, b7) + slot * rank * OUT
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        vb = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for s in tl.static_range(SPLIT):
            vb += tl.load(v_ptr + s * stride_vs + i * stride_vm + offs_r, mask=r_mask, other=0.0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < OUT
        bb = tl.load(b_ptr + offs_r[:, None] * OUT + offs_n[None, :],
                     mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        delta = tl.sum(vb[:, None] * bb.to(tl.float32), axis=0) * tl.load(scale_ptr + i)
        y_ptrs = y_ptr + i.to(tl.int64) * stride_ym + offs_n * stride_yn
        yb = tl.load(y_ptrs, mask=n_mask, other=0.0)
        tl.store(y_ptrs, (yb.to(tl.float32) + delta).to(yb.dtype), mask=n_mask)


def bgmv_multi(
    y: torch.Tensor,  # [N, out] accumulated in place
    x: torch.Tensor,  # [N, in]
    a: list[torch.Tensor],  # per rank bucket: [S, in, R_b], contiguous
    b: list[torch.Tensor],  # per rank bucket: [S, R_b, out], contiguous
    meta: torch.Tensor,  # [3, N] int32: bucket (-1 = none), slot, rank of each row
    scale: torch.Tensor,  # [N] float32, each row's scale
    split_k: int | None = None,  # input-feature chunks per row (None: enough programs to fill a GPU)
) -> None:
    """y[i] += scale[i] * (x[i] @ A_b[s]) @ B_b[s] with (b, s) = meta[:2, i]; rows with b = -1 untouched.

    The chunks' partial sums are added in a fixed order, so the result does not vary between runs."""
    n_rows, n_in = x.shape
    n_out = y.shape[1]
    if len(a) != len(b) or not a:
        raise ValueError(f"expected one A and one B per rank bucket, got {len(a)} and {len(b)}")
    if meta.shape != (3, n_rows) or scale.shape != (n_rows,) or y.shape[0] != n_rows:
        raise ValueError(f"rows: x {tuple(x.shape)}, y {tuple(y.shape)}, meta {tuple(meta.shape)}, "
                         f"scale {tuple(scale.shape)}")
    for ai, bi in zip(a, b):
        if ai.shape[1] != n_in or bi.shape[2] != n_out or ai.shape[2] != bi.shape[1]:
            raise ValueError(f"bucket shapes: A {tuple(ai.shape)}, B {tuple(bi.shape)} for x {tuple(x.shape)}, "
                             f"y {tuple(y.shape)}")
        if not (ai.is_contiguous() and bi.is_contiguous()):
            raise ValueError("bucket weights must be contiguous")
    if split_k is None:
        split_k = auto_split_k(n_rows, n_in)
    for first in range(0, len(a), MULTI_BUCKETS):
        ga, gb = a[first : first + MULTI_BUCKETS], b[first : first + MULTI_BUCKETS]
        nb = len(ga)
        block_r = np2(max(t.shape[2] for t in ga))
        block_k = min(np2(n_in), max(16, BGMV_TILE // block_r))
        chunk = triton.cdiv(n_in, max(1, min(split_k, n_in)))
        block_k = min(block_k, np2(chunk))
        k_per_split = triton.cdiv(chunk, block_k) * block_k
        splits = triton.cdiv(n_in, k_per_split)
        block_n = min(np2(n_out), max(16, BGMV_TILE // block_r))
        pa = list(ga) + [ga[0]] * (MULTI_BUCKETS - nb)
        pb = list(gb) + [gb[0]] * (MULTI_BUCKETS - nb)
        v = torch.empty((splits, n_rows, block_r), dtype=torch.float32, device=y.device)
        _bgmv_multi_shrink_kernel[(n_rows, splits)](
            v, x, meta, *pa,
            first, n_in, k_per_split,
            v.stride(0), v.stride(1),
            x.stride(0), x.stride(1),
            meta.stride(0),
            NB=nb, BLOCK_K=block_k, BLOCK_R=block_r,
        )  # fmt: skip
        _bgmv_multi_expand_kernel[(n_rows, triton.cdiv(n_out, block_n))](
            y, v, meta, scale, *pb,
            first, n_out,
            y.stride(0), y.stride(1),
            v.stride(0), v.stride(1),
            meta.stride(0),
            NB=nb, SPLIT=splits, BLOCK_N=block_n, BLOCK_R=block_r,
        )  # fmt: skip
