"""AsyncEngine: runs the engine's step loop on its own thread and feeds asyncio callers.

The HTTP handlers never run a model step: they queue requests (validation happens at once, so a
bad request changes nothing) and await their outputs, which the engine thread hands over with
`loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass

from caraserve.engine import Engine
from caraserve.request import RequestOutput, SamplingParams

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """Too many requests are waiting."""


@dataclass
class _Waiter:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    def __init__(self, engine: Engine, max_queue: int, on_output=None):
        self.engine = engine
        self.max_queue = max_queue
        self.on_output = on_output  # called on the engine thread with every RequestOutput
        self._waiters: dict[str, _Waiter] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._retired: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="caraserve-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    @property
    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    def is_serving(self, adapter: str) -> bool:
        return adapter in self.engine.store and adapter not in self._retired

    async def submit(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None,
                     request_id: str) -> asyncio.Queue:
        """Queues a request; raises RequestError / QueueFullError without changing anything."""
        if self.num_waiting >= self.max_queue:
            raise QueueFullError(f"the queue is full ({self.max_queue} requests waiting); retry later")
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop, asyncio.Queue())
        with self._lock:
            self._waiters[request_id] = waiter
        try:
            await loop.run_in_executor(None, self.engine.add_request, prompt_ids, params, adapter, request_id)
        except BaseException:
            with self._lock:
                self._waiters.pop(request_id, None)
            raise
        self._wake.set()
        return waiter.queue

    async def abort(self, request_id: str) -> None:
        with self._lock:
            self._waiters.pop(request_id, None)
        await asyncio.get_running_loop().run_in_executor(None, self.engine.abort, request_id)

    async def retire_adapter(self, name: str, timeout_s: float) -> None:
        """Stops new requests for the adapter at once, waits for its running ones, removes it."""
        self._retired.add(name)
        try:
            deadline = time.monotonic() + timeout_s
            while self._in_use(name):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"adapter {name!r} is still in use after {timeout_s:.0f} s")
                await asyncio.sleep(0.05)
            await asyncio.get_running_loop().run_in_executor(None, self.engine.unregister_adapter, name)
        finally:
            self._retired.discard(name)

    def _in_use(self, name: str) -> bool:
        sched = self.engine.scheduler
        return any(r.adapter == name for r in list(sched.waiting) + list(sched.running))

    async def drain(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.engine.has_unfinished() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def _deliver(self, out: RequestOutput) -> None:
        if self.on_output is not None:
            self.on_output(out)
        with self._lock:
            waiter = self._waiters.get(out.request_id)
            if waiter is not None and out.finished:
                del self._waiters[out.request_id]
        if waiter is not None:
            waiter.loop.call_soon_threadsafe(waiter.queue.put_nowait, out)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.engine.has_unfinished():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a failed step must not kill the server: fail its requests
                log.exception("engine step failed")
                outputs = self.engine.fail_all(f"internal error: {type(e).__name__}: {e}")
            for out in outputs:
                self._deliver(out)
