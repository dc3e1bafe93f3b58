"""The CPU LoRA kernel's arguments (`csrc/lora_cpu.c`, loaded by `caraserve.kernel_library`):
the runs of one module (`RunTable`), a step layout's runs of every module at once (`StepRuns`,
from per-slot records) and a projection's share of them (`ProjectionRuns`, one call per fused
projection and layer), and the packed weight layout the kernel reads.

A decode step on CPU adds, for every adapted module, one small matmul pair per adapter in the
batch; through torch each pair costs several times more in call overhead than in arithmetic. The
kernel does all runs of a projection in one call, with no allocation, reading packed copies of
the slots' weights (column panels read front to back; the pool's own layout made it walk them
with a stride, and a step finds them in L3 or memory, not in cache). Prompt segments go through
it too: its blocks of 8 rows re-read a weight panel from L2, which costs less than the skinny
GEMMs (`x @ A` of rank 8-64 columns) torch runs for them.

Where the kernel does not take a call (`fits` False, `usable` False) the caller runs torch (same
results to float rounding). Everything the kernel will read or write through a pointer is
checked here first, with a message naming it, and the kernel checks the same again.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import numpy as np
import torch

from caraserve.kernel_library import LoraPart, LoraRun

MAX_RANK = 1024  # the kernel's block buffer (csrc/lora_cpu.c)
RUN_RECORD = np.dtype(LoraRun)  # the kernel's lora_run as a numpy record, field for field
PART_RECORD = np.dtype(LoraPart)  # and its lora_part


def _checked_run(i: int, run) -> tuple[int, int, torch.Tensor, torch.Tensor, float]:
    """Run i as (start, end, A [in, R], B [R, out], scale), or a ValueError naming what is wrong."""
    try:
        start, end, a, b, scale = run
        start, end, scale = operator.index(start), operator.index(end), float(scale)
    except (TypeError, ValueError) as e:
        raise ValueError(f"runs[{i}]: expected (start row, end row, A, B, scale), got {run!r} ({e})") from None
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == 2 and b.dim() == 2):
        shapes = [list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in (a, b)]
        raise ValueError(f"runs[{i}]: A and B must be 2-D tensors, got {shapes[0]} and {shapes[1]}")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"runs[{i}]: A [in, R] is {list(a.shape)} but B [R, out] is {list(b.shape)}: "
                         "their ranks differ")
    if not 0 <= start <= end:
        raise ValueError(f"runs[{i}]: rows [{start}, {end}) are not a range of rows")
    return start, end, a, b, scale


def _disjoint(runs) -> bool:
    spans = sorted((start, end) for start, end, *_ in runs if end > start)
    return all(prev[1] <= nxt[0] for prev, nxt in zip(spans, spans[1:]))


def _rows(name: str, t, width: int) -> tuple[int, int]:
    """(rows, row stride) of t, or a ValueError naming `name` unless t is [rows, width] float32 on
    the CPU in rows of unit column stride that do not overlap (what the kernel reads through a
    pointer). On the step's path: one call per module, so attribute reads are few."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or not t.is_cpu or t.dim() != 2:
        got = f"a {t.dim()}-D {t.dtype} tensor on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected a 2-D float32 CPU tensor, got {got}")
    (rows, cols), (row_stride, col_stride) = t.shape, t.stride()
    if cols != width:
        raise ValueError(f"{name}: {cols} columns, but the runs' weights take {width}")
    if col_stride != 1 or (rows > 1 and row_stride < width):
        raise ValueError(f"{name}: strides {t.stride()} are not rows of unit column stride")
    return rows, row_stride


def _activations(y, x, out_features: int, in_features: int, end_row: int) -> tuple[int, int, int]:
    """(rows, y's row stride, x's) of a call's y [rows, out] and x [rows, in], or a ValueError
    naming what the kernel could not read or write through their pointers."""
    rows, ldy = _rows("y", y, out_features)
    x_rows, ldx = _rows("x", x, in_features)
    if x_rows != rows:
        raise ValueError(f"x: {x_rows} rows, but y has {rows}")
    if end_row > rows:
        raise ValueError(f"runs: rows up to {end_row}, but y and x have {rows}")
    return rows, ldy, ldx


