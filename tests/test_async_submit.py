"""AsyncEngine.submit whose caller goes away (a client disconnect, a router's cancel): nothing it
counted stays counted, and a request it added is aborted, whether the cancel comes before the
engine thread ran the add or while the add runs."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from caraserve.config import EngineConfig
from caraserve.engine import Engine
from caraserve.request import SamplingParams
from caraserve.serve.async_engine import AsyncEngine


@pytest.fixture(scope="module")
def service():
    ae = AsyncEngine(Engine(EngineConfig(compile="false", max_batch_size=4, max_seq_len=256)), max_queue=4)
    ae.start()
    ae.wait_ready()
    yield ae
    ae.stop()


def settled(ae: AsyncEngine) -> bool:
    return ae._submitting == 0 and not ae._submitting_for and not ae.engine.has_unfinished() and not ae._waiters


async def cancelled_submit(ae: AsyncEngine, rid: str, hold: threading.Event, running: threading.Event | None = None,
                           release: threading.Event | None = None):
    """Submits a long request on demo-r8 while the engine thread is held, cancels the submit (with
    `running`: once its add runs, then lets the add go on with `release`), lets the engine
    thread go and waits until the inbox is drained: the request, added or not, is gone then."""
    sp = SamplingParams(max_tokens=200, ignore_eos=True)
    task = asyncio.ensure_future(ae.submit([1, 2, 3], sp, "demo-r8", rid))
    await asyncio.sleep(0.05)
    if running is not None:
        hold.set()  # the add starts and waits inside add_request
        assert await asyncio.to_thread(running.wait, 10)
    assert ae._submitting == 1 and ae._submitting_for == {"demo-r8": 1}
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    hold.set()
    if release is not None:
        release.set()
    await asyncio.wrap_future(ae._call(lambda: None))  # after the add (or its skip) and the abort


def test_a_submit_cancelled_before_its_add_runs_leaves_nothing_counted(service):
    hold = threading.Event()
    service._call(hold.wait, 10)  # the engine thread waits on this between steps

    async def go():
        await cancelled_submit(service, "gone-early", hold)
        assert settled(service), (service._submitting, dict(service._submitting_for))
        q = await service.submit([1, 2], SamplingParams(max_tokens=2, temperature=0), "demo-r8", "next")
        while not (await q.get()).finished:
            pass

    asyncio.run(go())
    assert settled(service)


def test_a_submit_cancelled_while_its_add_runs_is_aborted(service, monkeypatch):
    hold, running, release = threading.Event(), threading.Event(), threading.Event()
    add = service.engine.add_request

    def slow_add(*args, **kw):
        running.set()
        release.wait(10)
        return add(*args, **kw)

    monkeypatch.setattr(service.engine, "add_request", slow_add)
    service._call(hold.wait, 10)

    async def go():
        await cancelled_submit(service, "gone-late", hold, running, release)
        assert settled(service), (service._submitting, service.engine.has_unfinished())

    asyncio.run(go())


def test_state_is_answered_during_an_idle_time_compile(monkeypatch):
    """A compile at an idle moment holds the engine thread for seconds: /v1/state (a router's
    poll) answers meanwhile with the snapshot taken as the engine went idle."""
    from types import SimpleNamespace

    from caraserve.serve import async_engine

    monkeypatch.setattr(async_engine, "IDLE_WORK_AFTER_S", 0.0)
    engine = Engine(EngineConfig(compile="false", max_batch_size=4, max_seq_len=256))
    entered, release = threading.Event(), threading.Event()

    def compiling() -> bool:
        entered.set()
        release.wait(30)
        return False

    engine.idle = compiling
    engine.graphs = SimpleNamespace(pending={(4, 1): 3}, capture=False)  # a variant waiting for its compile
    ae = AsyncEngine(engine, max_queue=4)
    ae.start()
    try:
        assert ae.wait_ready(30) and entered.wait(30)
        state = asyncio.run(asyncio.wait_for(ae.state(), timeout=2))
        assert state.max_batch_size == 4 and state.running == () and state.kv_blocks_free == state.kv_blocks_total
    finally:
        release.set()
        ae.stop()


def test_a_call_is_admitted_whole_when_it_fits_or_nothing_waits(service):
    """server.max_queue (4 here) takes a call of several requests whole: refused when the
    requests already waiting and the call's would pass it, admitted past it when nothing waits."""
    from caraserve.serve.async_engine import QueueFullError

    hold = threading.Event()
    service._call(hold.wait, 10)  # the engine thread waits: submits stay counted as waiting
    sp = SamplingParams(max_tokens=2, temperature=0)

    async def go():
        first = asyncio.ensure_future(service.submit([1, 2], sp, None, "big", call_size=10))  # nothing waits
        await asyncio.sleep(0.05)
        assert service.num_waiting == 1
        joined = [asyncio.ensure_future(service.submit([1, 2], sp, None, f"big#{i}", joins_call=True))
                  for i in range(1, 3)]
        await asyncio.sleep(0.05)
        assert service.num_waiting == 3  # a call's other requests pass the bound
        with pytest.raises(QueueFullError, match="3 of 4 requests waiting, 2 more asked"):
            await service.submit([1, 2], sp, None, "pair", call_size=2)
        alone = asyncio.ensure_future(service.submit([1, 2], sp, None, "one"))  # 3 + 1 fits
        hold.set()
        for q in await asyncio.gather(first, *joined, alone):
            while not (await q.get()).finished:
                pass

    asyncio.run(go())
    assert settled(service)


