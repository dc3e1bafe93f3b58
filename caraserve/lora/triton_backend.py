"""The CUDA LoRA backend: Triton SGMV (lora/triton_ops.py) and multi-bucket BGMV
(lora/triton_multi.py) kernels. Semantics: `caraserve.lora.backend`."""

from __future__ import annotations

import numpy as np
import torch

from caraserve.lora.backend import LORA_GROUPS, LoraBackend
from caraserve.lora.batch import fill_row_table


class TritonLoraBackend(LoraBackend):
    """CUDA: prompt segments go through SGMV, a rank bucket at a time; decode rows through one
    multi-bucket BGMV launch pair per projection over the step's row table, whatever the adapter
    mix: in compiled steps the table is the ForwardBatch's (fixed-address buffers), in eager
    ones this backend makes it at the step's first adapted projection. Both run the same kernels."""

    def __init__(self, pool):
        from caraserve.lora import triton_multi

        super().__init__(pool)
        # (layer, parts) -> triton_multi.part_tables of those parts, read once here: the pool's
        # tensors never move, and a compiled step cannot read addresses while traced. Every
        # adapted module alone (parts ((name, 0, out),)) here, fused projections in `attach`.
        self._tables: dict = {}
        for name in self.targets if pool.buckets else ():
            for layer in range(len(pool.buckets[0].weights[name][0])):
                parts = ((name, 0, pool.buckets[0].weights[name][1][layer].shape[-1]),)
                self._tables[(layer, parts)] = triton_multi.part_tables(self._parts(layer, parts))
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None

    def prepare(self, lora):
        super().prepare(lora)
        self._rows = None

    def attach(self, mod):
        from caraserve.lora import triton_multi

        parts = tuple(part for part in mod.parts if part[0] in self.targets)
        if len(parts) > 1 and self.pool.buckets:  # one launch pair for the fused projection's parts
            self._tables[(mod.layer, parts)] = triton_multi.part_tables(self._parts(mod.layer, parts))

    def _parts(self, layer: int, parts) -> list:
        return [([bk.weights[name][0][layer] for bk in self.pool.buckets],
                 [bk.weights[name][1][layer] for bk in self.pool.buckets], lo) for name, lo, _ in parts]

    def _eager_rows(self, fb) -> bool:
        """An eager decode step: its rows take the row form too (the table from `_row_table`)."""
        return fb.lora_mode == LORA_GROUPS and self._lora.is_decode and bool(self.pool.buckets)

    def _row_table(self, n_rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The eager step's row table (meta [3, n] int32, scale [n] float32), made once per step."""
        if self._rows is None or self._rows[1].shape[0] != n_rows:
            meta, scale = np.empty((3, n_rows), np.int32), np.empty(n_rows, np.float32)
            fill_row_table(self._lora, self.pool.rank_buckets, meta, scale)
            self._rows = (torch.from_numpy(meta).to(device), torch.from_numpy(scale).to(device))
        return self._rows

    def add(self, y, x, layer, name, fb):
        if self._eager_rows(fb):
            return self.add_rows(y, x, layer, name, *self._row_table(x.shape[0], y.device))
        return super().add(y, x, layer, name, fb)

    def add_parts(self, y, x, mod, parts, fb):
        if self._eager_rows(fb) and len(parts) > 1:
            return self.add_rows_parts(y, x, mod.layer, parts, *self._row_table(x.shape[0], y.device))
        return super().add_parts(y, x, mod, parts, fb)

    def add_rows(self, y, x, layer, name, meta, row_scale):
        return self.add_rows_parts(y, x, layer, ((name, 0, y.shape[1]),), meta, row_scale)

    def add_rows_parts(self, y, x, layer, parts, meta, row_scale):
        from caraserve.lora import triton_multi

        triton_multi.bgmv_multi_parts(y, x, self._parts(layer, parts), meta, row_scale,
                                      tables=self._tables[(layer, tuple(parts))])
        return y

    def add_group(self, y, x, a, b, group):
        from caraserve.lora import triton_ops

        triton_ops.sgmv(y, x, a, b, group.scale, group.index)
