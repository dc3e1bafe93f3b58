"""The elementwise stages of a decoder layer as Triton kernels (GPUs), for eager steps (prefill,
mixed steps): one launch each instead of a chain of small torch ops. Compiled steps keep the
plain torch form, which inductor fuses with its neighbours. The semantics, intermediate roundings
to the activations' dtype included, are those of `caraserve.model.layers.add_rms_norm_reference`
and `caraserve.attention.rotary_write_kv_reference`.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl


def _on(t: torch.Tensor):
    """The launch's device context: Triton launches on the current CUDA device and its stream,
    and a placed model's layers may live on another GPU than the current one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@triton.jit
def _add_rms_norm_kernel(
    out_ptr,  # [T, D] the normalized rows
    res_ptr,  # [T, D] contiguous: residual, replaced by residual + x
    x_ptr,  # [T, D] rows at stride ld_x (unused without HAS_X)
    w_ptr,  # [D]
    dim, ld_x, eps,
    HAS_X: tl.constexpr, UNIT_OFFSET: tl.constexpr, F32_WEIGHT: tl.constexpr, BLOCK: tl.constexpr,
):
    """r = round(residual + x); n = r / sqrt(mean(r^2) + eps); out = round(w * round(n)), or with
    UNIT_OFFSET round(n * (1 + w)) in float32 (Gemma's), with F32_WEIGHT round(w * n) in float32
    (OLMo 2's), one row per program."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    r = tl.load(res_ptr + t * dim + cols, mask=mask, other=0.0)
    if HAS_X:
        x = tl.load(x_ptr + t * ld_x + cols, mask=mask, other=0.0)
        r = (r.to(tl.float32) + x.to(tl.float32)).to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + t * dim + cols, r, mask=mask)
    z = r.to(tl.float32)
    inv = tl.rsqrt(tl.sum(z * z, axis=0) / dim + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if UNIT_OFFSET:
        y = (z * inv) * (1.0 + w)
    elif F32_WEIGHT:
        y = w * (z * inv)
    else:
        y = w * (z * inv).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + t * dim + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 unit_offset: bool = False, float32_weight: bool = False) -> torch.Tensor:
    """The normalized rows [T, D]; residual (contiguous [T, D]) becomes residual + x in place (x
    None: left as it is). x [T, D] with unit column stride, weight [D], one device and dtype.
    unit_offset: the weight is Gemma's, 1's offset; float32_weight: the weight applied in float32
    (add_rms_norm_reference)."""
    if residual.dim() != 2 or not residual.is_contiguous():
        raise ValueError(f"add_rms_norm: residual must be a contiguous 2-D tensor, got {list(residual.shape)}")
    rows, dim = residual.shape
    if x is not None and (x.shape != residual.shape or x.stride(1) != 1 or x.dtype != residual.dtype):
        raise ValueError(f"add_rms_norm: x {list(x.shape)} {x.dtype} strides {x.stride()} does not match "
                         f"residual {list(residual.shape)} {residual.dtype} in unit-stride rows")
    if weight.shape != (dim,) or not weight.is_contiguous():
        raise ValueError(f"add_rms_norm: weight must be contiguous [{dim}], got {list(weight.shape)}")
    out = torch.empty_like(residual)
    block = triton.next_power_of_2(dim)  # a row per program; wide rows get more warps (fewer registers each)
    if rows:
        with _on(residual):
            _add_rms_norm_kernel[(rows,)](out, residual, residual if x is None else x, weight, dim,
                                          0 if x is None else x.stride(0), eps, HAS_X=x is not None,
                                          UNIT_OFFSET=unit_offset, F32_WEIGHT=float32_weight, BLOCK=block,
                                          num_warps=min(16, max(4, block // 512)))
    return out


@triton.jit
def _rotate(dst_ptr, src_ptr, src_stride, dst_stride, n_heads, c1, c2, s1, s2, heads, i, HALF: tl.constexpr,
            INTERLEAVED: tl.constexpr, F32_MATH: tl.constexpr):
    """dst[h] = rot(src[h]) for the heads h < n_heads, with each product and the sum rounded to
    the destination's dtype (as the unfused x * cos + rotate_half(x) * sin), or with F32_MATH in
    float32 and rounded once; pair i is (i, i + HALF), or (2i, 2i + 1) where INTERLEAVED (GLM's
    rope)."""
    mask = (heads[:, None] < n_heads) & (i[None, :] < HALF)
    if INTERLEAVED:
        first = 2 * i[None, :]
        second = first + 1
    else:
        first = i[None, :]
        second = first + HALF
    src = src_ptr + heads[:, None] * src_stride
    x1 = tl.load(src + first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + second, mask=mask, other=0.0).to(tl.float32)
    ty = dst_ptr.dtype.element_ty
    if F32_MATH:
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    else:
        o1 = (x1 * c1).to(ty).to(tl.float32) - (x2 * s1).to(ty).to(tl.float32)
        o2 = (x2 * c2).to(ty).to(tl.float32) + (x1 * s2).to(ty).to(tl.float32)
    dst = dst_ptr + heads[:, None] * dst_stride
    tl.store(dst + first, o1.to(ty), mask=mask)
    tl.store(dst + second, o2.to(ty), mask=mask)


@triton.jit
def _rotary_write_kv_kernel(
    q_out_ptr,  # [T, H, D] contiguous
    q_ptr, k_ptr, v_ptr,  # [T, H | KV, D]: rows at ld_q / ld_k / ld_v, heads contiguous
    cos_ptr, sin_ptr,  # [T, 2 * HALF] contiguous
    k_cache_ptr, v_cache_ptr,  # [blocks * BS, KV, D] contiguous
    slot_ptr,  # [T] int64
    n_heads, n_kv, ld_q, ld_k, ld_v,
    HALF: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
    INTERLEAVED: tl.constexpr, F32_MATH: tl.constexpr,
):
    """q_out[t] = rot_t(q[t]); K[slot[t]] = rot_t(k[t]); V[slot[t]] = v[t], one token per program;
    rot_t turns each head's first 2 * HALF dimensions (as _rotate says) and passes the others."""
    t = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)
    heads = tl.arange(0, BLOCK_H)
    cs = cos_ptr + t * 2 * HALF + i[None, :]
    sn = sin_ptr + t * 2 * HALF + i[None, :]
    m = i[None, :] < HALF
    c1 = tl.load(cs, mask=m, other=0.0).to(tl.float32)
    c2 = tl.load(cs + HALF, mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(sn, mask=m, other=0.0).to(tl.float32)
    s2 = tl.load(sn + HALF, mask=m, other=0.0).to(tl.float32)
    _rotate(q_out_ptr + t * n_heads * D, q_ptr + t * ld_q, D, D, n_heads, c1, c2, s1, s2, heads, i, HALF, INTERLEAVED,
            F32_MATH)
    slot = tl.load(slot_ptr + t)
    row = slot * n_kv * D
    _rotate(k_cache_ptr + row, k_ptr + t * ld_k, D, D, n_kv, c1, c2, s1, s2, heads, i, HALF, INTERLEAVED,
            F32_MATH)
    j = tl.arange(0, BLOCK_D)
    offs = heads[:, None] * D + j[None, :]
    if 2 * HALF < D:  # partial rotary: the dimensions past the turned ones pass unchanged
        passing = (j[None, :] >= 2 * HALF) & (j[None, :] < D)
        mask = passing & (heads[:, None] < n_heads)
        tl.store(q_out_ptr + t * n_heads * D + offs, tl.load(q_ptr + t * ld_q + offs, mask=mask), mask=mask)
        mask = passing & (heads[:, None] < n_kv)
        tl.store(k_cache_ptr + row + offs, tl.load(k_ptr + t * ld_k + offs, mask=mask), mask=mask)
    mask = (heads[:, None] < n_kv) & (j[None, :] < D)
    tl.store(v_cache_ptr + row + offs, tl.load(v_ptr + t * ld_v + offs, mask=mask), mask=mask)


def rotary_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                    interleaved: bool = False, float32: bool = False) -> torch.Tensor:
    """The rotated q as a new contiguous [T, H, D]; the rotated k and v written to the caches
    [blocks, BS, KV, D] at slot_mapping [T] int64. q / k / v with contiguous heads (rows may be
    strided), cos / sin [T, r] contiguous (each head's first r dimensions turn; r even, at most D;
    in pairs (2i, 2i + 1) where interleaved, else (i, i + r/2); in float32 arithmetic rounded once
    where float32, cos / sin then of any float dtype),
    one device and dtype. Slots are the scheduler's to keep
    inside the caches."""
    t, heads, d = q.shape
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[3] != d:
        raise ValueError(f"rotary_write_kv: q {list(q.shape)} and caches {list(k_cache.shape)} / "
                         f"{list(v_cache.shape)} do not fit (a head size shared by both)")
    kv = k_cache.shape[2]
    for name, x, n in (("q", q, heads), ("k", k, kv), ("v", v, kv)):
        if x.shape != (t, n, d) or x.stride(2) != 1 or x.stride(1) != d or x.dtype != k_cache.dtype:
            raise ValueError(f"rotary_write_kv: {name} must be [{t}, {n}, {d}] {k_cache.dtype} with contiguous "
                             f"heads, got {list(x.shape)} {x.dtype} strides {x.stride()}")
    r = cos.shape[-1]
    if cos.shape != (t, r) or sin.shape != (t, r) or not (cos.is_contiguous() and sin.is_contiguous()) or \
            r < 2 or r % 2 or r > d:
        raise ValueError(f"rotary_write_kv: cos / sin must be contiguous [{t}, r] with r even and at most {d}, got "
                         f"{list(cos.shape)} / {list(sin.shape)}")
    if slot_mapping.shape != (t,) or slot_mapping.dtype != torch.int64:
        raise ValueError(f"rotary_write_kv: slot_mapping must be int64 [{t}]")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("rotary_write_kv: the caches must be contiguous")
    q_out = torch.empty((t, heads, d), dtype=q.dtype, device=q.device)
    if t:
        with _on(q):  # no fused multiply-adds: each product rounds as in the torch form, float32 too
            _rotary_write_kv_kernel[(t,)](
                q_out, q, k, v, cos, sin, k_cache, v_cache, slot_mapping.contiguous(), heads, kv,
                q.stride(0), k.stride(0), v.stride(0), HALF=r // 2, D=d, BLOCK_H=triton.next_power_of_2(max(heads, kv)),
                BLOCK_HALF=triton.next_power_of_2(r // 2), BLOCK_D=triton.next_power_of_2(d),
                INTERLEAVED=bool(interleaved), F32_MATH=bool(float32), enable_fp_fusion=False)
    return q_out