def test_a_retried_call_answers_with_the_callers_id(service):
    """A router's retry runs under an id of its own (`req-7.1`: the replica tried first may still
    list `req-7`) but answers with the caller's, streamed or not, completion or chat."""
    from caraserve.serve import protocol as proto
    from caraserve.serve.service import EngineService

    api = EngineService(service, "tiny", [], 1.0)

    async def go():
        body = proto.CompletionRequest(model="tiny", prompt="x", max_tokens=2)
        assert (await api.completion(body, "req-7.1", False, answer_id="req-7"))["id"] == "req-7"
        chat = proto.ChatCompletionRequest(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                           stream=True)
        lines = [line async for line in await api.chat(chat, "req-8.2", False, answer_id="req-8")]
        chunks = [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: {")]
        assert chunks and {c["id"] for c in chunks} == {"req-8"}

    asyncio.run(go())
    assert settled(service)


def test_a_call_of_many_choices_is_queued_to_the_engine_at_once(service, monkeypatch):
    """After the call's first request, its other choices and prompts reach the engine thread
    together: no step runs between their adds (each waiting for a step of its own stalled a
    call of a thousand choices for as many steps, disconnects unseen)."""
    from caraserve.serve import protocol as proto
    from caraserve.serve.service import EngineService

    engine, steps, adds = service.engine, [0], []
    step, add_request = engine.step, engine.add_request

    def counted_step():
        steps[0] += 1
        return step()

    def recorded_add(*args, **kw):
        adds.append(steps[0])
        return add_request(*args, **kw)

    monkeypatch.setattr(engine, "step", counted_step)
    monkeypatch.setattr(engine, "add_request", recorded_add)
    api = EngineService(service, "tiny", [], 1.0)

    async def go():
        body = proto.CompletionRequest(model="demo-r8", prompt=["a b", "c d e"], n=5, max_tokens=3, temperature=0)
        return await api.completion(body, "many", False)

    answer = asyncio.run(go())
    assert len(answer["choices"]) == 10 and len(adds) == 10
    assert len(set(adds[1:])) == 1, adds  # one drain of the inbox, no step between
    assert settled(service)


def test_the_heap_is_trimmed_once_per_idle_moment(monkeypatch):
    """The engine thread gives the C heap's free pages back when it goes idle after steps: once
    after a request's steps, not again until the engine has stepped since."""
    from caraserve.serve import async_engine, gc_monitor

    trims = []
    monkeypatch.setattr(gc_monitor, "trim_heap", lambda: trims.append(threading.current_thread()) or True)
    monkeypatch.setattr(async_engine, "IDLE_WORK_AFTER_S", 0.05)
    ae = AsyncEngine(Engine(EngineConfig(compile="false", max_batch_size=2, max_seq_len=64)), max_queue=4)
    ae.start()
    try:
        ae.wait_ready()
        time.sleep(0.5)
        assert trims.count(ae._thread) == 0  # nothing stepped yet (other engines' trims aside)

        async def one():
            q = await ae.submit([1, 2, 3], SamplingParams(max_tokens=2, temperature=0), None, "t1")
            while not (await q.get()).finished:
                pass

        asyncio.run(one())
        time.sleep(0.5)
        assert trims.count(ae._thread) == 1
    finally:
        ae.stop()


def test_a_server_that_never_idles_trims_every_so_often(monkeypatch):
    from caraserve.serve import gc_monitor

    trims, now = [], [0.0]
    monkeypatch.setattr(gc_monitor, "trim_heap", lambda: trims.append(now[0]) or True)
    heap = gc_monitor.HeapTrimmer(busy_every_s=10, clock=lambda: now[0])
    for _ in range(250):  # 25 s of 0.1 s steps
        heap.stepped()
        now[0] += 0.1
    assert len(trims) == 2 and trims[0] >= 10
    heap.idle()
    heap.idle()
    assert len(trims) == 3  # once at the idle moment, not again without steps
    never = AsyncEngine(Engine(EngineConfig(compile="false", max_batch_size=2, max_seq_len=64)), max_queue=4,
                        heap_trim_s=0)
    assert never._heap is None  # server.heap_trim_s=0: never trimmed


def test_a_call_cancelled_during_admission_leaves_none_of_its_requests_running():
    """A caller that goes away while a call's choices are being admitted: the choices already in
    the engine are aborted with the first, those still queued abort themselves."""
    from caraserve.serve.runs import Runs

    class Engine:
        def __init__(self):
            self.added, self.aborted = [], []

        async def submit(self, ids, params, adapter, rid, after=None, final_only=False, call_size=1,
                         joins_call=False, arrival_s=None):
            self.added.append(rid)
            try:
                await asyncio.sleep(0 if rid in ("call#1", "call#2") else 10)  # admitted at once, or still queued
            except asyncio.CancelledError:
                self.abort(rid)  # as AsyncEngine.submit does
                raise
            return asyncio.Queue()

        def abort(self, rid, queue=None):
            self.aborted.append(rid)

    engine = Engine()

    async def go():
        task = asyncio.ensure_future(Runs(engine).start_n([1, 2], SamplingParams(max_tokens=3), None, "call",
                                                          asyncio.Queue(), 6))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    assert len(engine.added) == 5 and set(engine.added) | {"call"} <= set(engine.aborted)


def _gated_engine():
    """An AsyncEngine whose next step can be held on the engine thread (hold cleared), with
    `entered` set once a step waits there."""
    ae = AsyncEngine(Engine(EngineConfig(compile="false", max_batch_size=4, max_seq_len=256)), max_queue=8)
    step, entered, hold = ae.engine.step, threading.Event(), threading.Event()
    hold.set()

    def gated():
        if not hold.is_set():
            entered.set()
            hold.wait(30)
        return step()

    ae.engine.step = gated
    ae.start()
    assert ae.wait_ready(60)
    return ae, entered, hold


def test_an_aborted_id_is_not_handed_to_a_call_that_reuses_it_mid_step():
    """A caller goes away while a step runs and retries with the same request id: until the engine
    thread has run the abort the id is still in flight (400), and the retry then gets its own
    request's outputs, never the step's outputs of the aborted one."""
    from caraserve.serve.async_engine import RequestError

    ae, entered, hold = _gated_engine()
    old, new = [5, 6, 7, 8, 9, 10, 11, 12], [1, 2]
    greedy = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)

    async def main():
        hold.clear()  # the first step (the old request's prefill) waits on the engine thread
        first = await ae.submit(old, greedy, None, "X")
        assert await asyncio.to_thread(entered.wait, 30)
        ae.abort("X", first)
        with pytest.raises(RequestError, match="already in flight"):
            await ae.submit(new, greedy, None, "X")
        hold.set()
        for _ in range(100):  # once the abort has run, the id is free
            try:
                retry = await ae.submit(new, greedy, None, "X")
                break
            except RequestError:
                await asyncio.sleep(0.05)
        outs = [await asyncio.wait_for(retry.get(), 30)]
        while not outs[-1].finished:
            outs.append(await asyncio.wait_for(retry.get(), 30))
        return first, outs

    try:
        first, outs = asyncio.run(main())
    finally:
        hold.set()
        ae.stop()
    assert {o.prompt_tokens for o in outs} == {len(new)} and len(outs[-1].output_ids) == 3
    assert first.empty()  # the aborted call got nothing: its step's output went to no one


def test_a_late_abort_of_an_ended_request_leaves_the_ids_next_holder_alone():
    """A call whose request has ended aborts it late (its client went away as it finished) after
    another call took the same id: the other call's request runs to its end."""
    ae, _, _ = _gated_engine()
    greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)

    async def main():
        ended = await ae.submit([3, 4, 5], SamplingParams(max_tokens=1, temperature=0), None, "Y")
        while not (await asyncio.wait_for(ended.get(), 30)).finished:
            pass
        holder = await ae.submit([1, 2], greedy, None, "Y")
        ae.abort("Y", ended)
        outs = [await asyncio.wait_for(holder.get(), 30)]
        while not outs[-1].finished:
            outs.append(await asyncio.wait_for(holder.get(), 30))
        return outs[-1]

    try:
        last = asyncio.run(main())
    finally:
        ae.stop()
    assert last.error is None and len(last.output_ids) == 4
