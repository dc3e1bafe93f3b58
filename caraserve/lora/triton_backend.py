"""The CUDA LoRA backend: Triton SGMV / BGMV kernels (lora/triton_ops.py, lora/triton_multi.py).
Semantics: `caraserve.lora.backend`."""

from __future__ import annotations

from caraserve.lora.backend import LoraBackend


class TritonLoraBackend(LoraBackend):
    """CUDA: SGMV (prefill segments) and BGMV (decode rows) Triton kernels per rank bucket in
    eager steps; in compiled steps one multi-bucket BGMV per module over the row table, whatever
    the adapter mix."""

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

    def attach(self, mod):
        from caraserve.lora import triton_multi

        parts = tuple(part for part in mod.parts if part[0] in self.targets)
        if len(parts) > 1 and self.pool.buckets:  # one launch pair for the fused projection's parts
            self._tables[(mod.layer, parts)] = triton_multi.part_tables(self._parts(mod.layer, parts))

    def _parts(self, layer: int, parts) -> list:
        return [([bk.weights[name][0][layer] for bk in self.pool.buckets],
                 [bk.weights[name][1][layer] for bk in self.pool.buckets], lo) for name, lo, _ in parts]

    def add_rows(self, y, x, layer, name, meta, row_scale):
        return self.add_rows_parts(y, x, layer, ((name, 0, y.shape[1]),), meta, row_scale)

    def add_rows_parts(self, y, x, layer, parts, meta, row_scale):
        from caraserve.lora import triton_multi

        triton_multi.bgmv_multi_parts(y, x, self._parts(layer, parts), meta, row_scale,
                                      tables=self._tables[(layer, tuple(parts))])
        return y

    def add_group(self, y, x, a, b, group):
        from caraserve.lora import triton_ops

        kernel = triton_ops.bgmv if self._lora.is_decode else triton_ops.sgmv
        kernel(y, x, a, b, group.scale, group.index)
