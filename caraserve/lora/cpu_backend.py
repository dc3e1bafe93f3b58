"""The CPU LoRA backend: every adapter's rows of a module in one call of the C kernel
(csrc/lora_cpu.c through `caraserve.lora.kernel_runs`), with its caches of packed weights and run
records. Semantics: `caraserve.lora.backend`."""

from __future__ import annotations

import threading

import numpy as np
import torch

from caraserve import kernel_library
from caraserve.lora import kernel_runs
from caraserve.lora.backend import LORA_GROUPS, LORA_ROWS, LoraBackend
from caraserve.lora.batch import LoraBatch
from caraserve.lora.kernel_runs import KernelWeights, ProjectionRuns, RunTable, StepRuns, packed, run_records
from caraserve.lora.ops import add_lora_runs

MISSING = object()


class CpuLoraBackend(LoraBackend):
    """CPU: every adapter's rows of a module in one call of the C kernel (`add_lora_runs`; torch's
    GEMMs where the kernel is unavailable or cannot read a slot's weights). Steps reach it through the
    op `caraserve::lora_runs_`, opaque to the compiler, which finds this backend by its handle and
    reads the prepared LoraBatch: one compiled variant serves every adapter mix.

    Its caches: packed copies of the slot weights (`_packs`), each slot's run records over every
    (layer, module) (`_slots`), and the prepared batch layout's kernel runs, built from those
    records (`_step`, a kernel_runs.StepRuns; kept while the pool hands out the same LoraBatch,
    i.e. while a decode batch's rows and slots stay). Layouts the kernel does not take whole
    (a slot's weights it cannot read) use per-module tables (`_tables`, with a torch
    fallback per module). A write into a slot (DevicePool.on_write) drops that slot's copies and
    records, and the layout's runs when the layout reads that slot, so nothing outlives the
    weights it was made from; everything else stays (with thousands of tenants a slot is written
    at nearly every admission, and rebuilding every table and repacking every resident adapter
    each time cost more than the LoRA work of the steps)."""

    def __init__(self, pool):
        super().__init__(pool)
        self._tables: dict = {}  # (layer, module) -> kernel_runs.RunTable of the prepared layout
        # (A address, in, R, out) -> kernel_runs.KernelWeights (or None) of a slot's weights
        self._packs: dict = {}
        # (bucket rank, slot) -> the slot's run records [L, M] (None: the kernel cannot read it)
        self._slots: dict = {}
        self._step = MISSING  # StepRuns of the prepared layout (None: not the kernel's), made at first use
        # Slot writes so far, overall and per (bucket rank, slot): a record or layout built while
        # the copy thread wrote one of its slots is used once, not kept (_slot_written)
        self._writes, self._slot_writes = 0, {}
        self._lock = threading.Lock()
        self._modules = {name: m for m, name in enumerate(self.pool.targets)}  # module -> records column
        self._fused: dict[str, tuple] = {}  # fused projection's name -> its adapted parts (attach)
        # projection name -> (in, out, ((adapted module, first column), ...)) (attach)
        self._shapes: dict[str, tuple[int, int, tuple]] = {}
        if hasattr(pool, "on_write"):
            pool.on_write.append(self._slot_written)

    def prepare(self, lora: LoraBatch | None) -> None:
        if lora is not self._lora:
            self._tables, self._step = {}, MISSING  # another batch layout
        super().prepare(lora)

    def _slot_written(self, bucket: int, slot: int) -> None:
        """(The copy thread, once the slot's new weights are in place.) Drops what was made from
        the slot's earlier weights. Under the lock, which a build on the engine thread also takes
        to read the write counts as it starts and to compare them as it stores: a build that began
        before this write is not kept, and one that begins after it finds only the new weights."""
        with self._lock:
            self._invalidate(bucket, slot)

    def _invalidate(self, bucket: int, slot: int) -> None:
        lora = self._lora
        rank = self.pool.buckets[bucket].rank
        self._slot_writes[(rank, slot)] = self._slot_writes.get((rank, slot), 0) + 1
        self._writes += 1
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

    def _table(self, groups, layer: int, name: str) -> RunTable | None:
        """The kernel table of module `name` of `layer` over the groups' runs, from the slots'
        cached KernelWeights (a step's layout changes at every admission: this is on the step);
        runs whose weights the kernel cannot read make a table that does not fit (torch then)."""
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
        out_features, in_features = mod.weight.shape
        self._shapes[mod.name] = (in_features, out_features, tuple((name, lo) for name, lo, _ in parts))

    def add(self, y, x, layer, name, fb):
        if fb.lora_mode == LORA_ROWS:  # the GPU row form, run on CPU (tests of that form)
            return self.add_rows(y, x, layer, name, *fb.lora_rows)
        self._run(y, x, layer, name)
        return y

    def add_parts(self, y, x, mod, parts, fb):
        """A fused projection's parts in one op call (the op's body goes over the parts)."""
        if fb.lora_mode != LORA_GROUPS or self._fused.get(mod.name) != tuple(parts):
            return super().add_parts(y, x, mod, parts, fb)
        self._run(y, x, mod.layer, mod.name)
        return y

    def _run(self, y, x, layer: int, name: str) -> None:
        """run_prepared, through the op `caraserve::lora_runs_` while compiling (the compiler
        takes it as one opaque call) and directly in eager steps, which the op's dispatch would
        only slow (a few microseconds a call, 16 calls a step on the embedded default)."""
        if torch.compiler.is_compiling():
            torch.ops.caraserve.lora_runs_(y, x, self.handle, layer, name)
        else:
            self.run_prepared(y, x, layer, name)

    def add_groups(self, y, x, groups, layer, name):
        add_lora_runs(y, x, groups, layer, name, None, self._pack, self._table)

    def run_prepared(self, y: torch.Tensor, x: torch.Tensor, layer: int, name: str) -> None:
        """The op's body: y += the prepared step's delta of module `name`, or of each adapted
        part of the fused projection `name` in its own columns."""
        lora = self._lora
        if lora is None:
            return
        step = self._step
        if step is MISSING:
            with self._lock:
                writes = self._writes
            step = self._step_runs(lora)
            with self._lock:
                if self._writes == writes and lora is self._lora:  # (else a slot was written meanwhile: used once)
                    self._step = step
        fn = kernel_library.parts_kernel() if step is not None and kernel_runs.usable(y, x) else None
        if fn is not None:
            proj = step.projections.get(name)
            if proj is None:  # (kept by the step: a layout's runs and their projections go together)
                in_features, out_features, parts = self._shapes.get(name) or (*step.widths[self._modules[name]],
                                                                             ((name, 0),))
                proj = ProjectionRuns(step, [(self._modules[part], lo) for part, lo in parts], in_features,
                                      out_features)
                step.projections[name] = proj
            proj.apply(fn, y, x, layer)
            return
        for part, lo, hi in self._fused.get(name, ((name, 0, None),)):
            yp = y if hi is None else y[:, lo:hi]
            add_lora_runs(yp, x, lora.groups, layer, part, self._tables, self._pack, self._table)

    def _step_runs(self, lora: LoraBatch) -> StepRuns | None:
        """The layout's runs of every module from its slots' records (None when a slot's weights
        are not the kernel's: per-module tables then)."""
        records, rows, scales, targeted = [], [], [], []
        for g in lora.groups:
            for start, count, slot in g.index.segments:
                rec = self._slot_records(g, slot)
                if rec is None:
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
        with self._lock:
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
        with self._lock:
            if self._slot_writes.get(key, 0) == writes:  # (else the slot was written meanwhile: used once)
                self._slots[key] = rec
        return rec
