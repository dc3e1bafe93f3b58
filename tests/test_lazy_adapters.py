"""Thousands of adapters per replica: reads off the step loop, and no collector stalls."""

from __future__ import annotations

import contextlib
import gc
import threading
import time

import pytest

from caraserve.config import EngineConfig
from caraserve.engine import Engine
from caraserve.lora import host_store
from caraserve.request import SamplingParams
from caraserve.serve.gc_monitor import GcMonitor, freeze_startup_heap


@contextlib.contextmanager
def busy_engine_thread(engine: Engine):
    """A started AsyncEngine whose engine thread is held in a "step" until the yielded event is
    set (set on the way out in any case); stopped on the way out."""
    from caraserve.serve.async_engine import AsyncEngine

    service = AsyncEngine(engine, 8)
    service.start()
    busy, release = threading.Event(), threading.Event()
    try:
        service._call(lambda: (busy.set(), release.wait(10)))
        assert busy.wait(10)
        yield service, release
    finally:
        release.set()
        service.stop()


def test_a_disk_read_in_flight_never_stalls_a_running_decode(monkeypatch):
    engine = Engine(EngineConfig(compile="false", max_batch_size=4, max_seq_len=256))
    real_load = host_store.load_adapter
    reading = threading.Event()

    def slow_load(path, args, name, *a, **kw):
        if name == "demo-r64":
            reading.set()
            time.sleep(1.5)  # a slow disk
        return real_load(path, args, name, *a, **kw)

    monkeypatch.setattr(host_store, "load_adapter", slow_load)
    base = engine.add_request([1, 5, 6, 7], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    engine.step()
    cold = engine.add_request([1, 8, 9], SamplingParams(max_tokens=4, temperature=0), "demo-r64")
    steps, decoded_while_reading, finished = [], 0, set()
    while cold not in finished:
        t0 = time.perf_counter()
        outs = engine.step()
        steps.append(time.perf_counter() - t0)
        finished |= {o.request_id for o in outs if o.finished}
        if reading.is_set() and engine.request(cold) is not None and engine.request(cold).state.value == "waiting":
            decoded_while_reading += sum(o.request_id == base for o in outs)
    assert reading.is_set() and decoded_while_reading >= 10  # the base request kept decoding meanwhile
    assert max(steps) < 0.5  # no step waited for the 1.5 s read
    assert engine.store.stats().disk_reads >= 1
    engine.abort(base)


def test_an_arriving_request_starts_its_adapter_read_while_the_engine_thread_is_busy(monkeypatch):
    """The read of a request's adapter starts as the request arrives, not when the engine thread
    next schedules: it overlaps the step in progress (here a command holding the engine thread)."""
    import asyncio

    engine = Engine(EngineConfig(compile="false", max_batch_size=2, max_seq_len=256))
    real_load = host_store.load_adapter
    started = threading.Event()

    def load(path, args, name, *a, **kw):
        started.set()
        return real_load(path, args, name, *a, **kw)

    monkeypatch.setattr(host_store, "load_adapter", load)
    with busy_engine_thread(engine) as (service, release):
        async def submit():
            task = asyncio.ensure_future(service.submit([1, 8, 9], SamplingParams(max_tokens=2, temperature=0),
                                                        "demo-r64", "cold"))
            read_early = await asyncio.to_thread(started.wait, 10)
            release.set()  # the "step" ends; the request is added and runs
            queue = await task
            while not (out := await queue.get()).finished:
                pass
            return read_early, out

        read_early, out = asyncio.run(submit())
    assert read_early and out.error is None and len(out.output_ids) == 2
    # a resident adapter, an unknown name or a queue as long as the batch start nothing
    started.clear()
    engine.scheduler.read_ahead("demo-r64")
    engine.scheduler.read_ahead("no-such-adapter")
    engine.scheduler.waiting.extend([object()] * 2)
    engine.scheduler.read_ahead("demo-r8")
    engine.scheduler.waiting.clear()
    assert not started.wait(0.2) and not engine.store.ready("demo-r8")
    engine.scheduler.read_ahead("demo-r8")  # room in the queue: the read starts
    assert started.wait(10)


def test_an_unload_waits_for_a_request_still_on_its_way_to_the_engine():
    """A request accepted while the engine thread is busy is in no queue of the scheduler yet: an
    unload of its adapter waits for it as for a running one (it used to find the adapter unused,
    then be refused as in use once the request got in)."""
    import asyncio

    engine = Engine(EngineConfig(compile="false", max_batch_size=2, max_seq_len=256))
    with busy_engine_thread(engine) as (service, release):
        async def main():
            task = asyncio.ensure_future(service.submit([1, 8, 9], SamplingParams(max_tokens=8, temperature=0),
                                                        "demo-r8", "on-its-way"))
            await asyncio.sleep(0.05)  # accepted, queued to the engine thread
            unload = asyncio.ensure_future(service.retire_adapter("demo-r8", timeout_s=30))
            await asyncio.sleep(0.1)
            release.set()
            queue = await task
            while not (out := await queue.get()).finished:
                pass
            await unload  # no AdapterError: it waited for the request, then removed the adapter
            return out

        out = asyncio.run(main())
    assert out.error is None and len(out.output_ids) == 8
    assert "demo-r8" not in engine.store


def test_a_failing_read_ahead_leaves_the_request_served(monkeypatch):
    """The read-ahead is a hint: if it raises (the adapter unregistered meanwhile, the store
    closed), the request is still added and served, and nothing of it is left behind."""
    import asyncio

    from caraserve.serve.async_engine import AsyncEngine

    engine = Engine(EngineConfig(compile="false", max_batch_size=2, max_seq_len=256))

    def broken(adapter, ahead=0):
        raise KeyError(adapter)

    monkeypatch.setattr(engine.scheduler, "read_ahead", broken)
    service = AsyncEngine(engine, 8)
    service.start()
    try:
        async def run():
            queue = await service.submit([1, 8, 9], SamplingParams(max_tokens=2, temperature=0), "demo-r8", "r1")
            while not (out := await queue.get()).finished:
                pass
            return out

        out = asyncio.run(run())
    finally:
        service.stop()
    assert out.error is None and len(out.output_ids) == 2
    assert not service._waiters and service._submitting == 0


def test_start_up_heap_is_frozen_and_pauses_are_timed():
    pauses = []
    monitor = GcMonitor(lambda gen, s: pauses.append((gen, s)))
    try:
        frozen = freeze_startup_heap()
        # frozen objects can be freed (other tests' threads may drop some meanwhile), never added
        assert frozen > 0 and 0.99 * frozen <= gc.get_freeze_count() <= frozen
        gc.collect()
        assert any(gen == 2 and seconds >= 0 for gen, seconds in pauses)  # the full collection was timed
    finally:
        monitor.close()
        gc.unfreeze()
    assert monitor._callback not in gc.callbacks


def test_the_start_up_collection_runs_no_gc_callback():
    """A Ctrl-C during start-up's collection that landed in a callback's Python code was
    swallowed there, and the server started anyway: the collection runs without callbacks."""
    calls = []

    def callback(phase, info):
        calls.append(phase)

    gc.callbacks.append(callback)
    try:
        freeze_startup_heap()
        assert calls == [] and callback in gc.callbacks
        gc.collect()
        assert calls == ["start", "stop"]
    finally:
        gc.callbacks.remove(callback)
        gc.unfreeze()


def test_a_monitor_dropped_in_a_collection_leaves_the_next_monitor_its_timing():
    """A monitor that goes in a collection (a reference cycle held it) must not make the
    collection skip the next monitor's callback (it did when the callback removed itself)."""
    pauses: list[int] = []
    dropped = GcMonitor(lambda gen, s: None)
    kept = GcMonitor(lambda gen, s: pauses.append(gen))
    try:
        cycle: list = [dropped]
        cycle.append(cycle)
        del dropped, cycle
        gc.collect()  # frees the first monitor mid-collection
        assert pauses[-1:] == [2] and len([c for c in gc.callbacks if c is kept._callback]) == 1
    finally:
        kept.close()


def test_a_dropped_monitor_leaves_no_callback():
    before = len(gc.callbacks)
    GcMonitor(lambda gen, s: None)
    gc.collect()  # the first collection after the monitor is gone removes its callback
    gc.collect()
    assert len(gc.callbacks) == before


@pytest.mark.parametrize("name", ["caraserve_host_tier_bytes", "caraserve_adapter_disk_reads_total",
                                  "caraserve_gc_pause_seconds_count", "caraserve_adapters_registered"])
def test_host_tier_and_gc_metrics_exported(name):
    from caraserve.serve.async_engine import AsyncEngine
    from caraserve.serve.metrics import ServerMetrics

    engine = Engine(EngineConfig(compile="false", max_batch_size=2, max_seq_len=64))
    metrics = ServerMetrics(AsyncEngine(engine, 4))
    engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2, temperature=0), adapters=["demo-r8"])
    gc.collect()
    text = metrics.render().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name)]
    assert values and values[0] >= 1
    metrics.gc_monitor.close()


