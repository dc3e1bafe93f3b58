"""Multi-bucket BGMV: the LoRA delta of a decode batch whose rows use adapters of several rank
buckets, in one Triton launch pair per adapted module.

    y[i] += scale[i] * (x[i] @ A_b[s]) @ B_b[s]    for row i of bucket b, slot s (b = -1: no adapter)

Each rank bucket is a separate pool tensor (A [S, in, R_b], B [S, R_b, out]): a launch takes a
table of their addresses (`pointer_tables`, one int64 per bucket) and each row loads its
bucket's, so any number of buckets takes one launch pair. Rows are described by a [3, N] int32 table
(bucket, slot, rank) and a [N] float32 scale, so a compiled decode step issues the same two
kernels whatever the batch's adapter mix (used by graphs.DecodeGraphs on CUDA). The shrink
splits the input features over several programs per row and the expand adds their partial sums
in a fixed order: results repeat bit for bit.

Modules that read the same input (the parts of a fused projection: q/k/v, gate/up) take one
launch pair together (`bgmv_multi_parts`): the shrink's grid has a parts axis (each part's
programs read the row's x), and the expand writes each part into its own columns of the fused
output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from caraserve.lora.triton_common import BGMV_TILE, add_into, auto_split_k, np2, row_expand, row_shrink


@triton.jit
def _bgmv_multi_shrink_kernel(
    v_ptr,  # [P, SPLIT, N, BLOCK_R] float32: partial sums, one per part and input-feature chunk
    x_ptr,  # [N, IN]
    meta_ptr,  # [3, N] int32: bucket, slot, rank of each row
    a_table,  # [P, buckets] int64: address of part p's A [S, IN, R_b] per bucket (contiguous, x's dtype)
    IN,  # int, input features
    K_PER_SPLIT,  # int, input features per program along axis 1 (multiple of BLOCK_K)
    stride_ap,  # a_table part stride (elements)
    stride_vp, stride_vs, stride_vm,  # v part, split and row strides (elements)
    stride_xm, stride_xk,  # x strides (elements)
    stride_meta,  # meta row stride (elements)
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,  # next_power_of_2 of the largest rank
):
    """v[pid2, pid1, i] = x[i, K] @ A_b[s][K, :] of part pid2 over the pid1-th chunk K, for rows
    with an adapter."""
    i = tl.program_id(0)
    bucket = tl.load(meta_ptr + i)
    if bucket >= 0:
        p = tl.program_id(2)
        slot = tl.load(meta_ptr + stride_meta + i).to(tl.int64)
        rank = tl.load(meta_ptr + 2 * stride_meta + i)
        a_ptr = tl.load(a_table + p * stride_ap + bucket).to(tl.pointer_type(x_ptr.dtype.element_ty)) \
            + slot * IN * rank
        k_begin = tl.program_id(1) * K_PER_SPLIT
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        acc = row_shrink(x_ptr + i.to(tl.int64) * stride_xm, stride_xk, a_ptr, rank, 1, offs_r, r_mask, k_begin,
                         K_PER_SPLIT, IN, BLOCK_K, BLOCK_R)
        tl.store(v_ptr + p * stride_vp + tl.program_id(1) * stride_vs + i * stride_vm + offs_r, acc, mask=r_mask)


@triton.jit
def _bgmv_multi_expand_kernel(
    y_ptr,  # [N, columns], accumulated in place: part p in columns [col_p, col_p + out_p)
    v_ptr,  # [P, SPLIT, N, BLOCK_R] float32 from the shrink kernel
    meta_ptr,  # [3, N] int32
    scale_ptr,  # [N] float32, each row's adapter scale
    b_table,  # [P, buckets] int64: address of part p's B [S, R_b, out_p] per bucket (contiguous, y's dtype)
    outs_ptr,  # [P] int32: out_p
    cols_ptr,  # [P] int32: col_p
    stride_bp,
    stride_ym, stride_yn,
    stride_vp, stride_vs, stride_vm,
    stride_meta,
    SPLIT: tl.constexpr,  # partial sums to add, in a fixed order (deterministic)
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """y[i, col_p + n] += scale[i] * (sum of v[p, :, i]) @ B_b[s][:, n] of part p = pid2 over the
    pid1-th column block n."""
    i = tl.program_id(0)
    bucket = tl.load(meta_ptr + i)
    p = tl.program_id(2)
    out = tl.load(outs_ptr + p)
    if bucket >= 0 and tl.program_id(1) * BLOCK_N < out:
        slot = tl.load(meta_ptr + stride_meta + i).to(tl.int64)
        rank = tl.load(meta_ptr + 2 * stride_meta + i)
        b_ptr = tl.load(b_table + p * stride_bp + bucket).to(tl.pointer_type(y_ptr.dtype.element_ty)) \
            + slot * rank * out
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        vb = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for s in tl.static_range(SPLIT):
            vb += tl.load(v_ptr + p * stride_vp + s * stride_vs + i * stride_vm + offs_r, mask=r_mask, other=0.0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < out
        delta = row_expand(vb, b_ptr, out, 1, offs_r, r_mask, offs_n, n_mask) * tl.load(scale_ptr + i)
        cols = tl.load(cols_ptr + p) + offs_n
        add_into(y_ptr + i.to(tl.int64) * stride_ym + cols * stride_yn, delta, n_mask)


def pointer_tables(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' address tables of the buckets' A and B tensors ([buckets] int64 on their
    device). Valid while those tensors live where they are: the pool's never move, so a caller
    may build them once (a compiled step cannot read addresses while it is traced)."""
    dev = a[0].device
    return (torch.tensor([t.data_ptr() for t in a], dtype=torch.int64, device=dev),
            torch.tensor([t.data_ptr() for t in b], dtype=torch.int64, device=dev))


