"""Wrappers of the C kernels of the CPU step besides LoRA's (`caraserve.lora.kernel_runs`):
attention over the paged KV cache (`csrc/attention_cpu.c`, decode rows and prompt tokens alike)
and the fused elementwise layer ops (`csrc/layer_ops_cpu.c`).

Decode attention through torch's SDPA takes a mask over the longest context of the batch; the
attention kernel reads each row's own positions only.

The library itself (built, cached, checked and loaded once per machine) is
`caraserve.kernel_library`; where it is unavailable these wrappers answer None and torch runs
those parts instead (same results to float rounding). The wrappers check every tensor the
kernels will read or write through a pointer before handing it over, and the kernels check the
same again.
"""

from __future__ import annotations

import torch

from caraserve import kernel_library


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    row_seq: torch.Tensor, lens: torch.Tensor, window: int | None,
                    softcap: float = 0.0) -> torch.Tensor | None:
    """Attention of one query token per row over its sequence's positions [0, len) of a paged
    cache (or the last `window` of them), see csrc/attention_cpu.c and
    `caraserve.attention.paged_attention_reference` for the semantics: q [n, H, hd], caches
    [blocks, block_size, KV, hd], block_tables [S, W] int64, row_seq/lens [n] int64 (a row's
    token sits at position len - 1 of sequence row_seq: a decode row, or a prompt token whose
    keys are already in the cache). None when the kernel is unavailable or does not take these
    tensors (or sequences, lengths and block ids outside the table and the cache). row_seq and
    lens that are not one entry per row of q, or a negative window or soft cap, raise a
    ValueError: no path computes those. softcap > 0: scores are capped (Gemma 2's)."""
    n = q.shape[0] if isinstance(q, torch.Tensor) and q.dim() >= 1 else None
    for name, t in (("row_seq", row_seq), ("lens", lens)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != n:
            shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"paged_attention: {name} must be a 1-D tensor of one entry per row of q ({n}), "
                             f"got {shape}")
    if not isinstance(block_tables, torch.Tensor) or block_tables.dim() != 2:
        shape = list(block_tables.shape) if isinstance(block_tables, torch.Tensor) else type(block_tables).__name__
        raise ValueError(f"paged_attention: block_tables must be a 2-D tensor [sequences, blocks], got {shape}")
    if window is not None and window < 0:
        raise ValueError(f"paged_attention: window must be None or >= 0, got {window}")
    if not softcap >= 0:
        raise ValueError(f"paged_attention: softcap must be >= 0 (0: none), got {softcap}")
    lib = kernel_library.library()
    if lib is None or not attention_usable(q, k_cache, v_cache):
        return None
    if any(t.dtype != torch.int64 or t.device.type != "cpu" for t in (block_tables, row_seq, lens)):
        return None
    n, heads, hd = q.shape
    blocks, block_size, kv_heads, _ = k_cache.shape
    if kv_heads < 1 or heads % kv_heads or block_tables.shape[1] < 1 or hd < 1:
        return None
    block_tables, row_seq, lens = block_tables.contiguous(), row_seq.contiguous(), lens.contiguous()
    out = torch.empty_like(q)
    rc = lib.paged_attention(out.data_ptr(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                             block_tables.data_ptr(), row_seq.data_ptr(), lens.data_ptr(), n, heads, kv_heads, hd,
                             blocks, block_size, block_tables.shape[0], block_tables.shape[1], window or 0,
                             hd ** -0.5, softcap)
    if rc == -2:
        raise MemoryError("paged attention: no memory for the score buffer")
    return out if rc == 0 else None


def attention_usable(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Float32 CPU tensors in the layouts the attention kernel reads (caches [blocks, block_size, KV, hd])."""
    return (q.dtype == k_cache.dtype == v_cache.dtype == torch.float32 and q.device.type == "cpu"
            and k_cache.device.type == "cpu" and v_cache.device.type == "cpu" and q.dim() == 3
            and k_cache.dim() == 4 and k_cache.shape == v_cache.shape and q.is_contiguous()
            and k_cache.is_contiguous() and v_cache.is_contiguous() and q.shape[2] == k_cache.shape[3])


def _float_rows(name: str, t, width: int) -> int:
    """t's row stride, or a ValueError unless t is [rows, width] float32 on the CPU in rows of unit
    column stride that do not overlap."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or not t.is_cpu or t.dim() != 2:
        got = f"a {t.dim()}-D {t.dtype} tensor on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected a 2-D float32 CPU tensor, got {got}")
    if t.shape[1] != width or t.stride(1) != 1 or (t.shape[0] > 1 and t.stride(0) < width):
        raise ValueError(f"{name}: shape {list(t.shape)} strides {t.stride()} are not rows of {width} columns")
    return t.stride(0) if t.shape[0] > 1 else width  # (a lone row's stride is arbitrary)


def add_rms_norm(x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> torch.Tensor | None:
    """csrc/layer_ops_cpu.c's add_rms_norm: residual += x in place (x None: no add), then
    w * residual / sqrt(mean(residual^2) + eps) per row, as a new [T, D] tensor. residual
    contiguous [T, D], x [T, D] with unit column stride, weight [D], all float32 on the CPU. None
    when the kernel is unavailable; tensors it cannot take raise a ValueError naming them."""
    lib = kernel_library.library()
    if lib is None:
        return None
    if not isinstance(residual, torch.Tensor) or residual.dim() != 2 or not residual.is_contiguous():
        raise ValueError("add_rms_norm: residual must be a contiguous 2-D tensor")
    rows, dim = residual.shape
    _float_rows("add_rms_norm: residual", residual, dim)
    ld_x = 0 if x is None else _float_rows("add_rms_norm: x", x, dim)
    if x is not None and x.shape[0] != rows:
        raise ValueError(f"add_rms_norm: x has {x.shape[0]} rows, residual {rows}")
    if weight.dtype != torch.float32 or not weight.is_cpu or weight.shape != (dim,) or not weight.is_contiguous():
        raise ValueError(f"add_rms_norm: weight must be a contiguous float32 CPU tensor [{dim}], "
                         f"got {list(weight.shape)} {weight.dtype}")
    out = torch.empty_like(residual)
    rc = lib.add_rms_norm(out.data_ptr(), residual.data_ptr(), None if x is None else x.data_ptr(),
                          weight.data_ptr(), rows, dim, ld_x, eps)
    if rc:
        raise RuntimeError(f"add_rms_norm kernel refused the call (code {rc})")
    return out


def rotary_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                    interleaved: bool = False) -> torch.Tensor | None:
    """csrc/layer_ops_cpu.c's rotary_write_kv: the rotated q as a new contiguous [T, H, hd] tensor;
    the rotated k and v written to the caches [blocks, bs, KV, hd] at slot_mapping [T] int64. q
    [T, H, hd], k / v [T, KV, hd] with rows of unit-stride heads, cos / sin [T, r] contiguous (the
    first r dimensions of each head rotate, r even and at most hd; in pairs (2i, 2i + 1) where
    interleaved, else (i, i + r/2)), all float32 on the CPU. None
    when the kernel is unavailable; tensors it cannot take raise a ValueError naming them (a slot
    outside the caches too, before anything is written)."""
    lib = kernel_library.library()
    if lib is None:
        return None
    t, heads, hd = q.shape
    kv = k_cache.shape[2] if k_cache.dim() == 4 else -1
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[3] != hd:
        raise ValueError(f"rotary_write_kv: caches {list(k_cache.shape)} / {list(v_cache.shape)} are not "
                         f"[blocks, block_size, kv_heads, {hd}]")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dtype != torch.float32 or not c.is_cpu or not c.is_contiguous():
            raise ValueError(f"rotary_write_kv: {name} must be a contiguous float32 CPU tensor")
    lds = []
    for name, x, n in (("q", q, heads), ("k", k, kv), ("v", v, kv)):
        if x.dim() != 3 or x.shape != (t, n, hd) or x.stride(2) != 1 or x.stride(1) != hd:
            raise ValueError(f"rotary_write_kv: {name} must be [{t}, {n}, {hd}] in rows of contiguous heads, "
                             f"got {list(x.shape)} strides {x.stride()}")
        lds.append(_float_rows(f"rotary_write_kv: {name}", x.flatten(1), n * hd))
    rot = cos.shape[-1]
    for name, x in (("cos", cos), ("sin", sin)):
        if not x.is_contiguous() or x.shape != (t, rot) or rot < 2 or rot % 2 or rot > hd:
            raise ValueError(f"rotary_write_kv: {name} must be contiguous [{t}, r] with r even and at most {hd} "
                             f"(and sin as cos), got {list(x.shape)}")
        _float_rows(f"rotary_write_kv: {name}", x, rot)
    if slot_mapping.dtype != torch.int64 or not slot_mapping.is_cpu or slot_mapping.shape != (t,):
        raise ValueError(f"rotary_write_kv: slot_mapping must be int64 CPU [{t}], got {list(slot_mapping.shape)} "
                         f"{slot_mapping.dtype}")
    slots = slot_mapping.contiguous()
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    q_out = torch.empty((t, heads, hd), dtype=torch.float32)
    rc = lib.rotary_write_kv(q_out.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(),
                             sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(), t, heads, kv,
                             hd, rot, *lds, num_slots, int(bool(interleaved)))
    if rc:
        raise ValueError(f"rotary_write_kv: the kernel refused the call (code {rc}): an odd head size or a slot "
                         f"outside the caches' {num_slots}")
    return q_out
