"""Per-step LoRA metadata: which rows of the batch use which adapter slot of which rank bucket.

The runner orders the rows of a step by (rank bucket, slot), so every bucket covers one
contiguous row range and every adapter inside it a contiguous segment. The same description
then serves both kernel forms: SGMV walks the segments (prefill: many tokens per segment),
BGMV reads one slot index per row (decode: one token per request).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoraIndex:
    """Rows and slots of one rank bucket in a step."""

    row_start: int  # first row of x that belongs to this bucket
    row_end: int  # one past the last row
    segments: tuple[tuple[int, int, int], ...]  # (start row, row count, slot) per adapter run
    seg_start: torch.Tensor  # [G] int32, segment start rows (for the SGMV kernel)
    seg_len: torch.Tensor  # [G] int32, segment lengths
    seg_slot: torch.Tensor  # [G] int32, slot of each segment
    row_slot: torch.Tensor  # [row_end - row_start] int32, slot of each row (for the BGMV kernel)
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
        row_slot = [k for _, n, k in segs for _ in range(n)]

        def t(v):
            return torch.tensor(v, dtype=torch.int32, device=device)

        return cls(
            row_start=segs[0][0],
            row_end=segs[-1][0] + segs[-1][1],
            segments=segs,
            seg_start=t([s for s, _, _ in segs]),
            seg_len=t([n for _, n, _ in segs]),
            seg_slot=t([k for _, _, k in segs]),
            row_slot=t(row_slot),
            max_seg_len=max(n for _, n, _ in segs),
        )


@dataclass(frozen=True)
class LoraGroup:
    """One rank bucket's weights and the rows that use them in this step."""

    rank: int  # the bucket's rank R
    weights: dict  # module name -> (A [L, S, in, R], B [L, S, R, out]) slot tensors of the bucket
    scale: torch.Tensor  # [S] float32, lora_alpha / r (or / sqrt(r)) of each slot
    index: LoraIndex
    modules: frozenset = frozenset()  # modules targeted by some adapter of the group (others are zero)
    host_scale: tuple[float, ...] = ()  # `scale` on the host, so CPU kernels need no device read


@dataclass(frozen=True)
class LoraBatch:
    """All LoRA work of a step; rows in no group use the base model only."""

    groups: tuple[LoraGroup, ...]
    is_decode: bool  # one row per request (BGMV form) rather than prompt segments (SGMV form)
    host: tuple = ()  # cpu_assist HostSegments: rows whose adapter is not resident yet (prefill only)
    handoff: object = None  # the cpu_assist Handoff that computes `host` on CPU workers