def part_tables(parts: list[tuple[list[torch.Tensor], list[torch.Tensor], int]]) -> tuple[torch.Tensor, ...]:
    """`bgmv_multi_parts`' tables of (A per bucket, B per bucket, first column) parts: A and B
    addresses [P, buckets] int64, each part's output width and first column [P] int32."""
    dev = parts[0][0][0].device
    tables = [pointer_tables(a, b) for a, b, _ in parts]
    return (torch.stack([t[0] for t in tables]), torch.stack([t[1] for t in tables]),
            torch.tensor([b[0].shape[2] for _, b, _ in parts], dtype=torch.int32, device=dev),
            torch.tensor([col for *_, col in parts], dtype=torch.int32, device=dev))


def bgmv_multi(
    y: torch.Tensor,  # [N, out] accumulated in place
    x: torch.Tensor,  # [N, in]
    a: list[torch.Tensor],  # per rank bucket: [S, in, R_b], contiguous, x's dtype
    b: list[torch.Tensor],  # per rank bucket: [S, R_b, out], contiguous, y's dtype
    meta: torch.Tensor,  # [3, N] int32: bucket (-1 = none), slot, rank of each row
    scale: torch.Tensor,  # [N] float32, each row's scale
    split_k: int | None = None,  # input-feature chunks per row (None: enough programs to fill a GPU)
    tables: tuple[torch.Tensor, torch.Tensor] | None = None,  # pointer_tables(a, b), if built already
) -> None:
    """y[i] += scale[i] * (x[i] @ A_b[s]) @ B_b[s] with (b, s) = meta[:2, i]; rows with b = -1 untouched.

    The chunks' partial sums are added in a fixed order, so the result does not vary between runs."""
    if len(a) != len(b) or not a:
        raise ValueError(f"expected one A and one B per rank bucket, got {len(a)} and {len(b)}")
    if tables is not None:
        a_table, b_table = tables
        if a_table.shape != (len(a),) or b_table.shape != (len(b),) or \
                a_table.dtype != torch.int64 or b_table.dtype != torch.int64:
            raise ValueError(f"tables: expected two [{len(a)}] int64 address tables, got {tuple(a_table.shape)} "
                             f"{a_table.dtype} and {tuple(b_table.shape)} {b_table.dtype}")
        one = torch.zeros(1, dtype=torch.int32, device=y.device)
        tables = (a_table[None], b_table[None], one + b[0].shape[2], one)
    bgmv_multi_parts(y, x, [(a, b, 0)], meta, scale, split_k, tables)


def _check_multi_args(y, x, parts, meta, scale) -> int:
    """bgmv_multi_parts' inputs checked before a kernel reads them (the rows' bucket and slot
    values stay on the device, unread). Returns the number of rank buckets."""
    n_rows, n_in = x.shape
    if not parts:
        raise ValueError("expected at least one part")
    if meta.shape != (3, n_rows) or scale.shape != (n_rows,) or y.shape[0] != n_rows:
        raise ValueError(f"rows: x {tuple(x.shape)}, y {tuple(y.shape)}, meta {tuple(meta.shape)}, "
                         f"scale {tuple(scale.shape)}")
    if meta.dtype != torch.int32 or meta.stride(1) != 1 or scale.dtype != torch.float32:
        raise ValueError(f"meta must be int32 with unit column stride and scale float32, got meta {meta.dtype} "
                         f"strides {meta.stride()}, scale {scale.dtype}")
    if len({x.device, y.device, meta.device, scale.device}) != 1:
        raise ValueError(f"x, y, meta and scale must share a device, got {x.device}, {y.device}, {meta.device}, "
                         f"{scale.device}")
    n_buckets = len(parts[0][0])
    for a, b, col in parts:
        if len(a) != len(b) or len(a) != n_buckets or not a:
            raise ValueError(f"expected one A and one B per rank bucket in every part, got {len(a)} and {len(b)}")
        n_out = b[0].shape[2]
        if not 0 <= col <= y.shape[1] - n_out:
            raise ValueError(f"part columns [{col}, {col + n_out}) are outside y's {y.shape[1]}")
        for ai, bi in zip(a, b):
            if ai.shape[1] != n_in or bi.shape[2] != n_out or ai.shape[2] != bi.shape[1]:
                raise ValueError(f"bucket shapes: A {tuple(ai.shape)}, B {tuple(bi.shape)} for x {tuple(x.shape)}, "
                                 f"y {tuple(y.shape)}")
            if not (ai.is_contiguous() and bi.is_contiguous()):
                raise ValueError("bucket weights must be contiguous")
            if ai.dtype != x.dtype or bi.dtype != y.dtype or ai.device != x.device or bi.device != y.device:
                raise ValueError(f"bucket weights must be A in x's dtype and device ({x.dtype}, {x.device}) and B "
                                 f"in y's ({y.dtype}, {y.device}), got {ai.dtype} on {ai.device}, {bi.dtype} on "
                                 f"{bi.device}")
    return n_buckets


