"""Triton kernels for batched multi-LoRA: SGMV (prefill segments) and BGMV (decode rows).

Both forms add, for each row i of x that belongs to the rank bucket described by a LoraIndex,
    y[i] += scale[s_i] * (x[i] @ A[s_i]) @ B[s_i]
where s_i is the row's adapter slot, A [S, in, R], B [S, R, out]. Rows outside the bucket are
never read or written. Each form runs as two kernels:
    shrink: v[i] = x[i] @ A[s_i]                     (fp32 intermediate, R columns)
    expand: y[i] = y[i] + scale[s_i] * v[i] @ B[s_i]  (fp32 accumulation, stored in y's dtype)

SGMV walks the segments (start, count, slot) with tiles of BLOCK_M rows and `tl.dot`; BGMV gives
each row its own program and reduces with `tl.sum`. Ranks, in and out sizes need not be powers
of two: block sizes are rounded up with `next_power_of_2` and every load/store is masked.
All tensors are addressed through their strides, so row slices (y[a:b], A_all[layer]) and column
slices of wider tensors work without copies. The references in `caraserve.lora.ops` define the
expected results.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from caraserve.lora.batch import LoraIndex
from caraserve.lora.triton_common import BGMV_TILE, add_into, auto_split_k, np2, row_expand, row_shrink, segment_tile


@triton.jit
def _sgmv_shrink_kernel(
    v_ptr,  # [row_end - row_start, R] float32, written: v[r - row_start] = x[r] @ A[slot]
    x_ptr,  # [T, IN] fp32/fp16/bf16
    a_ptr,  # [S, IN, R] same dtype as x
    seg_start_ptr,  # [G] int32, first row of each segment
    seg_len_ptr,  # [G] int32, rows of each segment
    seg_slot_ptr,  # [G] int32, slot of each segment
    row_base,  # int, index.row_start (row 0 of v)
    IN,  # int, input features
    R,  # int, LoRA rank
    stride_vm,  # v row stride (elements)
    stride_vr,  # v rank stride (elements)
    stride_xm,  # x row stride (elements)
    stride_xk,  # x input-feature stride (elements)
    stride_as,  # A slot stride (elements)
    stride_ak,  # A input-feature stride (elements)
    stride_ar,  # A rank stride (elements)
    BLOCK_M: tl.constexpr,  # rows per tile (>= 16 for tl.dot)
    BLOCK_K: tl.constexpr,  # input features per step (>= 16)
    BLOCK_R: tl.constexpr,  # next_power_of_2(R), >= 16
    DOT_F32: tl.constexpr,  # upcast tl.dot operands to fp32 (interpreter: no bf16 tl.dot)
):
    """v[s+m] = x[s+m] @ A[k] for rows m in [pid1*BLOCK_M, +BLOCK_M) of segment pid0 = (s, n, k)."""
    g = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    if m0 >= tl.load(seg_len_ptr + g):
        return
    m_mask, rows, slot, offs_r, r_mask = segment_tile(g, m0, seg_start_ptr, seg_len_ptr, seg_slot_ptr, R,
                                                      BLOCK_M, BLOCK_R)

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, IN, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < IN
        xb = tl.load(
            x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        ab = tl.load(
            a_ptr + slot * stride_as + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
            mask=k_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        if DOT_F32:
            acc = tl.dot(xb.to(tl.float32), ab.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(xb, ab.to(xb.dtype), acc, input_precision="ieee")

    v_rows = rows - row_base
    tl.store(
        v_ptr + v_rows[:, None] * stride_vm + offs_r[None, :] * stride_vr,
        acc,
        mask=m_mask[:, None] & r_mask[None, :],
    )


@triton.jit
def _sgmv_expand_kernel(
    y_ptr,  # [T, OUT] any float dtype, accumulated in place
    v_ptr,  # [row_end - row_start, R] float32 from the shrink kernel
    b_ptr,  # [S, R, OUT] fp32/fp16/bf16
    scale_ptr,  # [S] float32
    seg_start_ptr,  # [G] int32
    seg_len_ptr,  # [G] int32
    seg_slot_ptr,  # [G] int32
    row_base,  # int, index.row_start (row 0 of v)
    OUT,  # int, output features
    R,  # int, LoRA rank
    stride_ym,  # y row stride (elements)
    stride_yn,  # y output-column stride (elements)
    stride_vm,  # v row stride (elements)
    stride_vr,  # v rank stride (elements)
    stride_bs,  # B slot stride (elements)
    stride_br,  # B rank stride (elements)
    stride_bn,  # B output-column stride (elements)
    stride_scale,  # scale slot stride (elements)
    BLOCK_M: tl.constexpr,  # rows per tile (>= 16)
    BLOCK_N: tl.constexpr,  # output columns per tile (>= 16)
    BLOCK_R: tl.constexpr,  # next_power_of_2(R), >= 16
    DOT_F32: tl.constexpr,  # keep the tl.dot in fp32 (interpreter: no bf16 tl.dot)
):
    """y[s+m, n] += scale[k] * v[s+m] @ B[k][:, n] for the (pid1 rows, pid2 columns) tile of segment pid0."""
    g = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    if m0 >= tl.load(seg_len_ptr + g):
        return
    m_mask, rows, slot, offs_r, r_mask = segment_tile(g, m0, seg_start_ptr, seg_len_ptr, seg_slot_ptr, R,
                                                      BLOCK_M, BLOCK_R)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < OUT

    vb = tl.load(
        v_ptr + (rows - row_base)[:, None] * stride_vm + offs_r[None, :] * stride_vr,
        mask=m_mask[:, None] & r_mask[None, :],
        other=0.0,
    )
    bb = tl.load(
        b_ptr + slot * stride_bs + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
        mask=r_mask[:, None] & n_mask[None, :],
        other=0.0,
    )
    if DOT_F32:
        delta = tl.dot(vb, bb.to(tl.float32), input_precision="ieee")
    else:
        delta = tl.dot(vb.to(bb.dtype), bb, input_precision="ieee")
    delta = delta * tl.load(scale_ptr + slot * stride_scale)

    add_into(y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn, delta,
             m_mask[:, None] & n_mask[None, :])


@triton.jit
def _bgmv_shrink_kernel(
    v_ptr,  # [N, R] float32; written, or atomically accumulated (zero-initialised) when SPLIT_K > 1
    x_ptr,  # [T, IN] fp32/fp16/bf16
    a_ptr,  # [S, IN, R]
    row_slot_ptr,  # [N] int32, slot of each row of the bucket
    row_base,  # int, index.row_start: row i of the bucket is row row_base + i of x
    IN,  # int, input features
    R,  # int, LoRA rank
    K_PER_SPLIT,  # int, input features per program along axis 1 (multiple of BLOCK_K)
    stride_vm,  # v row stride (elements)
    stride_vr,  # v rank stride (elements)
    stride_xm,  # x row stride (elements)
    stride_xk,  # x input-feature stride (elements)
    stride_as,  # A slot stride (elements)
    stride_ak,  # A input-feature stride (elements)
    stride_ar,  # A rank stride (elements)
    SPLIT_K: tl.constexpr,  # programs sharing one row's reduction over IN
    BLOCK_K: tl.constexpr,  # input features per step
    BLOCK_R: tl.constexpr,  # next_power_of_2(R)
):
    """v[i] (+)= x[row_base+i, K] @ A[row_slot[i]][K, :] over the pid1-th chunk K of the input features."""
    i = tl.program_id(0)
    k_begin = tl.program_id(1) * K_PER_SPLIT
    slot = tl.load(row_slot_ptr + i).to(tl.int64)
    row = (row_base + i).to(tl.int64)

    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    acc = row_shrink(x_ptr + row * stride_xm, stride_xk, a_ptr + slot * stride_as, stride_ak, stride_ar, offs_r,
                     r_mask, k_begin, K_PER_SPLIT, IN, BLOCK_K, BLOCK_R)

    v_ptrs = v_ptr + i * stride_vm + offs_r * stride_vr
    if SPLIT_K == 1:
        tl.store(v_ptrs, acc, mask=r_mask)
    else:
        tl.atomic_add(v_ptrs, acc, mask=r_mask)


@triton.jit
def _bgmv_expand_kernel(
    y_ptr,  # [T, OUT] any float dtype, accumulated in place
    v_ptr,  # [N, R] float32 from the shrink kernel
    b_ptr,  # [S, R, OUT]
    scale_ptr,  # [S] float32
    row_slot_ptr,  # [N] int32
    row_base,  # int, index.row_start
    OUT,  # int, output features
    R,  # int, LoRA rank
    stride_ym,  # y row stride (elements)
    stride_yn,  # y output-column stride (elements)
    stride_vm,  # v row stride (elements)
    stride_vr,  # v rank stride (elements)
    stride_bs,  # B slot stride (elements)
    stride_br,  # B rank stride (elements)
    stride_bn,  # B output-column stride (elements)
    stride_scale,  # scale slot stride (elements)
    BLOCK_N: tl.constexpr,  # output columns per program
    BLOCK_R: tl.constexpr,  # next_power_of_2(R)
):
    """y[row_base+i, n] += scale[s] * v[i] @ B[s][:, n] with s = row_slot[i], n in column block pid1."""
    i = tl.program_id(0)
    slot = tl.load(row_slot_ptr + i).to(tl.int64)
    row = (row_base + i).to(tl.int64)

    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < OUT

    vb = tl.load(v_ptr + i * stride_vm + offs_r * stride_vr, mask=r_mask, other=0.0)
    delta = row_expand(vb, b_ptr + slot * stride_bs, stride_br, stride_bn, offs_r, r_mask, offs_n, n_mask)
    add_into(y_ptr + row * stride_ym + offs_n * stride_yn, delta * tl.load(scale_ptr + slot * stride_scale), n_mask)


def _check_args(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, index: LoraIndex
) -> tuple[int, int, int]:
    """Validates shapes and devices (no device sync); returns (in, R, out)."""
    if x.dim() != 2 or y.dim() != 2 or a.dim() != 3 or b.dim() != 3:
        raise ValueError(f"expected x, y 2-D and a, b 3-D; got {x.shape}, {y.shape}, {a.shape}, {b.shape}")
    n_in, rank, n_out = a.shape[1], a.shape[2], b.shape[2]
    if x.shape[1] != n_in or b.shape[1] != rank or y.shape[1] != n_out or b.shape[0] != a.shape[0]:
        raise ValueError(f"shape mismatch: x {x.shape}, a {a.shape}, b {b.shape}, y {y.shape}")
    if y.shape[0] != x.shape[0] or index.row_end > x.shape[0]:
        raise ValueError(f"rows: x {x.shape[0]}, y {y.shape[0]}, bucket ends at {index.row_end}")
    if scale.dim() != 1 or scale.shape[0] != a.shape[0]:
        raise ValueError(f"scale must be [S={a.shape[0]}], got {tuple(scale.shape)}")
    dev = y.device
    for name, t in (("x", x), ("a", a), ("b", b), ("scale", scale), ("index", index.seg_start)):
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device}, y on {dev}")
    return n_in, rank, n_out


def sgmv(
    y: torch.Tensor,  # [T, out] accumulated in place
    x: torch.Tensor,  # [T, in]
    a: torch.Tensor,  # [S, in, R]
    b: torch.Tensor,  # [S, R, out]
    scale: torch.Tensor,  # [S] float32
    index: LoraIndex,
) -> None:
    """Segment form: y[s:s+n] += scale[k] * (x[s:s+n] @ A[k]) @ B[k] for each segment (s, n, k)."""
    n_in, rank, n_out = _check_args(y, x, a, b, scale, index)
    n_seg = len(index.segments)
    n_rows = index.row_end - index.row_start
    v = torch.empty((n_rows, rank), dtype=torch.float32, device=y.device)

    block_r = np2(rank, 16)
    block_m = min(64 if block_r <= 128 else 32, np2(index.max_seg_len, 16))  # acc tile stays in registers
    block_k = min(64, np2(n_in, 16))
    block_n = min(128 if block_r <= 64 else 64, np2(n_out, 16))
    m_blocks = triton.cdiv(index.max_seg_len, block_m)
    # The interpreter stores bf16 as raw uint16 and its tl.dot multiplies the bit patterns
    # (triton-lang/triton#11584); compiled kernels keep the native bf16 dot.
    dot_f32 = os.environ.get("TRITON_INTERPRET") == "1" and torch.bfloat16 in (x.dtype, a.dtype, b.dtype)

    _sgmv_shrink_kernel[(n_seg, m_blocks)](
        v, x, a, index.seg_start, index.seg_len, index.seg_slot,
        index.row_start, n_in, rank,
        v.stride(0), v.stride(1),
        x.stride(0), x.stride(1),
        a.stride(0), a.stride(1), a.stride(2),
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, DOT_F32=dot_f32,
    )  # fmt: skip
    _sgmv_expand_kernel[(n_seg, m_blocks, triton.cdiv(n_out, block_n))](
        y, v, b, scale, index.seg_start, index.seg_len, index.seg_slot,
        index.row_start, n_out, rank,
        y.stride(0), y.stride(1),
        v.stride(0), v.stride(1),
        b.stride(0), b.stride(1), b.stride(2),
        scale.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, DOT_F32=dot_f32,
    )  # fmt: skip


def bgmv(
    y: torch.Tensor,  # [T, out] accumulated in place; rows index.row_start..row_end are touched
    x: torch.Tensor,  # [T, in]
    a: torch.Tensor,  # [S, in, R]
    b: torch.Tensor,  # [S, R, out]
    scale: torch.Tensor,  # [S] float32
    index: LoraIndex,
    split_k: int | None = 1,  # programs per row for the IN reduction; None picks one (atomics if > 1)
) -> None:
    """Row form: y[i] += scale[s_i] * (x[i] @ A[s_i]) @ B[s_i], one gathered slot per row.

    split_k defaults to 1 so a decode step is bit-for-bit repeatable: with split_k > 1 the
    partial sums meet in fp32 atomics whose order is not fixed."""
    n_in, rank, n_out = _check_args(y, x, a, b, scale, index)
    n_rows = index.row_end - index.row_start
    if split_k is None:
        split_k = auto_split_k(n_rows, n_in)
    split_k = max(1, min(split_k, n_in))

    block_r = np2(rank)
    block_k = min(np2(n_in), max(16, BGMV_TILE // block_r))
    chunk = triton.cdiv(n_in, split_k)
    if split_k > 1:
        block_k = min(block_k, np2(chunk))
    k_per_split = triton.cdiv(chunk, block_k) * block_k
    split_k = triton.cdiv(n_in, k_per_split)  # drop programs that would see no input feature
    block_n = min(np2(n_out), max(16, BGMV_TILE // block_r))

    alloc = torch.zeros if split_k > 1 else torch.empty
    v = alloc((n_rows, rank), dtype=torch.float32, device=y.device)
    _bgmv_shrink_kernel[(n_rows, split_k)](
        v, x, a, index.row_slot,
        index.row_start, n_in, rank, k_per_split,
        v.stride(0), v.stride(1),
        x.stride(0), x.stride(1),
        a.stride(0), a.stride(1), a.stride(2),
        SPLIT_K=split_k, BLOCK_K=block_k, BLOCK_R=block_r,
    )  # fmt: skip
    _bgmv_expand_kernel[(n_rows, triton.cdiv(n_out, block_n))](
        y, v, b, scale, index.row_slot,
        index.row_start, n_out, rank,
        y.stride(0), y.stride(1),
        v.stride(0), v.stride(1),
        b.stride(0), b.stride(1), b.stride(2),
        scale.stride(0),
        BLOCK_N=block_n, BLOCK_R=block_r,
    )  # fmt: skip

