"""Per-step LoRA metadata: which rows of the batch use which adapter slot of which rank bucket.

The runner orders the rows of a step by (rank bucket, slot), so every bucket covers one
contiguous row range and every adapter inside it a contiguous segment. The same description
then serves both kernel forms: SGMV walks the segments (prefill: many tokens per segment), and
the row form (`fill_row_table`: one rank bucket, slot and rank per row) is what the GPU's
multi-bucket BGMV reads in decode steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from caraserve.cpu_assist.handoff import Handoff, HostSegment


@dataclass(frozen=True)
class LoraIndex:
    """Rows and slots of one rank bucket in a step."""

    row_start: int  # first row of x that belongs to this bucket
    row_end: int  # one past the last row
    segments: tuple[tuple[int, int, int], ...]  # (start row, row count, slot) per adapter run
    seg_start: torch.Tensor  # [G] int32, segment start rows (for the SGMV kernel)
    seg_len: torch.Tensor  # [G] int32, segment lengths
    seg_slot: torch.Tensor  # [G] int32, slot of each segment
    max_seg_len: int  # longest segment, sizes the SGMV grid

    @classmethod
    def from_segments(cls, segments: list[tuple[int, int, int]], device: torch.device | str) -> LoraIndex:
        """Builds the index from (start, count, slot) runs; adjacent runs of one slot merge."""
        if not segments:
            raise ValueError("a LoRA group needs at least one segment")
        merged: list[list[int]] = []
        for start, count, slot in segments:
            if count <= 0:
                raise ValueError(f"segment at row {start} has {count} rows")
            if merged and merged[-1][2] == slot and merged[-1][0] + merged[-1][1] == start:
                merged[-1][1] += count
            else:
                if merged and start != merged[-1][0] + merged[-1][1]:
                    raise ValueError("segments of one bucket must cover contiguous rows")
                merged.append([start, count, slot])
        segs = tuple((s, n, k) for s, n, k in merged)

        def t(v):
            return torch.tensor(v, dtype=torch.int32, device=device)

        return cls(
            row_start=segs[0][0],
            row_end=segs[-1][0] + segs[-1][1],
            segments=segs,
            seg_start=t([s for s, _, _ in segs]),
            seg_len=t([n for _, n, _ in segs]),
            seg_slot=t([k for _, _, k in segs]),
            max_seg_len=max(n for _, n, _ in segs),
        )


@dataclass(frozen=True)
class LoraGroup:
    """One rank bucket's weights and the rows that use them in this step."""

    rank: int  # the bucket's rank R
    # module name -> (A, B) slot tensors of the bucket, indexed by layer: A [L, S, in, R] and
    # B [L, S, R, out] stacked, or lists of [S, in, R] / [S, R, out] when layers span devices
    weights: dict[str, tuple]
    scale: torch.Tensor  # [S] float32, lora_alpha / r (or / sqrt(r)) of each slot
    index: LoraIndex
    modules: frozenset = frozenset()  # modules targeted by some adapter of the group (others are zero)
    host_scale: tuple[float, ...] = ()  # `scale` on the host, so CPU kernels need no device read
    slot_targets: tuple = ()  # [S] modules the adapter in each slot targets (empty: all of `modules`)

    def cpu_runs(self, layer: int, name: str) -> tuple:
        """The CPU form of this group's work on one module of one layer: (first row, end row,
        A [in, R], B [R, out], scale) per segment whose adapter targets the module (the CPU
        backend turns them into a kernel table once per batch layout)."""
        a, b = self.weights[name]
        a, b = a[layer], b[layer]  # [S, in, R], [S, R, out]
        return tuple((start, start + count, a[slot], b[slot], self.host_scale[slot])
                     for start, count, slot in self.index.segments
                     if not self.slot_targets or name in self.slot_targets[slot])


@dataclass
class Landing:
    """One request's rows in a prefill step while its adapter is still being copied to its slot.

    Layer l of the slot is used once `ready()` (leading layers resident, DevicePool.layers_ready:
    a query, never a wait) exceeds l; until then the CPU path computes that layer. The answer is
    taken once per layer, at its first adapted projection, so every module of a layer takes the
    same path. A layer judged landed needs no device-side wait: on CUDA its copy event has
    completed, so kernels launched from now on read the finished copy.
    """

    group: LoraGroup | None  # the rows in the adapter's slot (one segment); None: it has no slot
    ready: Callable[[], int]
    on_device: dict[int, bool] = field(default_factory=dict)  # layer -> delta taken from the slot

    def landed(self, layer: int) -> bool:
        if layer not in self.on_device:
            self.on_device[layer] = layer < self.ready()
        return self.on_device[layer]


@dataclass(frozen=True)
class LoraBatch:
    """All LoRA work of a step; rows in no group use the base model only."""

    groups: tuple[LoraGroup, ...]
    is_decode: bool  # one row per request (BGMV form) rather than prompt segments (SGMV form)
    host: tuple[HostSegment, ...] = ()  # rows whose adapter is not resident yet (prefill only)
    handoff: Handoff | None = None  # computes `host` on CPU workers

    def at_layer(self, layer: int) -> tuple[tuple, tuple[LoraGroup, ...]]:
        """(host segments whose delta at `layer` comes from the CPU, groups computed on the device):
        a loading adapter's rows join the device groups from the layers of its slot that landed."""
        if not self.host:
            return (), self.groups
        host, groups = [], list(self.groups)
        for seg in self.host:
            if seg.landing is not None and seg.landing.landed(layer):
                groups.append(seg.landing.group)
            else:
                host.append(seg)
        return tuple(host), tuple(groups)


def fill_row_table(lora: LoraBatch | None, rank_buckets, meta: np.ndarray, scale: np.ndarray) -> None:
    """Writes the step's row form (what the multi-bucket BGMV reads: ForwardBatch.lora_rows) into
    host arrays meta [3, B] int32 and scale [B] float32:
        meta[:, i] = (rank bucket of the group, slot, rank), scale[i] = the slot's scale
                                                for each row i of a group's segment (start, n, slot)
        meta[:, i] = (-1, 0, 0), scale[i] = 0   for every other row (no adapter)
    with the bucket's index in `rank_buckets` (the pool's ranks, in its bucket order)."""
    meta[0], meta[1:], scale[:] = -1, 0, 0.0
    if lora is None:
        return
    for g in lora.groups:
        b = rank_buckets.index(g.rank)
        for start, count, slot in g.index.segments:
            meta[:, start : start + count] = ((b,), (slot,), (g.rank,))
            scale[start : start + count] = g.host_scale[slot]
