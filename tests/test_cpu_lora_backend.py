"""The CPU LoRA backend's caches: packed kernel weights made once per slot and dropped when the
pool writes that slot (on the copy thread), and kernel tables kept per step layout."""

from __future__ import annotations

import pytest
import torch
from helpers import lora_reference as reference
from helpers import tiny_pool

from caraserve.lora import kernel_runs


def test_packed_copies_follow_writes_into_the_pool(fn):
    """Runs of rank and width multiples of 8 read packed copies, which the CPU LoRA backend makes
    once per slot; a write into a slot of the pool (a new adapter) drops that slot's copies, so
    the next table repacks it instead of reading stale weights, and keeps the other slots'."""
    from types import SimpleNamespace

    from caraserve.lora.cpu_backend import CpuLoraBackend

    g = torch.Generator().manual_seed(11)
    pool_a, pool_b = torch.randn(2, 3, 32, 16, generator=g), torch.randn(2, 3, 16, 24, generator=g)  # [L, S, ...]
    pool = SimpleNamespace(targets=("q_proj",), on_write=[],
                           buckets=[SimpleNamespace(rank=16, weights={"q_proj": (pool_a, pool_b)})])
    backend = CpuLoraBackend(pool)
    x, y0 = torch.randn(6, 32, generator=g), torch.randn(6, 24, generator=g)

    def run_once(layer=1):
        runs = [(0, 3, pool_a[layer][1], pool_b[layer][1], 0.5), (3, 6, pool_a[layer][2], pool_b[layer][2], 2.0)]
        table = kernel_runs.RunTable(runs, backend._pack)
        y = y0.clone()
        table.apply(fn, y, x)
        assert torch.allclose(y.double(), reference(y0, x, runs), rtol=1e-5, atol=1e-5)
        return table

    table, other_layer = run_once(), run_once(layer=0)
    assert [table.array[i].packed for i in range(2)] == [1, 1]
    assert run_once().array[0].a == table.array[0].a  # the same packed copy, not a new one
    pool_a[:, 2].copy_(torch.randn(2, 32, 16, generator=g))  # another adapter lands in slot 2 ...
    pool_b[:, 2].zero_()
    for notify in pool.on_write:  # ... and the pool says so
        notify(0, 2)
    again = run_once()
    assert again.array[1].a != table.array[1].a  # slot 2 repacked (run_once checked its new weights)
    assert again.array[0].a == table.array[0].a  # slot 1 untouched: its copy kept
    assert run_once(layer=0).array[1].a != other_layer.array[1].a  # every layer of slot 2
    odd = kernel_runs.RunTable([(0, 2, torch.randn(8, 12), torch.randn(12, 16), 1.0)])  # rank 12: unpacked
    assert odd.fits and odd.array[0].packed == 0


def test_tables_of_per_slot_weights_equal_the_reference_and_check_rows_and_widths(fn):
    """RunTable.of_weights (the CPU backend's per-layout tables over weights made once per slot)
    computes the reference, falls back (fits False) where the kernel cannot take a run, and
    refuses rows and widths that do not fit."""
    g = torch.Generator().manual_seed(5)
    a8, b8 = torch.randn(32, 8, generator=g), torch.randn(8, 24, generator=g)  # packed
    a12, b12 = torch.randn(32, 12, generator=g), torch.randn(12, 24, generator=g)  # rank 12: not packed
    w8, w12 = kernel_runs.KernelWeights.of(a8, b8), kernel_runs.KernelWeights.of(a12, b12)
    assert w8.packed and not w12.packed and (w8.in_features, w8.out_features) == (32, 24)
    x, y0 = torch.randn(5, 32, generator=g), torch.randn(5, 24, generator=g)
    table = kernel_runs.RunTable.of_weights(32, 24, [(0, 2, w8, 0.5), (2, 5, w12, 2.0)])
    y = y0.clone()
    table.apply(fn, y, x)
    assert torch.allclose(y.double(), reference(y0, x, [(0, 2, a8, b8, 0.5), (2, 5, a12, b12, 2.0)]), atol=1e-5)
    assert kernel_runs.KernelWeights.of(a8.double(), b8.double()) is None  # not the kernel's dtype
    assert not kernel_runs.RunTable.of_weights(32, 24, [(0, 2, w8, 1.0), (1, 3, w8, 1.0)]).fits  # shared rows
    assert not kernel_runs.RunTable.of_weights(32, 24, [(0, 2, None, 1.0)]).fits
    with pytest.raises(ValueError, match="not a range"):
        kernel_runs.RunTable.of_weights(32, 24, [(3, 2, w8, 1.0)])
    with pytest.raises(ValueError, match="widths"):
        kernel_runs.RunTable.of_weights(32, 16, [(0, 2, w8, 1.0)])
    with pytest.raises(ValueError, match="KernelWeights"):
        kernel_runs.RunTable.of_weights(32, 24, [(0, 2, (a8, b8), 1.0)])