def _check(rc: int) -> None:
    """The kernel's return code as an exception (0: done)."""
    if rc == -2:
        raise MemoryError("CPU LoRA kernel: no memory for its block buffers")
    if rc:
        raise RuntimeError(f"CPU LoRA kernel refused the call (code {rc}): a run outside its buffers")


class KernelWeights(NamedTuple):
    """One adapter's A [in, R] and B [R, out] of one module as the kernel reads them: packed
    copies when R and out are multiples of 8, else the tensors themselves (kept alive here)."""

    a: torch.Tensor
    b: torch.Tensor
    rank: int
    in_features: int
    out_features: int
    packed: bool

    @classmethod
    def of(cls, a: torch.Tensor, b: torch.Tensor, pack=None) -> KernelWeights | None:
        """None when the kernel cannot read them (not contiguous float32 on the CPU, a rank
        outside its buffers); `pack(a, b)` (default `packed`) makes the packed copies."""
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == 2 and b.dim() == 2
                and a.shape[1] == b.shape[0] and 1 <= a.shape[1] <= MAX_RANK and a.dtype == torch.float32
                and b.dtype == torch.float32 and a.is_contiguous() and b.is_contiguous()
                and a.device.type == "cpu" and b.device.type == "cpu"):
            return None
        pair = (pack or packed)(a, b)
        pa, pb = pair or (a, b)
        return cls(pa, pb, a.shape[1], a.shape[0], b.shape[1], pair is not None)


class RunTable:
    """The runs of one module of one step, as the kernel's argument array. `fits` is False when
    the kernel should not take them (big ranks, weights that are not contiguous
    float32 on the CPU, runs that share rows): then the caller uses torch. Runs whose rank and
    output width are multiples of 8 point at packed copies of their weights, from `pack(a, b)`
    (default `packed`, a fresh copy; the CPU LoRA backend passes its cache); the table keeps what
    it points at alive. Runs that no path could compute (ranks of A and B that differ, runs of
    one module with different widths, rows that are no range) raise a ValueError."""

    def __init__(self, runs, pack=None):
        runs = [_checked_run(i, run) for i, run in enumerate(runs)]  # (start, end, A [in, R], B [R, out], scale)
        in_features = runs[0][2].shape[0] if runs else 0
        out_features = runs[0][3].shape[1] if runs else 0
        for i, (_, _, a, b, _) in enumerate(runs):
            if a.shape[0] != in_features or b.shape[1] != out_features:
                raise ValueError(f"runs[{i}]: A {list(a.shape)} and B {list(b.shape)} are not of runs[0]'s widths "
                                 f"(in {in_features}, out {out_features}): one module's runs share them")
        disjoint = _disjoint(runs)
        self._build(in_features, out_features,
                    [(start, end, KernelWeights.of(a, b, pack) if disjoint else None, scale)
                     for start, end, a, b, scale in runs])

    @classmethod
    def of_weights(cls, in_features: int, out_features: int, runs) -> RunTable:
        """A table from (start row, end row, KernelWeights or None, scale) runs whose weights
        were made (and checked) once per slot by the caller: what the CPU backend builds each
        time a step's layout changes. The rows and widths are checked here."""
        checked = []
        for i, (start, end, w, scale) in enumerate(runs):
            start, end, scale = operator.index(start), operator.index(end), float(scale)
            if not 0 <= start <= end:
                raise ValueError(f"runs[{i}]: rows [{start}, {end}) are not a range of rows")
            if w is not None and not isinstance(w, KernelWeights):
                raise ValueError(f"runs[{i}]: expected KernelWeights or None, got {type(w).__name__}")
            if w is not None and (w.in_features, w.out_features) != (in_features, out_features):
                raise ValueError(f"runs[{i}]: weights of widths ({w.in_features}, {w.out_features}) in a table "
                                 f"of ({in_features}, {out_features})")
            checked.append((start, end, w, scale))
        table = cls.__new__(cls)
        table._build(in_features, out_features,
                     checked if _disjoint(checked) else [(s, e, None, c) for s, e, _, c in checked])
        return table

    def _build(self, in_features: int, out_features: int, runs) -> None:
        self.n = len(runs)
        self.in_features, self.out_features = in_features, out_features
        self.end_row = max((end for _, end, *_ in runs), default=0)  # y and x need this many rows
        self.fits = in_features >= 1 and out_features >= 1 and all(w is not None for _, _, w, _ in runs)
        self._tensors, entries = [], []
        for start, end, w, scale in runs if self.fits else ():
            self._tensors.append(w)
            entries.append(LoraRun(start, end, w.a.data_ptr(), w.b.data_ptr(), w.rank, in_features, out_features,
                                   w.a.numel(), w.b.numel(), w.packed, scale))
        self.array = (LoraRun * max(1, len(entries)))(*entries)

    def apply(self, fn, y: torch.Tensor, x: torch.Tensor) -> None:
        """y[rows] += scale * (x[rows] @ A) @ B for every run; y [rows, out] and x [rows, in]
        float32 CPU rows of unit column stride. Everything the kernel will read or write through
        a pointer is checked first (ValueError naming the argument); the kernel checks again."""
        if not self.fits:
            raise ValueError("runs: not the kernel's (RunTable.fits is False): the caller runs them through torch")
        if self.n == 0:
            return
        rows, ldy, ldx = _activations(y, x, self.out_features, self.in_features, self.end_row)
        _check(fn(y.data_ptr(), ldy, x.data_ptr(), ldx, rows, self.in_features, self.out_features, self.array, self.n))