def bgmv_multi_parts(
    y: torch.Tensor,  # [N, columns] accumulated in place
    x: torch.Tensor,  # [N, in]
    parts: list[tuple[list[torch.Tensor], list[torch.Tensor], int]],  # (A per bucket, B per bucket, first column)
    meta: torch.Tensor,  # [3, N] int32: bucket (-1 = none), slot, rank of each row
    scale: torch.Tensor,  # [N] float32, each row's scale
    split_k: int | None = None,
    tables: tuple[torch.Tensor, ...] | None = None,  # part_tables(parts), if built already
) -> None:
    """For each part (A_p, B_p, c_p) of modules reading x: y[i, c_p:c_p + out_p] += scale[i] *
    (x[i] @ A_p,b[s]) @ B_p,b[s] with (b, s) = meta[:2, i], in one launch pair for all parts;
    rows with b = -1 untouched. Deterministic, as bgmv_multi."""
    n_rows, n_in = x.shape
    n_buckets = _check_multi_args(y, x, parts, meta, scale)
    n_parts = len(parts)
    a_table, b_table, outs, cols = tables if tables is not None else part_tables(parts)
    if a_table.shape != (n_parts, n_buckets) or b_table.shape != (n_parts, n_buckets) or \
            a_table.dtype != torch.int64 or b_table.dtype != torch.int64 or outs.shape != (n_parts,) or \
            cols.shape != (n_parts,):
        raise ValueError(f"tables: expected [{n_parts}, {n_buckets}] int64 address tables and [{n_parts}] widths "
                         f"and columns, got {tuple(a_table.shape)} {a_table.dtype}, {tuple(b_table.shape)}, "
                         f"{tuple(outs.shape)}, {tuple(cols.shape)}")
    if any(t.device != y.device for t in (a_table, b_table, outs, cols)) or outs.dtype != torch.int32 or \
            cols.dtype != torch.int32:
        raise ValueError(f"tables must be on y's device ({y.device}), widths and columns int32")
    if split_k is None:
        split_k = auto_split_k(n_rows, n_in)
    block_r = np2(max(t.shape[2] for a, _, _ in parts for t in a))
    block_k = min(np2(n_in), max(16, BGMV_TILE // block_r))
    chunk = triton.cdiv(n_in, max(1, min(split_k, n_in)))
    block_k = min(block_k, np2(chunk))
    k_per_split = triton.cdiv(chunk, block_k) * block_k
    splits = triton.cdiv(n_in, k_per_split)
    max_out = max(b[0].shape[2] for _, b, _ in parts)
    block_n = min(np2(max_out), max(16, BGMV_TILE // block_r))
    v = torch.empty((n_parts, splits, n_rows, block_r), dtype=torch.float32, device=y.device)
    _bgmv_multi_shrink_kernel[(n_rows, splits, n_parts)](
        v, x, meta, a_table,
        n_in, k_per_split,
        a_table.stride(0),
        v.stride(0), v.stride(1), v.stride(2),
        x.stride(0), x.stride(1),
        meta.stride(0),
        BLOCK_K=block_k, BLOCK_R=block_r,
    )  # fmt: skip
    _bgmv_multi_expand_kernel[(n_rows, triton.cdiv(max_out, block_n), n_parts)](
        y, v, meta, scale, b_table, outs, cols,
        b_table.stride(0),
        y.stride(0), y.stride(1),
        v.stride(0), v.stride(1), v.stride(2),
        meta.stride(0),
        SPLIT=splits, BLOCK_N=block_n, BLOCK_R=block_r,
    )  # fmt: skip