def test_slot_writes_on_the_copy_thread_race_no_step_reading_the_packs():
    """DevicePool.on_write runs on the copy thread while steps add packed weights: dropping a
    slot's copies must not trip over the engine thread's inserts (a dict changing size while
    iterated killed the copy thread, leaving its adapter loading forever)."""
    import sys
    import threading
    from types import SimpleNamespace

    from caraserve.lora.cpu_backend import CpuLoraBackend

    pool_a = torch.zeros(2, 3, 16, 8)  # [L, S, in, R]
    pool = SimpleNamespace(targets=("q_proj",), on_write=[],
                           buckets=[SimpleNamespace(rank=8, weights={"q_proj": (pool_a, pool_a)})])
    backend = CpuLoraBackend(pool)
    backend._packs = {(i, 0, 0, 0): None for i in range(2000)}
    stop, errors = threading.Event(), []

    def steps():  # the engine thread: new entries all the time
        i = 10**6
        while not stop.is_set():
            backend._packs[(i, 0, 0, 0)] = None
            i += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    t = threading.Thread(target=steps)
    t.start()
    try:
        for _ in range(50):
            try:
                backend._slot_written(0, 1)
            except RuntimeError as e:
                errors.append(e)
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(interval)
    assert not errors


def test_pool_writes_reach_the_backend():
    """DevicePool calls its on_write listeners for each slot write (how the backend's caches learn)."""
    args, store, pool = tiny_pool()
    writes = []
    pool.on_write.append(lambda bucket, slot: writes.append((bucket, slot)))
    assert pool.load(store.get("demo-r16"))
    assert writes and {bucket for bucket, _ in writes} == {1}  # rank 16's bucket, one slot of it
    assert len({slot for _, slot in writes}) == 1


def test_the_backend_keeps_its_tables_unless_the_prepared_step_reads_the_written_slot():
    """Kernel tables belong to the prepared layout: a write into a slot the layout does not read
    (another tenant's adapter landing) keeps them, a write into one it reads drops them."""
    from caraserve.lora.cpu_backend import CpuLoraBackend

    args, store, pool = tiny_pool()
    backend = CpuLoraBackend(pool)
    assert pool.load(store.get("demo-r16"))
    pool.poll()
    lora = pool.make_batch([(0, 1, "demo-r16")], True, "cpu")
    backend.prepare(lora)
    x = torch.randn(1, args.hidden_size)
    y = torch.zeros(1, args.module_shape("q_proj")[1])
    backend.run_prepared(y, x, 0, "q_proj")
    step = backend._step
    assert isinstance(step, kernel_runs.StepRuns) and y.abs().sum() > 0
    assert pool.load(store.get("demo-r8"))  # another bucket's slot written
    assert backend._step is step
    bucket, slot = pool.slot_of("demo-r16")
    assert (16, slot) in backend._slots
    for notify in pool.on_write:  # the prepared layout's own slot written
        notify(bucket, slot)
    assert backend._step is not step and (16, slot) not in backend._slots


def test_step_runs_of_a_mixed_layout_equal_the_torch_backend():
    """One StepRuns serves every (layer, module) of a decode layout mixing rank buckets, shared
    slots and adapters that leave modules alone: each equals the plain-torch backend's delta."""
    from caraserve.lora.backend import TorchLoraBackend
    from caraserve.lora.cpu_backend import CpuLoraBackend

    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    args, store, pool = tiny_pool(targets=targets)
    names = sorted(store.names())
    for name in names:
        assert pool.load(store.get(name))
    assert any(set(store.get(n).targets) != set(targets) for n in names)  # some leave modules alone
    runs, row = [], 0
    for i, name in enumerate(sorted(names, key=pool.sort_key)):
        runs.append((row, 1 + i % 3, name))
        row += 1 + i % 3
    lora = pool.make_batch(runs, True, "cpu")
    cpu, ref = CpuLoraBackend(pool), TorchLoraBackend(pool)
    cpu.prepare(lora)
    ref.prepare(lora)
    g = torch.Generator().manual_seed(3)
    for layer in range(args.num_layers):
        for name in targets:
            fan_in, fan_out = args.module_shape(name)
            x, y0 = torch.randn(row, fan_in, generator=g), torch.randn(row, fan_out, generator=g)
            y, expect = y0.clone(), y0.clone()
            cpu.run_prepared(y, x, layer, name)
            ref.add_groups(expect, x, lora.groups, layer, name)
            assert torch.allclose(y, expect, rtol=1e-4, atol=1e-4), (layer, name)
    assert isinstance(cpu._step, kernel_runs.StepRuns)
    with pytest.raises(ValueError, match="disjoint"):
        kernel_runs.StepRuns([cpu._step.records[..., 0]] * 2, cpu._step.records["end"][0, :, :2] > 0,
                             [(0, 3), (2, 4)], [1.0, 1.0], cpu._step.widths)


