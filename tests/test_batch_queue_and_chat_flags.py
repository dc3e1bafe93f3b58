"""OpenAI batch jobs and Engine.chat at their edges: a call of several prompts waits its turn as
one of n choices does, the queue's wait stays linear in the job's lines, and chat's flags are
checked as the API checks them."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from caraserve.config import EngineConfig, ServerConfig
from caraserve.engine import Engine
from caraserve.serve.openai_batch import _Slots, run_openai_batch


def _line(custom_id, body, url="/v1/completions") -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


@pytest.fixture(scope="module")
def engine():
    with Engine(EngineConfig(compile="false", max_batch_size=8, max_seq_len=256)) as e:
        yield e


def test_calls_of_several_prompts_wait_their_turn_rather_than_a_full_queue(engine):
    body = {"model": "demo-r8", "prompt": ["x", "y", "z"], "max_tokens": 3, "temperature": 0}
    lines = [_line(f"c{i}", body) for i in range(4)] + [_line("ids", {**body, "prompt": [[1, 2], [3], [4]]})]
    results, summary = run_openai_batch(engine, ServerConfig(max_queue=4), lines)
    assert [r["response"]["status_code"] for r in results] == [200] * 5, results
    assert summary.errors == 0 and all(len(r["response"]["body"]["choices"]) == 3 for r in results)


def _wait_all(waiters: int) -> float:
    async def go():
        slots = _Slots(16)

        async def one():
            weight = await slots.take(1)
            await asyncio.sleep(0)  # (held a moment, as a call is, so the others queue up behind it)
            await slots.give(weight)

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(waiters)))
        assert slots.free == 16
        return time.perf_counter() - t0

    return min(asyncio.run(go()) for _ in range(2))


def test_the_queue_wait_grows_linearly_with_the_lines_waiting():
    small, large = _wait_all(1000), _wait_all(8000)
    assert large < 30 * small + 1.0, (small, large)  # linear: about 8x; waking every waiter: 100x and more


def test_a_cancelled_wait_gives_its_place_to_the_calls_behind_it():
    async def go():
        slots = _Slots(2)
        await slots.take(2)
        big = asyncio.ensure_future(slots.take(2))
        small = asyncio.ensure_future(slots.take(1))
        await asyncio.sleep(0)
        big.cancel()
        await asyncio.sleep(0)
        await slots.give(1)
        assert await asyncio.wait_for(small, 1) == 1 and slots.free == 0

    asyncio.run(go())


def test_chat_refuses_flags_that_are_not_booleans(engine):
    msgs = [{"role": "user", "content": "hi"}]
    for kwargs in ({"add_generation_prompt": "no"}, {"continue_final_message": 1}):
        with pytest.raises(TypeError, match="must be True or False"):
            engine.chat(msgs, **kwargs)


def test_calls_in_flight_stay_within_the_apps_concurrency_limit(engine):
    """server.max_queue above server.limit_concurrency: the calls past the app's limit wait too."""
    lines = [json.dumps({"custom_id": str(i), "method": "POST", "url": "/v1/completions",
                         "body": {"model": "tiny", "prompt": f"x {i}", "max_tokens": 2}}) for i in range(6)]
    results, summary = run_openai_batch(engine, ServerConfig(max_queue=8, limit_concurrency=2), lines)
    assert [r["response"]["status_code"] for r in results] == [200] * 6 and summary.errors == 0
