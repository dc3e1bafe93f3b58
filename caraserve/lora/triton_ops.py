"""Triton SGMV: the LoRA delta of a rank bucket's prompt segments (prefill and mixed steps).

It adds, for each row i of x that belongs to the rank bucket described by a LoraIndex,
    y[i] += scale[s_i] * (x[i] @ A[s_i]) @ B[s_i]
where s_i is the row's adapter slot, A [S, in, R], B [S, R, out] (`caraserve.lora.ops.
sgmv_reference` states it in torch). Rows outside the bucket are never read or written. Two kernels:
    shrink: v[i] = x[i] @ A[s_i]                     (fp32 intermediate, R columns)
    expand: y[i] = y[i] + scale[s_i] * v[i] @ B[s_i]  (fp32 accumulation, stored in y's dtype)
walk the segments (start, count, slot) with tiles of BLOCK_M rows and `tl.dot`. Ranks, in and
out sizes need not be powers of two: block sizes are rounded up with `next_power_of_2` and every
load/store is masked. All tensors are addressed through their strides, so row slices (y[a:b],
A_all[layer]) and column slices of wider tensors work without copies. Decode rows take the
multi-bucket row form instead (`caraserve.lora.triton_multi`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from caraserve.lora.batch import LoraIndex
from caraserve.lora.triton_common import add_into, dot, np2, segment_tile


@triton.jit
def _sgmv_shrink_kernel(
    v_ptr,  # [row_end - row_start, R] float32, written: v[r - row_start] = x[r] @ A[slot]
    x_ptr,  # [T, IN] fp32/fp16/bf16
    a_ptr,  # [S, IN, R] same dtype as x
    seg_start_ptr,  # [G] int32, first row of each segment
    seg_len_ptr,  # [G] int32, rows of each segment
    seg_slot_ptr,  # [G] int32, slot of each segment
    row_base,  # int, index.row_start (row 0 of v)
    IN, R,  # ints: input features, LoRA rank
    stride_vm, stride_vr, stride_xm, stride_xk,  # v and x: row and column strides (elements)
    stride_as, stride_ak, stride_ar,  # A: slot, input-feature and rank strides (elements)
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,  # rows per tile, input features per step (>= 16 for tl.dot)
    BLOCK_R: tl.constexpr,  # next_power_of_2(R), >= 16
    DOT_F32: tl.constexpr,  # upcast tl.dot operands to fp32 (triton_common.dot)
):
    """v[s+m] = x[s+m] @ A[k] for rows m in [pid1*BLOCK_M, +BLOCK_M) of segment pid0 = (s, n, k)."""
    live, m_mask, rows, slot, offs_r, r_mask = segment_tile(seg_start_ptr, seg_len_ptr, seg_slot_ptr, R,
                                                            BLOCK_M, BLOCK_R)
    if live:
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, IN, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < IN
            xb = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                         mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            ab = tl.load(a_ptr + slot * stride_as + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
                         mask=k_mask[:, None] & r_mask[None, :], other=0.0)
            acc = dot(xb, ab.to(xb.dtype), acc, DOT_F32)
        tl.store(v_ptr + (rows - row_base)[:, None] * stride_vm + offs_r[None, :] * stride_vr, acc,
                 mask=m_mask[:, None] & r_mask[None, :])


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
    OUT, R,  # ints: output features, LoRA rank
    stride_ym, stride_yn, stride_vm, stride_vr,  # y and v: row and column strides (elements)
    stride_bs, stride_br, stride_bn, stride_scale,  # B: slot, rank and output-column strides; scale's
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # rows and output columns per tile (>= 16 for tl.dot)
    BLOCK_R: tl.constexpr,  # next_power_of_2(R), >= 16
    DOT_F32: tl.constexpr,  # upcast tl.dot operands to fp32 (triton_common.dot)
):
    """y[s+m, n] += scale[k] * v[s+m] @ B[k][:, n] for the (pid1 rows, pid2 columns) tile of segment pid0."""
    live, m_mask, rows, slot, offs_r, r_mask = segment_tile(seg_start_ptr, seg_len_ptr, seg_slot_ptr, R,
                                                            BLOCK_M, BLOCK_R)
    if live:
        offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < OUT
        vb = tl.load(v_ptr + (rows - row_base)[:, None] * stride_vm + offs_r[None, :] * stride_vr,
                     mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        bb = tl.load(b_ptr + slot * stride_bs + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                     mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        delta = dot(vb.to(bb.dtype), bb, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), DOT_F32)
        add_into(y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn,
                 delta * tl.load(scale_ptr + slot * stride_scale), m_mask[:, None] & n_mask[None, :])


def _check_args(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, index: LoraIndex
) -> tuple[int, int, int]:
    """Validates shapes, dtypes, devices and the segments' rows and slots (host data: no device
    sync); returns (in, R, out)."""
    if x.dim() != 2 or y.dim() != 2 or a.dim() != 3 or b.dim() != 3:
        raise ValueError(f"expected x, y 2-D and a, b 3-D; got {x.shape}, {y.shape}, {a.shape}, {b.shape}")
    n_in, rank, n_out = a.shape[1], a.shape[2], b.shape[2]
    if x.shape[1] != n_in or b.shape[1] != rank or y.shape[1] != n_out or b.shape[0] != a.shape[0]:
        raise ValueError(f"shape mismatch: x {x.shape}, a {a.shape}, b {b.shape}, y {y.shape}")
    if y.shape[0] != x.shape[0] or index.row_end > x.shape[0]:
        raise ValueError(f"rows: x {x.shape[0]}, y {y.shape[0]}, bucket ends at {index.row_end}")
    if scale.dim() != 1 or scale.shape[0] != a.shape[0]:
        raise ValueError(f"scale must be [S={a.shape[0]}], got {tuple(scale.shape)}")
    if a.dtype != x.dtype or b.dtype != y.dtype or scale.dtype != torch.float32:
        raise ValueError(f"a must be in x's dtype ({x.dtype}), b in y's ({y.dtype}) and scale float32, got "
                         f"{a.dtype}, {b.dtype}, {scale.dtype}")
    if any(not (index.row_start <= start and start + count <= index.row_end and 0 <= slot < a.shape[0])
           for start, count, slot in index.segments):
        raise ValueError(f"segments {index.segments} leave rows [{index.row_start}, {index.row_end}) or slots "
                         f"[0, {a.shape[0]})")
    dev = y.device
    for name, t in (("x", x), ("a", a), ("b", b), ("scale", scale), ("seg_start", index.seg_start),
                    ("seg_len", index.seg_len), ("seg_slot", index.seg_slot)):
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device}, y on {dev}")
    return n_in, rank, n_out


def sgmv(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
         index: LoraIndex) -> None:
    """`caraserve.lora.ops.sgmv_reference` (same arguments and shapes) in two launches:
    y[s:s+n] += scale[k] * (x[s:s+n] @ A[k]) @ B[k] for each segment (s, n, k) of the bucket."""
    n_in, rank, n_out = _check_args(y, x, a, b, scale, index)
    n_seg = len(index.segments)
    n_rows = index.row_end - index.row_start
    v = torch.empty((n_rows, rank), dtype=torch.float32, device=y.device)

    block_r = np2(rank, 16)
    block_m = min(64 if block_r <= 128 else 32, np2(index.max_seg_len, 16))  # acc tile stays in registers
    block_k = min(64, np2(n_in, 16))
    block_n = min(128 if block_r <= 64 else 64, np2(n_out, 16))
    m_blocks = triton.cdiv(index.max_seg_len, block_m)
    # the interpreter's tl.dot cannot take bf16 operands (triton_common.dot)
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
