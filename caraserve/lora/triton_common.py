"""Launch-size helpers the Triton LoRA kernels (`triton_ops`, `triton_multi`) share."""

from __future__ import annotations

import triton
import triton.language as tl

# Elements of a BGMV program's weight tile (BLOCK_K x BLOCK_R or BLOCK_R x BLOCK_N): the rank
# sets one side, this bound the other, so the tile stays in registers.
BGMV_TILE = 8192


def np2(n: int, lo: int = 1) -> int:
    """The next power of two >= n, at least lo."""
    return max(lo, triton.next_power_of_2(n))


def auto_split_k(n_rows: int, n_in: int) -> int:
    """Splits the IN reduction when few rows would leave the GPU idle; 1 (deterministic) otherwise."""
    if n_rows >= 64 or n_in < 2048:
        return 1
    return min(8, n_in // 1024)


# ---- jitted pieces the kernels share (inlined into each kernel by Triton) ----------------------

@triton.jit
def segment_tile(seg_start_ptr, seg_len_ptr, seg_slot_ptr, R, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """The SGMV tile of this program: rows [m0, m0 + BLOCK_M) of segment g, with g the program's
    axis-0 id and m0 = axis-1 id * BLOCK_M. Returns (whether the tile has rows, row mask, rows of
    x and y as int64, the segment's slot, rank offsets, rank mask)."""
    g = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    seg_len = tl.load(seg_len_ptr + g)
    start = tl.load(seg_start_ptr + g)
    slot = tl.load(seg_slot_ptr + g).to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    return m0 < seg_len, offs_m < seg_len, (start + offs_m).to(tl.int64), slot, offs_r, offs_r < R


@triton.jit
def dot(p, q, acc, DOT_F32: tl.constexpr):
    """acc + p @ q (tl.dot, IEEE float32 accumulation) of operands of one dtype; DOT_F32 upcasts
    them first (the interpreter has no bf16 tl.dot: it multiplies the raw bits,
    triton-lang/triton#11584; compiled kernels keep the native dot)."""
    if DOT_F32:
        return tl.dot(p.to(tl.float32), q.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(p, q, acc, input_precision="ieee")


@triton.jit
def row_shrink(x_row_ptr, stride_xk, a_ptr, stride_ak, stride_ar, offs_r, r_mask, k_begin, K_SPAN, IN,
               BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """x[row, K] @ A[K, :] in float32 for one row over input features [k_begin, k_begin + K_SPAN)."""
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K_SPAN, BLOCK_K):
        offs_k = k_begin + k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < IN
        xb = tl.load(x_row_ptr + offs_k * stride_xk, mask=k_mask, other=0.0)
        ab = tl.load(a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
                     mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc += tl.sum(xb.to(tl.float32)[:, None] * ab.to(tl.float32), axis=0)
    return acc


@triton.jit
def row_expand(vb, b_ptr, stride_br, stride_bn, offs_r, r_mask, offs_n, n_mask):
    """v[:] @ B[:, n] in float32 for one row's rank vector vb over the columns offs_n."""
    bb = tl.load(b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                 mask=r_mask[:, None] & n_mask[None, :], other=0.0)
    return tl.sum(vb[:, None] * bb.to(tl.float32), axis=0)


@triton.jit
def add_into(y_ptrs, delta, mask):
    """y += delta (float32), stored in y's dtype."""
    yb = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (yb.to(tl.float32) + delta).to(yb.dtype), mask=mask)