def test_records_built_while_the_copy_thread_writes_their_slot_are_used_once_not_kept(monkeypatch):
    """A slot's run records built while the pool writes that slot (the copy thread's on_write
    arriving mid-build) serve that call only: the next use builds them again from the new
    weights."""
    from caraserve.lora.cpu_backend import MISSING, CpuLoraBackend

    args, store, pool = tiny_pool()
    backend = CpuLoraBackend(pool)
    assert pool.load(store.get("demo-r16"))
    lora = pool.make_batch([(0, 1, "demo-r16")], True, "cpu")
    bucket, slot = pool.slot_of("demo-r16")
    real, fired = backend._weights, []

    def weights(a, b):
        if not fired:  # the copy thread lands a write into this very slot mid-build
            fired.append(1)
            backend._slot_written(bucket, slot)
        return real(a, b)

    monkeypatch.setattr(backend, "_weights", weights)
    backend.prepare(lora)
    x, y = torch.randn(1, args.hidden_size), torch.zeros(1, args.module_shape("q_proj")[1])
    backend.run_prepared(y, x, 0, "q_proj")
    assert fired and (16, slot) not in backend._slots and backend._step is MISSING
    backend.run_prepared(y, x, 0, "q_proj")  # built again, now kept
    assert (16, slot) in backend._slots and isinstance(backend._step, kernel_runs.StepRuns)



def test_a_fused_projection_gets_every_part_in_one_kernel_call_per_layer(monkeypatch):
    """q/k/v fused into one output: the CPU backend adds each adapted part's delta in its own
    columns with one kernel call per layer, equal to the plain-torch backend part by part."""
    from caraserve import kernel_library
    from caraserve.lora.backend import TorchLoraBackend
    from caraserve.lora.cpu_backend import CpuLoraBackend
    from caraserve.model.layers import LoraLinear

    parts = ("q_proj", "k_proj", "v_proj")
    args, store, pool = tiny_pool()
    for name in ("demo-r8", "demo-r16", "demo-r32"):  # r8 adapts q and v only
        assert pool.load(store.get(name))
    lora = pool.make_batch([(0, 3, "demo-r8"), (3, 2, "demo-r16"), (5, 4, "demo-r32")], True, "cpu")
    cpu, ref = CpuLoraBackend(pool), TorchLoraBackend(pool)
    widths = tuple(args.module_shape(p)[1] for p in parts)
    mod = LoraLinear(args.hidden_size, widths, False, 0, parts)
    cpu.attach(mod)
    cpu.prepare(lora)
    calls, real = [], kernel_library.parts_kernel()
    monkeypatch.setattr(kernel_library, "parts_kernel", lambda: lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(4)
    for layer in range(args.num_layers):
        x, y0 = torch.randn(9, args.hidden_size, generator=g), torch.randn(9, sum(widths), generator=g)
        y, expect = y0.clone(), y0.clone()
        cpu.run_prepared(y, x, layer, mod.name)
        for name, lo, hi in mod.parts:
            ref.add_groups(expect[:, lo:hi], x, lora.groups, layer, name)
        assert torch.allclose(y, expect, rtol=1e-4, atol=1e-4), layer
        assert not torch.equal(y, y0)
    assert len(calls) == args.num_layers
def test_a_build_that_starts_during_a_slot_write_waits_for_it_and_keeps_only_the_new_weights():
    """The engine thread starts building a slot's records while the copy thread is in the middle
    of dropping that slot's packed copies: the build waits for the write to end, then packs the
    new weights; no copy made before the write is kept."""
    import threading
    import time

    from caraserve.lora.cpu_backend import MISSING, CpuLoraBackend

    args, store, pool = tiny_pool()
    backend = CpuLoraBackend(pool)
    assert pool.load(store.get("demo-r16"))
    lora = pool.make_batch([(0, 1, "demo-r16")], True, "cpu")
    bucket, slot = pool.slot_of("demo-r16")
    backend.prepare(lora)
    x, y = torch.randn(1, args.hidden_size), torch.zeros(1, args.module_shape("q_proj")[1])
    backend.run_prepared(y, x, 0, "q_proj")
    old = list(backend._packs.values())  # made from the slot's weights before the write
    assert any(w is not None for w in old)
    paused, go = threading.Event(), threading.Event()

    class Packs(dict):
        def copy(self):  # the copy thread, mid-invalidation
            paused.set()
            go.wait(10)
            return dict(self)

    backend._packs = Packs(backend._packs)
    backend._slots.clear()
    backend._step = MISSING  # the next call builds again
    writer = threading.Thread(target=backend._slot_written, args=(bucket, slot))
    writer.start()
    assert paused.wait(10)
    reader = threading.Thread(target=backend.run_prepared, args=(y, x, 0, "q_proj"))
    reader.start()
    time.sleep(0.2)
    waited = reader.is_alive()
    go.set()
    writer.join(10)
    reader.join(10)
    assert waited  # the build waited for the write
    kept = backend._slots[(16, slot)][1]
    assert kept and not any(w is o for w in kept for o in old if o is not None)
