"""The engine thread's own failures: whatever goes wrong on it outside a request, no caller is left
waiting on a thread that will never answer."""

from __future__ import annotations

import asyncio

import pytest

from caraserve.config import EngineConfig
from caraserve.engine import Engine
from caraserve.request import SamplingParams
from caraserve.serve.async_engine import AsyncEngine, EngineUnavailableError

GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


def _engine(**kw) -> AsyncEngine:
    ae = AsyncEngine(Engine(EngineConfig(compile="false", max_batch_size=4, max_seq_len=128)), max_queue=8, **kw)
    ae.start()
    assert ae.wait_ready(60)
    return ae


async def _last(queue: asyncio.Queue):
    while True:
        out = await asyncio.wait_for(queue.get(), 30)
        if out.finished:
            return out


def test_a_failing_output_callback_keeps_no_output_from_its_caller():
    """The output callback (metrics, request logs) raising: the caller still gets every output."""
    ae = _engine(on_output=lambda out: 1 / 0)

    async def main():
        return await _last(await ae.submit([1, 2, 3], GREEDY, None, "a"))

    try:
        out = asyncio.run(main())
    finally:
        ae.stop()
    assert out.error is None and len(out.output_ids) == 4 and ae.fault is None


def test_a_failure_of_the_loop_outside_a_step_ends_the_requests_and_refuses_commands():
    """The step loop's own work failing (here: the heap trimmer as the engine steps): the request
    in flight ends with an error, later commands get EngineUnavailableError, /health's `healthy`
    is false; before, the thread ended silently and all of them waited for ever."""
    ae = _engine()

    def broken():
        raise RuntimeError("trimmer broke")

    ae._heap.stepped = broken

    async def main():
        out = await _last(await ae.submit([1, 2, 3], GREEDY, None, "b"))
        with pytest.raises(EngineUnavailableError, match="trimmer broke"):
            await asyncio.wait_for(ae.call(lambda: 1), 10)
        return out

    try:
        out = asyncio.run(main())
    finally:
        ae.stop()
    assert out.error is not None and "trimmer broke" in out.error
    assert not ae.healthy and "trimmer broke" in ae.fault


def test_a_command_for_an_ended_engine_thread_is_refused_not_left_waiting():
    ae = _engine()
    ae.stop()
    assert ae.ended

    async def main():
        await asyncio.wait_for(ae.call(lambda: 1), 10)

    with pytest.raises(EngineUnavailableError, match="not serving"):
        asyncio.run(main())
