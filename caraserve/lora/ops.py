"""Batched LoRA operators of one rank bucket: the plain-torch references the kernels are tested
against, and the CPU form (`add_lora_runs`) the CPU backend runs.

Every operator adds, for each row i of x that belongs to a rank bucket,
    y[i] += scale[s_i] * (x[i] @ A[s_i]) @ B[s_i]
where s_i is the row's slot. Which device runs which form is `caraserve.lora.backend`'s choice.
"""

from __future__ import annotations

import torch

from caraserve import kernel_library
from caraserve.lora import kernel_runs
from caraserve.lora.batch import LoraIndex

_MISSING = object()


def sgmv_reference(
    y: torch.Tensor,  # [T, out] accumulated in place
    x: torch.Tensor,  # [T, in]
    a: torch.Tensor,  # [S, in, R]
    b: torch.Tensor,  # [S, R, out]
    scale: torch.Tensor,  # [S] float32
    index: LoraIndex,
) -> None:
    """Segment form: y[s:s+n] += scale[k] * (x[s:s+n] @ A[k]) @ B[k] for each segment (s, n, k)."""
    for start, count, slot in index.segments:
        xs = x[start : start + count]
        delta = (xs @ a[slot]) @ b[slot]
        y[start : start + count] += (delta * scale[slot]).to(y.dtype)


def add_lora_runs(y: torch.Tensor, x: torch.Tensor, groups, layer: int, name: str, tables: dict | None = None,
                  pack=None, make_table=None) -> None:
    """The CPU form: y[rows] += scale * (x[rows] @ A) @ B, one small matmul pair per adapter of
    `groups` that targets module `name`. Float32 runs go to the C kernel
    (`kernel_runs`), all of a module's runs in one call; `tables` (the CPU backend's, per batch
    layout) keeps their argument arrays across steps; `make_table(groups, layer, name)` builds
    one (default: a RunTable of the groups' runs whose packed weights come from `pack(a, b)`), or
    None when the runs are not the kernel's (torch's GEMMs then)."""
    fn = kernel_library.kernel() if kernel_runs.usable(y, x) else None
    if fn is not None:
        table = tables.get((layer, name), _MISSING) if tables is not None else _MISSING
        if table is _MISSING:
            if make_table is not None:
                table = make_table(groups, layer, name)
            else:
                table = kernel_runs.RunTable((run for group in groups if name in group.modules
                                              for run in group.cpu_runs(layer, name)), pack)
            if tables is not None:
                tables[(layer, name)] = table
        if table is not None and table.fits:
            table.apply(fn, y, x)
            return
    for group in groups:
        if name in group.modules:
            for start, end, a, b, scale in group.cpu_runs(layer, name):
                if not 0 <= start <= end <= min(len(y), len(x)):  # (a slice would cut the run short)
                    raise ValueError(f"LoRA runs: rows {start}..{end} of module {name!r}, but y and x have "
                                     f"{len(y)} and {len(x)} rows")
                y[start:end].addmm_(torch.mm(x[start:end], a), b, alpha=scale)
