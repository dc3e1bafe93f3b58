"""LoRA backends: the one interface through which the model's projections get their LoRA delta,
with one implementation per device.

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

import numpy as np
import torch

from caraserve import cpu_kernels, kernel_library
from caraserve.cpu_kernels import MAX_ROWS, KernelWeights, RunTable, StepRuns, packed, run_records
from caraserve.lora.batch import LoraBatch
from caraserve.lora.ops import add_lora_runs, sgmv_reference

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
        """The step's LoRA rows; called once per step before the forward."""
        self._lora = lora

    def linear(self, mod, x: torch.Tensor, fb) -> torch.Tensor:
        """mod's x @ W^T + b plus the delta of the step's LoRA rows (see the module docstring);
        a fused projection (mod.parts) gets each part's delta in its own columns."""
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
        """y plus the delta of each adapted part (name, first, end column) of the fused
        projection `mod`, each in its own columns of y; may work in place."""
        if fb.lora_mode == LORA_ROWS and len(parts) > 1:
            return self.add_rows_parts(y, x, mod.layer, parts, *fb.lora_rows)
        for name, lo, hi in parts:
            part = y[:, lo:hi]
            out = self.add(part, x, mod.layer, name, fb)
            if out is not part:  # the row form adds out of place
                part.copy_(out)
        return y

    def attach(self, mod) -> None:
        """Called once for each projection using this backend (before any step)."""

    def add_rows_parts(self, y, x, layer: int, parts, meta: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
        """The row form over the parts (name, first, end column) of a fused projection, each
        into its own columns of y (here one part at a time, out of place)."""
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
                self.add_groups(part, x, groups, mod.layer, name, None)
            if work:
                lora.handoff.add(part, work)
        return y

    def add(self, y: torch.Tensor, x: torch.Tensor, layer: int, name: str, fb) -> torch.Tensor:
        """y plus the delta of the step's rows (LORA_GROUPS or LORA_ROWS); may work in place."""
        if fb.lora_mode == LORA_ROWS:
            return self.add_rows(y, x, layer, name, *fb.lora_rows)
        self.add_groups(y, x, self._lora.groups, layer, name, None)
        return y

    def add_groups(self, y, x, groups, layer: int, name: str, tables: dict | None) -> None:
        """y += the delta of `groups` (LoraGroups) in place, a group at a time."""
        for group in groups:
            if name in group.modules:
                a, b = group.weights[name]
                self.add_group(y, x, a[layer], b[layer], group)

    def add_group(self, y, x, a: torch.Tensor, b: torch.Tensor, group) -> None:
        """y += one rank bucket's delta: a [S, in, R], b [S, R, out] the module's slots at one layer."""
        raise NotImplementedError

    def add_rows(self, y, x, layer: int, name: str, meta: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
        """The row form: meta [3, B] int32 (rank bucket or -1, slot, rank), row_scale [B]. In torch
        ops here (every row gathers its slot's weights; y + delta, not in place)."""
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


MISSING = object()


class CpuLoraBackend(LoraBackend):
    """CPU: every adapter's rows of a module in one call of the C kernel (`add_lora_runs`; torch's
    GEMMs for long prompt segments or where the kernel is unavailable). Steps reach it through the
    op `caraserve::lora_runs_`, opaque to the compiler, which finds this backend by its handle and
    reads the prepared LoraBatch: one compiled variant serves every adapter mix.

    Its caches: packed copies of the slot weights (`_packs`), each slot's run records over every
    (layer, module) (`_slots`), and the prepared batch layout's kernel runs, built from those
    records (`_step`, a cpu_kernels.StepRuns; kept while the pool hands out the same LoraBatch,
    i.e. while a decode batch's rows and slots stay). Layouts the kernel does not take whole
    (long prompt segments, weights it cannot read) use per-module tables (`_tables`, with a torch
    fallback per module). A write into a slot (DevicePool.on_write) drops that slot's copies and
    records, and the layout's runs when the layout reads that slot, so nothing outlives the
    weights it was made from; everything else stays (with thousands of tenants a slot is written
    at nearly every admission, and rebuilding every table and repacking every resident adapter
    each time cost more than the LoRA work of the steps)."""

    def __init__(self, pool):
        super().__init__(pool)
        self._tables: dict = {}  # (layer, module) -> cpu_kernels.RunTable of the prepared layout
        # (A address, in, R, out) -> cpu_kernels.KernelWeights (or None) of a slot's weights
        self._packs: dict = {}
        # (bucket rank, slot) -> the slot's run records [L, M] (None: the kernel cannot read it)
        self._slots: dict = {}
        self._step = MISSING  # StepRuns of the prepared layout (None: not the kernel's), made at first use
        # Slot writes so far, overall and per (bucket rank, slot): a record or layout built while
        # the copy thread wrote one of its slots is used once, not kept
        self._writes, self._slot_writes = 0, {}
        self._modules = {name: m for m, name in enumerate(self.pool.targets)}  # module -> records column
        self._fused: dict[str, tuple] = {}  # fused projection's name -> its adapted parts (attach)
        if hasattr(pool, "on_write"):
            pool.on_write.append(self._slot_written)

    def prepare(self, lora: LoraBatch | None) -> None:
        if lora is not self._lora:
            self._tables, self._step = {}, MISSING  # another batch layout
        super().prepare(lora)

    def _slot_written(self, bucket: int, slot: int) -> None:
        lora = self._lora
        rank = self.pool.buckets[bucket].rank
        if self._packs:
            written = set()  # addresses of the slot's A views, one per (module, layer)
            for a, _ in self.pool.buckets[bucket].weights.values():
                written.update(a[layer][slot].data_ptr() for layer in range(len(a)))
            # This runs on the copy thread while the engine thread may add entries: dict.copy()
            # clones the table in one C call that allocates nothing per item (list(d.items())
            # makes a tuple per item, and a garbage collection those allocations start may run
            # Python code and hand the GIL over mid-iteration); the dict is replaced whole.
            packs = self._packs.copy()
            self._packs = {k: v for k, v in packs.items() if k[0] not in written}
        self._slots.pop((rank, slot), None)
        if lora is not None and any(g.rank == rank and any(s == slot for *_, s in g.index.segments)
                                    for g in lora.groups):
            # the prepared step reads that slot (CPU-assisted rows of a landing adapter)
            self._tables, self._step = {}, MISSING
        # counted last: a build that began before this write ended finds the count changed
        self._slot_writes[(rank, slot)] = self._slot_writes.get((rank, slot), 0) + 1
        self._writes += 1

    def _weights(self, a: torch.Tensor, b: torch.Tensor) -> KernelWeights | None:
        """The kernel's form of the slot views a [in, R], b [R, out], made (packed and checked)
        once per slot until the pool writes that slot again."""
        key = (a.data_ptr(), a.shape[0], a.shape[1], b.shape[1])
        packs = self._packs  # one dict throughout: the copy thread may replace it (_slot_written)
        if key not in packs:
            packs[key] = KernelWeights.of(a, b, packed)
        return packs[key]

    def _pack(self, a: torch.Tensor, b: torch.Tensor):
        """Packed copies of the slot views a and b, or None (the `pack` of a generic RunTable)."""
        w = self._weights(a, b)
        return (w.a, w.b) if w is not None and w.packed else None

    def _table(self, groups, layer: int, name: str) -> RunTable:
        """The kernel table of module `name` of `layer` over the groups' runs, from the slots'
        cached KernelWeights (a step's layout changes at every admission: this is on the step)."""
        runs, widths = [], None
        for g in groups:
            if name not in g.modules:
                continue
            la, lb = g.weights[name]
            la, lb = la[layer], lb[layer]  # [S, in, R], [S, R, out]
            widths = (la.shape[1], lb.shape[2])
            base, step = la.data_ptr(), la.stride(0) * la.element_size()  # slot s's A is at base + s * step
            for start, count, slot in g.index.segments:
                if g.slot_targets and name not in g.slot_targets[slot]:
                    continue
                key = (base + slot * step, la.shape[1], la.shape[2], lb.shape[2])
                w = self._packs.get(key, MISSING)
                if w is MISSING:
                    w = self._weights(la[slot], lb[slot])
                runs.append((start, start + count, w, g.host_scale[slot]))
        return RunTable.of_weights(*(widths or (0, 0)), runs)

    def attach(self, mod) -> None:
        parts = tuple(part for part in mod.parts if part[0] in self.targets)
        if len(mod.parts) > 1 and parts:
            self._fused[mod.name] = parts

    def add(self, y, x, layer, name, fb):
        if fb.lora_mode == LORA_ROWS:  # the GPU row form, run on CPU (tests of that form)
            return self.add_rows(y, x, layer, name, *fb.lora_rows)
        torch.ops.caraserve.lora_runs_(y, x, self.handle, layer, name)
        return y

    def add_parts(self, y, x, mod, parts, fb):
        """A fused projection's parts in one op call (the op's body goes over the parts)."""
        if fb.lora_mode != LORA_GROUPS or self._fused.get(mod.name) != tuple(parts):
            return super().add_parts(y, x, mod, parts, fb)
        torch.ops.caraserve.lora_runs_(y, x, self.handle, mod.layer, mod.name)
        return y

    def add_groups(self, y, x, groups, layer, name, tables):
        add_lora_runs(y, x, groups, layer, name, tables, self._pack, self._table)

    def run_prepared(self, y: torch.Tensor, x: torch.Tensor, layer: int, name: str) -> None:
        """The op's body: y += the prepared step's delta of module `name`, or of each adapted
        part of the fused projection `name` in its own columns."""
        lora = self._lora
        if lora is None:
            return
        step = self._step
        if step is MISSING:
            writes = self._writes
            step = self._step_runs(lora)
            if self._writes == writes and lora is self._lora:
                self._step = step
        fn = kernel_library.kernel() if step is not None and cpu_kernels.usable(y, x) else None
        for part, lo, hi in self._fused.get(name, ((name, 0, None),)):
            yp = y if hi is None else y[:, lo:hi]
            if fn is not None:
                step.apply(fn, yp, x, layer, self._modules[part])
            else:
                add_lora_runs(yp, x, lora.groups, layer, part, self._tables, self._pack, self._table)

    def _step_runs(self, lora: LoraBatch) -> StepRuns | None:
        """The layout's runs of every module from its slots' records (None when a segment is too
        long for the kernel or a slot's weights are not the kernel's: torch then, per module)."""
        records, rows, scales, targeted = [], [], [], []
        for g in lora.groups:
            for start, count, slot in g.index.segments:
                rec = self._slot_records(g, slot)
                if rec is None or count > MAX_ROWS:
                    return None
                records.append(rec)
                rows.append((start, start + count))
                scales.append(g.host_scale[slot])
                mods = g.slot_targets[slot] if g.slot_targets else g.modules
                targeted.append([name in mods and name in g.modules for name in self._modules])
        if not records:
            return None
        widths = [(a[0].shape[-2], b[0].shape[-1]) for a, b in (lora.groups[0].weights[n] for n in self._modules)]
        return StepRuns([rec for rec, _ in records], np.array(targeted, dtype=bool).T, rows, scales, widths,
                        keep=records)

    def _slot_records(self, g, slot: int) -> tuple | None:
        """(run records [L, M], the weights they point at) of the adapter in the group's slot, made
        once per slot write: packed weights for the modules it adapts, the slot's own views for
        the rest (runs a step leaves empty). Layers on another device (a model split over
        devices) get empty records: this backend is never called for them."""
        key = (g.rank, slot)
        rec = self._slots.get(key, MISSING)
        if rec is not MISSING:
            return rec
        writes = self._slot_writes.get(key, 0)
        mods = g.slot_targets[slot] if g.slot_targets else g.modules
        weights, usable = [], True
        for name in self._modules:
            la, lb = g.weights[name]
            for layer in range(len(la)):
                a, b = la[layer][slot], lb[layer][slot]
                if a.device.type != "cpu":
                    weights.append(None)
                    continue
                w = self._weights(a, b) if name in mods else KernelWeights.of(a, b, lambda a, b: None)
                usable = usable and w is not None
                weights.append(w)
        rec = (run_records(weights).reshape(len(self._modules), -1).T.copy(), weights) if usable else None  # [L, M]
        if self._slot_writes.get(key, 0) == writes:
            self._slots[key] = rec
        return rec


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


def lora_mode(lora: LoraBatch | None) -> int:
    """The ForwardBatch.lora_mode of an eager step over `lora`."""
    if lora is None:
        return LORA_NONE
    return LORA_HOST if lora.host else LORA_GROUPS


def backend_for(device: torch.device, pool) -> LoraBackend:
    """The backend of a device: the one place where the device picks the LoRA implementation."""
    if device.type == "cuda":
        return TritonLoraBackend(pool)
    if device.type == "cpu":
        return CpuLoraBackend(pool)
    return TorchLoraBackend(pool)


def run_prepared(handle: int, y: torch.Tensor, x: torch.Tensor, layer: int, name: str) -> None:
    """The CPU op's body (caraserve.ops): the live backend `handle` adds its step's delta."""
    ref = _live.get(handle)
    backend = ref() if ref is not None else None
    if backend is None:
        raise RuntimeError(f"LoRA backend {handle} no longer exists")
    backend.run_prepared(y, x, layer, name)