def run_records(weights: list[KernelWeights | None]) -> np.ndarray:
    """LoraRun records of the weights (rows and scale zero: a step layout sets them); None gives
    an all-zero record, which the kernel refuses (no weights) if a call ever hands it over. The
    records hold addresses, not the tensors: whoever keeps them keeps the weights alive."""
    rec = np.zeros(len(weights), RUN_RECORD)
    some = [(i, w) for i, w in enumerate(weights) if w is not None]
    if not some:
        return rec
    index = [i for i, _ in some]
    for field, values in (("a", [w.a.data_ptr() for _, w in some]), ("b", [w.b.data_ptr() for _, w in some]),
                          ("rank", [w.rank for _, w in some]), ("a_in", [w.in_features for _, w in some]),
                          ("b_out", [w.out_features for _, w in some]), ("a_len", [w.a.numel() for _, w in some]),
                          ("b_len", [w.b.numel() for _, w in some]), ("packed", [w.packed for _, w in some])):
        rec[field][index] = values
    return rec


class StepRuns:
    """The kernel's runs of one step layout for every (layer, module) at once: records [L, M, n],
    entry [l, m, j] segment j's run of module m at layer l. A segment whose adapter leaves a
    module alone has an empty row range there. Built from per-slot records (`run_records`, made
    once per slot write) with a few array operations, so a layout change costs no table per
    module. The rows must be disjoint ranges (the caller's segments)."""

    def __init__(self, slot_records: list[np.ndarray], targeted: np.ndarray, rows: list[tuple[int, int]],
                 scales: list[float], widths: list[tuple[int, int]], keep=()):
        """slot_records: per segment its slot's records [L, M]; targeted [M, n] bool; rows per
        segment (start, end); widths (in, out) per module; keep: what owns the weights the
        records point at (held as long as these runs are)."""
        if not (len(slot_records) == len(rows) == len(scales) == targeted.shape[1]) or \
                targeted.shape[0] != len(widths):
            raise ValueError("StepRuns: one record array, row range, scale and targets column per segment, "
                             "one width pair per module")
        if any(not 0 <= start <= end for start, end in rows) or not _disjoint(rows):
            raise ValueError(f"StepRuns: rows {rows} are not disjoint ranges of rows")
        starts = np.array([start for start, _ in rows], dtype=np.int64)
        ends = np.array([end for _, end in rows], dtype=np.int64)
        rec = np.ascontiguousarray(np.stack(slot_records, axis=-1))  # [L, M, n], addressed by offset below
        rec["start"] = starts
        rec["end"] = np.where(targeted, ends, starts)
        rec["scale"] = np.array(scales, dtype=np.float32)
        self.records, self.n, self.widths, self.keep = rec, len(rows), widths, keep
        self.active = targeted.any(axis=1).tolist()  # per module: does any segment adapt it
        self.end_row = int(ends.max(initial=0))
        self._base, self._modules = rec.ctypes.data, rec.shape[1]
        self._stride = self.n * rec.itemsize
        self.projections: dict[str, ProjectionRuns] = {}  # the caller's cache of projections over these runs