def test_server_resolves_tenants_on_first_use_and_refuses_broken_ones_with_400(tmp_path):
    """adapters.resolve_dirs through the HTTP API: a tenant folder registers on its first request;
    a tenant whose weights hold a NaN registers (headers are fine) and its first request gets a
    400 naming the NaN, as does every later one; the server keeps serving."""
    import asyncio

    import httpx
    from test_isolation import nan_adapter

    from caraserve.config import AdapterConfig, ServerConfig
    from caraserve.model.tiny import write_random_adapter
    from caraserve.serve.api import build_app
    from caraserve.serve.async_engine import AsyncEngine

    tenants = tmp_path / "tenants"
    write_random_adapter(tenants / "tenant-1", 8, 16, ["q_proj", "v_proj"], seed=11)
    nan_adapter(tenants / "tenant-nan")
    engine = Engine(EngineConfig(compile="false", max_batch_size=4, max_seq_len=128,
                                 adapters=AdapterConfig(resolve_dirs=(str(tenants),))))
    service = AsyncEngine(engine, 8)
    app = build_app(service, ServerConfig(), "tiny", [])
    service.start()

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            def body(model, **kw):
                return {"model": model, "prompt": [1, 5, 6], "max_tokens": 3, "temperature": 0, **kw}

            good = await c.post("/v1/completions", json=body("tenant-1"))
            unknown = await c.post("/v1/completions", json=body("tenant-2"))
            nan = [await c.post("/v1/completions", json=body("tenant-nan", stream=s)) for s in (True, False)]
            base = await c.post("/v1/completions", json=body("tiny"))
            return good, unknown, nan, base

    try:
        good, unknown, nan, base = asyncio.run(go())
    finally:
        service.stop()
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 3
    assert unknown.status_code == 404
    assert [r.status_code for r in nan] == [400, 400] and all("NaN" in r.json()["error"]["message"] for r in nan)
    assert base.status_code == 200


