"""LoRA backends: the one interface through which the model's projections get their LoRA delta,
with one implementation per device (`backend_for`): `CpuLoraBackend` (lora/cpu_backend.py),
`TritonLoraBackend` (lora/triton_backend.py), and `TorchLoraBackend` here.

Semantics (every backend; `TorchLoraBackend` is the plain-torch statement, the tests' oracle):

    y = x @ W^T + bias                                   x [T, in], W [out, in], y [T, out]
    for each group g of the step (one rank bucket), each of its segments (rows [s, s+n), slot k)
    whose adapter targets the module:
        y[s:s+n] += scale_g[k] * (x[s:s+n] @ A_g[layer, k]) @ B_g[layer, k]
                                                         A_g [L, S, in, R], B_g [L, S, R, out]
    for each CPU-assisted segment (a prompt whose adapter is still being copied; prefill only):
        the same delta from the adapter's host weights, computed on CPU workers while the device
        runs the base GEMM, or from its device slot for the layers that have landed

The runner calls `prepare(lora)` once per step with the step's LoraBatch (None: no LoRA rows);
the model's LoraLinear calls `linear(module, x, fb)`. A compiled step calls the same `linear`:
its Python branches read only constants of the step's ForwardBatch (`lora_mode`), and the
device-specific work is either an opaque op (CPU) or kernels over tensors of the ForwardBatch
(GPU: `lora_rows`, the BGMV row table), so one compiled variant serves every adapter mix.
"""

from __future__ import annotations

import itertools
import weakref

import torch

from caraserve.lora.batch import LoraBatch
from caraserve.lora.ops import sgmv_reference

# ForwardBatch.lora_mode: how a step's LoRA rows are described
LORA_NONE = 0  # no LoRA rows
LORA_GROUPS = 1  # the prepared LoraBatch's groups (eager steps; compiled CPU steps through the op)
LORA_ROWS = 2  # ForwardBatch.lora_rows: one (bucket, slot, rank) and scale per row (compiled GPU steps)
LORA_HOST = 3  # LORA_GROUPS plus CPU-assisted segments (eager prefill only)

_live: dict[int, weakref.ref] = {}  # handle -> backend, for the CPU op (torch ops take no Python objects)
_handles = itertools.count(1)