class ProjectionRuns:
    """A projection's share of a StepRuns as the kernel's `lora_parts` arguments, one call per
    layer: the modules it adapts (a fused q/k/v or gate/up projection's parts, or one module),
    each at its columns of the projection's output. Made once per step layout and projection."""

    def __init__(self, step: StepRuns, parts: list[tuple[int, int]], in_features: int, out_features: int):
        """parts: (module index in the step's records, first output column) per module, in
        column order; in_features / out_features: the projection's input and output widths."""
        active = [(m, col) for m, col in parts if step.active[m]]
        end = 0
        for m, col in active:
            width_in, width_out = step.widths[m]
            if width_in != in_features or not end <= col <= out_features - width_out:
                raise ValueError(f"ProjectionRuns: module {m} ({width_in} -> {width_out} at column {col}) is not "
                                 f"inside the projection's {in_features} -> {out_features} or overlaps another")
            end = col + width_out
        layers = step.records.shape[0]
        rec = np.zeros((layers, max(1, len(active))), PART_RECORD)
        for j, (m, col) in enumerate(active):
            rec["col"][:, j] = col
            rec["out"][:, j] = step.widths[m][1]
            rec["runs"][:, j] = step._base + (np.arange(layers) * step._modules + m) * step._stride
            rec["nruns"][:, j] = step.n
        self.records, self.step = rec, step  # (the step owns the runs the records point at)
        self.n, self.layers, self.end_row = len(active), layers, step.end_row
        self.in_features, self.out_features = in_features, out_features
        self._base, self._stride = rec.ctypes.data, rec.shape[1] * rec.itemsize

    def apply(self, fn, y: torch.Tensor, x: torch.Tensor, layer: int) -> None:
        """y[rows, cols of module m] += scale * (x[rows] @ A) @ B for every run of every part at
        `layer`; `fn` is the library's lora_parts. Everything the kernel will read or write
        through a pointer is checked first (ValueError naming the argument); the kernel checks again."""
        if not 0 <= layer < self.layers:
            raise ValueError(f"ProjectionRuns: no layer {layer} of {self.layers}")
        if not self.n:
            return
        rows, ldy, ldx = _activations(y, x, self.out_features, self.in_features, self.end_row)
        _check(fn(y.data_ptr(), ldy, self.out_features, x.data_ptr(), ldx, rows, self.in_features,
                  self._base + layer * self._stride, self.n))


def packed(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Packed copies of a [in, R] and b [R, out], so the kernel reads each column block front to
    back: A as [R/8, in, 8], B as [out/8, R, 8]. None when R or out is not a multiple of 8 (the
    unpacked kernel takes those)."""
    (in_f, rank), out = a.shape, b.shape[1]
    if rank % 8 or out % 8:
        return None
    return (a.reshape(in_f, rank // 8, 8).permute(1, 0, 2).contiguous(),
            b.reshape(rank, out // 8, 8).permute(1, 0, 2).contiguous())


def usable(y: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether the kernel can take these activations (then `kernel_library.kernel()` decides if it exists)."""
    return (y.dtype == torch.float32 and x.dtype == torch.float32 and y.device.type == "cpu"
            and x.device.type == "cpu" and y.dim() == 2 and x.dim() == 2
            and y.stride(1) == 1 and x.stride(1) == 1)