@pytest.mark.parametrize("mode", ["off", "on"])
def test_requests_waiting_for_a_slot_keep_their_read_weights(tmp_path, mode):
    """A host tier too small for the adapters, one slot per rank bucket and slow copies: the
    requests that wait for the slot keep the weights their read brought, so each adapter is
    read from disk once (they were re-read step after step as the tier dropped them). With CPU
    assist, the engine does not spin while the assisted requests wait for their copies."""
    import resource

    from caraserve.config import AdapterConfig, CpuAssistConfig
    from caraserve.model.tiny import tiny_paths, write_random_adapter

    model_dir, _ = tiny_paths()
    for i in range(6):
        write_random_adapter(tmp_path / f"a{i}", 8, 16, ("q_proj", "v_proj", "down_proj"), seed=10 + i)
    engine = Engine(EngineConfig(
        compile="false", max_batch_size=8, max_seq_len=128,
        model=__import__("caraserve.config", fromlist=["ModelConfig"]).ModelConfig(path=str(model_dir)),
        adapters=AdapterConfig(dir=str(tmp_path), device_slots=1, host_mem_bytes=1),
        cpu_assist=CpuAssistConfig(mode=mode, emulate_copy_gbps=0.001)))
    sp = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_utime, time.perf_counter()
    outs = engine.generate([[5, 6, 7, 8]] * 6, sp, [f"a{i}" for i in range(6)])
    cpu_s, wall_s = resource.getrusage(resource.RUSAGE_SELF).ru_utime - cpu0, time.perf_counter() - t0
    assert all(o.error is None and len(o.output_ids) == 3 for o in outs)
    stats = engine.store.stats()
    assert stats.disk_reads == 6 and stats.misses == 6
    assert cpu_s < 0.5 * wall_s, (cpu_s, wall_s)  # mostly waiting on the (emulated) copies


def test_an_unload_during_a_device_copy_keeps_the_engine_serving():
    """An adapter unloaded while its (slow) device copy is in flight: the unload waits for the
    copy without holding the engine thread, so other requests keep being served meanwhile (the
    engine thread used to wait for the copy, and every request with it)."""
    import asyncio

    from caraserve.config import AdapterConfig, CpuAssistConfig
    from caraserve.serve.async_engine import AsyncEngine

    engine = Engine(EngineConfig(compile="false", max_batch_size=4, max_seq_len=128,
                                 adapters=AdapterConfig(dir="demo"),
                                 cpu_assist=CpuAssistConfig(mode="on", emulate_copy_gbps=0.002)))
    service = AsyncEngine(engine, 8)
    service.start()

    async def collect(queue):
        while not (out := await queue.get()).finished:
            pass
        return out

    async def main():
        sp = SamplingParams(max_tokens=1, temperature=0)
        first = await collect(await service.submit([1, 8, 9], sp, "demo-r64", "cold"))  # prefilled on CPU
        assert first.error is None and engine.adapter_state("demo-r64") == "loading"
        unload = asyncio.ensure_future(service.retire_adapter("demo-r64", timeout_s=60))
        await asyncio.sleep(0.1)
        t0 = time.perf_counter()
        base = await collect(await service.submit([1, 5, 6], SamplingParams(max_tokens=4, temperature=0), None, "b"))
        served_s = time.perf_counter() - t0
        assert not unload.done() and engine.adapter_state("demo-r64") == "loading"  # (the copy is that slow)
        await unload
        return base, served_s

    try:
        base, served_s = asyncio.run(main())
    finally:
        service.stop()
    assert base.error is None and len(base.output_ids) == 4 and served_s < 1.0
    assert "demo-r64" not in engine.store
