"""Triton SGMV and row-form kernels against the plain-torch reference and float64 (interpreter on
CPU, compiled on CUDA); the multi-bucket BGMV kernels are in test_triton_multi.py.

Every case builds one rank bucket inside a larger batch: base-only rows before and after it
(plus the requests without adapter in the "partial" mix) must stay bit-identical, and so must the
columns of the wider buffers that x and y are column slices of. Ranks, in and out sizes are kept
small and odd where possible: the interpreter costs several milliseconds per grid cell.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from triton_interpret import DEVICE, kernel_modules

triton_ops, triton_multi = kernel_modules("caraserve.lora.triton_ops", "caraserve.lora.triton_multi")
from caraserve.lora import ops  # noqa: E402
from caraserve.lora.batch import LoraBatch, LoraGroup, LoraIndex, fill_row_table  # noqa: E402

BATCH_SIZES = (1, 3, 17, 64, 65)
POPULARITY = ("distinct", "uniform", "zipf", "identical", "partial")
RANKS = (4, 5, 17, 64, 128)
DIMS = ((48, 100), (32, 64), (96, 40), (64, 33))  # (in, out)
N_LAYERS = 2
PAD_BEFORE, PAD_AFTER = 2, 1  # base-only rows around the bucket in every case


def _slots_for(gen: torch.Generator, n_req: int, popularity: str) -> tuple[list[int | None], int]:
    """Adapter slot of each request (None: base model only) and the number of slots S."""
    if popularity == "distinct":
        return list(range(n_req)), max(n_req, 2)
    n_slots = 8
    if popularity == "uniform":
        return torch.randint(0, n_slots, (n_req,), generator=gen).tolist(), n_slots
    if popularity == "zipf":
        p = 1.0 / torch.arange(1, n_slots + 1, dtype=torch.float64) ** 1.5
        return torch.multinomial(p, n_req, replacement=True, generator=gen).tolist(), n_slots
    if popularity == "identical":
        return [n_slots - 1] * n_req, n_slots
    if popularity == "partial":
        slots: list[int | None] = torch.randint(0, n_slots, (n_req,), generator=gen).tolist()
        without = torch.rand(n_req, generator=gen) < 0.5
        without[torch.randint(0, n_req, (1,), generator=gen)] = False  # keep at least one adapter row
        return [None if w else s for s, w in zip(slots, without.tolist(), strict=True)], n_slots
    raise ValueError(popularity)


def _make_case(
    seed: int,
    n_req: int,
    popularity: str,
    rank: int,
    dims: tuple[int, int],
    max_tokens: int,
    dtype: torch.dtype = torch.float32,
    sort_by_slot: bool = True,
):
    """Builds y, x, a, b, scale, index for one bucket, plus the wide buffers and the bucket's rows."""
    gen = torch.Generator().manual_seed(seed)
    n_in, n_out = dims
    slots, n_slots = _slots_for(gen, n_req, popularity)
    counts = torch.randint(1, max_tokens + 1, (n_req,), generator=gen).tolist()
    with_adapter = [(s, c) for s, c in zip(slots, counts, strict=True) if s is not None]
    without = [c for s, c in zip(slots, counts, strict=True) if s is None]
    if sort_by_slot:  # the runner's order; unsorted keeps repeated non-adjacent slots
        with_adapter.sort(key=lambda sc: sc[0])
    before = PAD_BEFORE + sum(without[: len(without) // 2])
    after = PAD_AFTER + sum(without[len(without) // 2 :])

    segments, row = [], before
    for slot, count in with_adapter:
        segments.append((row, count, slot))
        row += count
    n_rows = row + after
    index = LoraIndex.from_segments(segments, device=DEVICE)

    # x and y are column slices of wider buffers (row stride != row length); a, b are layer slices.
    x_wide = torch.randn(n_rows, n_in + 7, generator=gen).to(dtype)
    y_wide = torch.randn(n_rows, n_out + 5, generator=gen).to(dtype)
    a_all = (torch.randn(N_LAYERS, n_slots, n_in, rank, generator=gen) / n_in**0.5).to(dtype)
    b_all = (torch.randn(N_LAYERS, n_slots, rank, n_out, generator=gen) / rank**0.5).to(dtype)
    scale = torch.rand(n_slots, generator=gen, dtype=torch.float32) * 2 + 0.25
    y_wide, x_wide, a_all, b_all, scale = (t.to(DEVICE) for t in (y_wide, x_wide, a_all, b_all, scale))
    x = x_wide[:, 3 : 3 + n_in]
    y = y_wide[:, 2 : 2 + n_out]
    return y_wide, y, x, a_all[1], b_all[1], scale, index


def _check(kernel, reference, case, rtol=1e-4, atol=1e-4, **kwargs) -> None:
    y_wide, y, x, a, b, scale, index = case
    y_wide0 = y_wide.clone()
    if y.dtype == torch.float32:
        expected = y.clone()
        reference(expected, x, a, b, scale, index)
    else:  # reference in fp32 from the same low-precision inputs, then compared loosely
        expected = y.float()
        reference(expected, x.float(), a.float(), b.float(), scale, index)

    kernel(y, x, a, b, scale, index, **kwargs)

    rows = slice(index.row_start, index.row_end)
    torch.testing.assert_close(y[rows].float(), expected[rows].float(), rtol=rtol, atol=atol)
    # everything outside the bucket's rows and y's columns is bit-identical
    mask = torch.ones_like(y_wide, dtype=torch.bool)
    mask[rows, 2 : 2 + y.shape[1]] = False
    assert torch.equal(y_wide[mask], y_wide0[mask]), "rows/columns outside the bucket were modified"


def _case_params(n_req: int, popularity: str) -> dict:
    i, j = BATCH_SIZES.index(n_req), POPULARITY.index(popularity)
    return dict(
        seed=100 * i + j,
        rank=RANKS[(i + j) % len(RANKS)],
        dims=DIMS[(i + 2 * j) % len(DIMS)],
        sort_by_slot=popularity != "uniform",
    )


@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("n_req", BATCH_SIZES)
def test_sgmv_matches_reference(n_req: int, popularity: str) -> None:
    case = _make_case(n_req=n_req, popularity=popularity, max_tokens=40, **_case_params(n_req, popularity))
    _check(triton_ops.sgmv, ops.sgmv_reference, case)


def row_form(y, x, a, b, scale, index, split_k=None) -> None:
    """One bucket's delta through the decode step's kernels: the row table `fill_row_table`
    makes of the bucket's segments, then the multi-bucket BGMV over it."""
    group = LoraGroup(a.shape[2], {}, scale, index, host_scale=tuple(scale.tolist()))
    meta, row_scale = np.empty((3, x.shape[0]), np.int32), np.empty(x.shape[0], np.float32)
    fill_row_table(LoraBatch((group,), True), (a.shape[2],), meta, row_scale)
    triton_multi.bgmv_multi(y, x, [a], [b], torch.from_numpy(meta).to(DEVICE), torch.from_numpy(row_scale).to(DEVICE),
                            split_k=split_k)


@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("n_req", BATCH_SIZES)
def test_row_form_matches_reference(n_req: int, popularity: str) -> None:
    case = _make_case(n_req=n_req, popularity=popularity, max_tokens=1, **_case_params(n_req, popularity))
    _check(row_form, ops.sgmv_reference, case)


@pytest.mark.parametrize("rank", RANKS + (1, 33))
@pytest.mark.parametrize("op", ("sgmv", "sgmv-decode", "rows"))
def test_rank_sweep(op: str, rank: int) -> None:
    max_tokens = 40 if op == "sgmv" else 1
    case = _make_case(seed=rank, n_req=9, popularity="zipf", rank=rank, dims=(80, 72), max_tokens=max_tokens)
    _check(row_form if op == "rows" else triton_ops.sgmv, ops.sgmv_reference, case)


@pytest.mark.parametrize("split_k", (2, 3, 5))
def test_row_form_split_k(split_k: int) -> None:
    """Input features split over several programs per row (chosen automatically for a large `in`)."""
    case = _make_case(seed=split_k, n_req=5, popularity="uniform", rank=17, dims=(100, 48), max_tokens=1)
    _check(row_form, ops.sgmv_reference, case, split_k=split_k)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=("fp16", "bf16"))
@pytest.mark.parametrize("op", ("sgmv", "rows"))
def test_low_precision(op: str, dtype: torch.dtype) -> None:
    max_tokens = 40 if op == "sgmv" else 1
    case = _make_case(
        seed=7, n_req=17, popularity="zipf", rank=17, dims=(48, 100), max_tokens=max_tokens, dtype=dtype
    )
    tol = 2e-2 if dtype == torch.float16 else 8e-2  # y itself is stored in the low precision
    _check(triton_ops.sgmv if op == "sgmv" else row_form, ops.sgmv_reference, case, rtol=tol, atol=tol)


def test_rejects_mismatched_shapes() -> None:
    y_wide, y, x, a, b, scale, index = _make_case(
        seed=0, n_req=3, popularity="uniform", rank=4, dims=(32, 64), max_tokens=2
    )
    with pytest.raises(ValueError, match="shape mismatch"):
        triton_ops.sgmv(y, x[:, :16], a, b, scale, index)
    with pytest.raises(ValueError, match="scale must be"):
        triton_ops.sgmv(y, x, a, b, scale[:1], index)
    with pytest.raises(ValueError, match="scale float32"):
        triton_ops.sgmv(y, x, a, b, scale.double(), index)
    with pytest.raises(ValueError, match="x's dtype"):
        triton_ops.sgmv(y, x, a.double(), b, scale, index)
    far = dataclasses.replace(index, segments=((index.row_start, 1, a.shape[0]),))  # a slot past the pool
    with pytest.raises(ValueError, match="slots"):
        triton_ops.sgmv(y, x, a, b, scale, far)
    with pytest.raises(ValueError, match="seg_slot is on meta"):
        triton_ops.sgmv(y, x, a, b, scale, dataclasses.replace(index, seg_slot=index.seg_slot.to("meta")))
    meta = torch.zeros(3, x.shape[0], dtype=torch.int32, device=DEVICE)
    row_scale = torch.ones(x.shape[0], device=DEVICE)
    with pytest.raises(ValueError, match="bucket shapes"):
        triton_multi.bgmv_multi(y, x, [a], [b[:, :3]], meta, row_scale)
    with pytest.raises(ValueError, match="rows"):
        triton_multi.bgmv_multi(y, x, [a], [b], meta, row_scale[:1])