class LoraBackend:
    """The interface and what every device shares: the CPU-assisted rows and the step's state."""

    def __init__(self, pool):
        self.pool = pool  # DevicePool: the rank buckets' stacked slot tensors
        self.targets = frozenset(pool.targets)
        self._lora: LoraBatch | None = None
        self.handle = next(_handles)
        _live[self.handle] = weakref.ref(self, lambda _, h=self.handle: _live.pop(h, None))

    def prepare(self, lora: LoraBatch | None) -> None:
        """Semantics: self.step = lora (the step's groups, segments and CPU-assisted rows; None:
        no LoRA rows). Called by the runner once per step, before the forward."""
        self._lora = lora

    def linear(self, mod, x: torch.Tensor, fb) -> torch.Tensor:
        """Semantics (x [T, in] -> y [T, out]):
            y = x @ mod.W^T + mod.b
            for each part (name, lo, hi) of mod.parts whose module the pool adapts:
                y[:, lo:hi] += delta(name, mod.layer, x)      (the module docstring's delta)
        fb.lora_mode says where the rows come from: none, the prepared groups, fb.lora_rows, or
        the prepared groups plus CPU-assisted segments."""
        mode = fb.lora_mode
        if mode == LORA_HOST:
            return self._linear_with_host(mod, x)
        y = mod.base(x)
        if mode == LORA_NONE:
            return y
        if len(mod.parts) == 1:
            return self.add(y, x, mod.layer, mod.name, fb) if mod.name in self.targets else y
        parts = [part for part in mod.parts if part[0] in self.targets]
        return self.add_parts(y, x, mod, parts, fb) if parts else y

    def add_parts(self, y, x, mod, parts, fb) -> torch.Tensor:
        """Semantics (x [T, in], y [T, out] of the fused projection `mod`):
            for (name, lo, hi) in parts: y[:, lo:hi] += delta(name, mod.layer, x)
            return y                                          (may be y itself, updated in place)"""
        if fb.lora_mode == LORA_ROWS and len(parts) > 1:
            return self.add_rows_parts(y, x, mod.layer, parts, *fb.lora_rows)
        for name, lo, hi in parts:
            part = y[:, lo:hi]
            out = self.add(part, x, mod.layer, name, fb)
            if out is not part:  # the row form adds out of place
                part.copy_(out)
        return y

    def attach(self, mod) -> None:
        """Called once for each projection using this backend (before any step): its shape and
        parts, for backends that plan per projection. Semantics: no effect on any result."""

    def add_rows_parts(self, y, x, layer: int, parts, meta: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
        """Semantics: for (name, lo, hi) in parts: y[:, lo:hi] = add_rows(y[:, lo:hi], x, layer,
        name, meta, row_scale); return y. (Here one part at a time; kernels take all at once.)"""
        for name, lo, hi in parts:
            part = y[:, lo:hi]
            part.copy_(self.add_rows(part, x, layer, name, meta, row_scale))
        return y

    def _linear_with_host(self, mod, x: torch.Tensor) -> torch.Tensor:
        lora = self._lora
        host, groups = lora.at_layer(mod.layer)
        # CPU-assisted rows start first, so their CPU work overlaps the base GEMM below.
        pending = [lora.handoff.submit(x, mod.layer, name, host) if host else () for name, _, _ in mod.parts]
        y = mod.base(x)
        for (name, lo, hi), work in zip(mod.parts, pending):
            part = y if len(mod.parts) == 1 else y[:, lo:hi]
            if name in self.targets:
                self.add_groups(part, x, groups, mod.layer, name)
            if work:
                lora.handoff.add(part, work)
        return y

    def add(self, y: torch.Tensor, x: torch.Tensor, layer: int, name: str, fb) -> torch.Tensor:
        """Semantics (x [T, in], y [T, out]): return y + delta(name, layer, x) over the step's
        rows, from the prepared groups (LORA_GROUPS) or fb.lora_rows (LORA_ROWS); may update y
        in place and return it."""
        if fb.lora_mode == LORA_ROWS:
            return self.add_rows(y, x, layer, name, *fb.lora_rows)
        self.add_groups(y, x, self._lora.groups, layer, name)
        return y

    def add_groups(self, y, x, groups, layer: int, name: str) -> None:
        """Semantics (x [T, in], y [T, out], in place):
            for g in groups if name in g.modules:
                for (s, n, k) in g.index.segments whose adapter targets `name`:
                    y[s:s+n] += g.scale[k] * (x[s:s+n] @ A_g,name[layer, k]) @ B_g,name[layer, k]"""
        for group in groups:
            if name in group.modules:
                a, b = group.weights[name]
                self.add_group(y, x, a[layer], b[layer], group)

    def add_group(self, y, x, a: torch.Tensor, b: torch.Tensor, group) -> None:
        """Semantics (a [S, in, R], b [S, R, out]: one rank bucket's slots of a module at one
        layer; in place): for (s, n, k) in group.index.segments:
            y[s:s+n] += group.scale[k] * (x[s:s+n] @ a[k]) @ b[k]"""
        raise NotImplementedError

    def add_rows(self, y, x, layer: int, name: str, meta: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
        """Semantics of the row form (x [B, in], y [B, out], meta [3, B] int32: rank bucket or -1,
        slot, rank of each row; row_scale [B] float32):
            for each row i with meta[0, i] = b >= 0, k = meta[1, i]:
                y[i] += row_scale[i] * (x[i] @ A_b,name[layer, k]) @ B_b,name[layer, k]
        Here in torch ops (every row gathers its slot's weights; y + delta, not in place)."""
        slot = meta[1].long()
        for b, bucket in enumerate(self.pool.buckets):
            la, lb = bucket.weights[name]
            v = torch.bmm(x.unsqueeze(1), la[layer][slot])  # [B, 1, R]
            d = torch.bmm(v, lb[layer][slot]).squeeze(1)  # [B, out]
            y = y + (d * torch.where(meta[0] == b, row_scale, 0.0).unsqueeze(1)).to(y.dtype)
        return y


class TorchLoraBackend(LoraBackend):
    """The semantics in plain torch ops, on any device: the oracle of the tests."""

    def add_group(self, y, x, a, b, group):
        sgmv_reference(y, x, a, b, group.scale, group.index)


def lora_mode(lora: LoraBatch | None) -> int:
    """The ForwardBatch.lora_mode of an eager step over `lora`."""
    if lora is None:
        return LORA_NONE
    return LORA_HOST if lora.host else LORA_GROUPS


def backend_for(device: torch.device, pool) -> LoraBackend:
    """The backend of a device: the one place where the device picks the LoRA implementation."""
    if device.type == "cuda":
        from caraserve.lora.triton_backend import TritonLoraBackend

        return TritonLoraBackend(pool)
    if device.type == "cpu":
        from caraserve.lora.cpu_backend import CpuLoraBackend

        return CpuLoraBackend(pool)
    return TorchLoraBackend(pool)


def run_prepared(handle: int, y: torch.Tensor, x: torch.Tensor, layer: int, name: str) -> None:
    """The CPU op's body (caraserve.ops): the live backend `handle` adds its step's delta."""
    ref = _live.get(handle)
    backend = ref() if ref is not None else None
    if backend is None:
        raise RuntimeError(f"LoRA backend {handle} no longer exists")
    backend.run_prepared(y, x, layer, name)
