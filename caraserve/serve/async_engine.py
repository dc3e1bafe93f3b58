"""AsyncEngine: runs the engine's step loop on its own thread and feeds asyncio callers.

Only the engine thread changes the engine's queues: handlers send it commands (add, abort,
unregister) through an inbox it drains between steps, and await a future for the result. So a
handler never waits for a step to finish to get the engine lock, and a validation error comes
back before anything changed. Handlers do read the scheduler's queues without the lock (their
lengths, a copy of them: single C-level operations under the GIL) for admission counts and
adapter use, which may be a step old; the engine re-checks whatever such a read decides, and an
adapter read ahead (`read_ahead`) is a hint the host store serializes. Outputs go back with
`loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass

from caraserve.engine import Engine
from caraserve.request import ErrorCause, RequestError, RequestOutput, SamplingParams
from caraserve.serve.engine_commands import EngineCommands
from caraserve.serve.gc_monitor import HeapTrimmer

log = logging.getLogger(__name__)


# Seconds without requests before the engine thread does idle work (Engine.idle)
IDLE_WORK_AFTER_S = 1.0
# Seconds a state call waits for the engine thread (a router polls it; one step is far shorter)
STATE_WAIT_S = 5.0


class QueueFullError(RuntimeError):
    """Too many requests are waiting."""


class EngineUnavailableError(RuntimeError):
    """The engine failed as a whole (or its thread is gone): it takes no requests."""


@dataclass
class _Waiter:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    aborted: bool = False  # its caller went away: outputs are dropped until the engine thread ends it


class AsyncEngine:
    def __init__(self, engine: Engine, max_queue: int, on_output=None, heap_trim_s: float = 10.0,
                 stall_timeout_s: float = 0.0):
        self.engine = engine
        self.max_queue = max_queue
        self.stall_timeout_s = stall_timeout_s  # `stalled` past this long in one call (0: never)
        self._beat = time.monotonic()  # when the engine thread last came round its loop
        self.on_output = on_output  # called on the engine thread with every RequestOutput
        self._waiters: dict[str, _Waiter] = {}
        self._lock = threading.Lock()
        # (callable, args, concurrent Future, callable run instead when the call is cancelled or refused)
        self._commands = EngineCommands(
            lambda: EngineUnavailableError(f"the engine is not serving ({self.fault or 'stopped'})"))
        # the engine thread's: freed tensors' memory goes back to the system (None: never)
        self._heap = HeapTrimmer(heap_trim_s) if heap_trim_s > 0 else None
        self._stop = threading.Event()
        self._warm = threading.Event()  # set once the engine thread has warmed the engine up
        self._idle_work = threading.Event()  # set while the engine thread does idle work (a compile)
        self._idle_state = None  # the engine's snapshot as it went idle (what `state` answers meanwhile)
        self._retired: set[str] = set()
        self._submitting = 0  # accepted by a handler, not yet in the engine's queue
        self._submitting_for: collections.Counter[str] = collections.Counter()  # of those, per adapter
        self.fault: str | None = None  # set once a fault no request explains ended every request
        self._thread = threading.Thread(target=self._run, name="caraserve-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ends the step loop. A step is waited for (up to 10 s); a warm-up or idle-time compile is
        not: it cannot be interrupted, takes up to tens of seconds, and no request waits for it
        once the server has drained, so the thread (a daemon) is left to end with the process."""
        self._stop.set()  # before reading _idle_work: the engine thread sets that before reading _stop
        compiling = not self._warm.is_set() or self._idle_work.is_set()
        self._thread.join(timeout=0.1 if compiling else 10)

    def _call(self, fn, *args, skipped=None) -> concurrent.futures.Future:
        """Runs fn(*args) on the engine thread between steps; skipped() instead (on that thread)
        when the future was cancelled before fn started, or an engine fault refuses it."""
        fut = self._commands.put(fn, args, skipped)
        if self.ended:  # nobody would ever take it (and the thread may have ended before the put)
            self._commands.refuse_queued()
        return fut

    @property
    def ended(self) -> bool:
        """The engine thread has ended (stopped, or it failed past its own fault handling): nothing
        queued to it will run, and no request in flight will have another output."""
        return self._thread.ident is not None and not self._thread.is_alive()

    async def state(self):
        """The engine's snapshot (Engine.snapshot), taken between steps; during an idle-time
        compile, the one taken as it began: nothing ran since, and a router polling the state
        must not wait seconds for the compile."""
        idle_state = self._idle_state
        if self._idle_work.is_set() and idle_state is not None:
            return idle_state
        try:
            return await asyncio.wait_for(self.call(self.engine.snapshot), STATE_WAIT_S)
        except asyncio.TimeoutError:
            raise EngineUnavailableError(f"the engine thread took no state call for {STATE_WAIT_S:.0f} s "
                                         f"({self.stalled_for()})") from None

    async def call(self, fn, *args):
        """Runs fn(*args) on the engine thread between steps and returns its result."""
        return await asyncio.wrap_future(self._call(fn, *args))

    @property
    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting) + self._submitting

    @property
    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    @property
    def healthy(self) -> bool:
        return self.fault is None and self._thread.is_alive() and not self._stop.is_set()

    def stalled_for(self) -> str:
        return f"the engine thread came round its loop {time.monotonic() - self._beat:.1f} s ago"

    @property
    def stalled(self) -> str | None:
        """Why /health fails while requests wait and the engine thread has been inside one call
        (a step, a command) for more than stall_timeout_s: a hung step. None otherwise, and
        during idle work the thread chose (a compile at an idle moment) or with no timeout."""
        stuck = time.monotonic() - self._beat
        if not self.stall_timeout_s or stuck <= self.stall_timeout_s or self._idle_work.is_set():
            return None
        if not (self.num_waiting or self.num_running or not self._commands.empty()):
            return None
        return (f"the engine thread has been in one step (or command) for {stuck:.0f} s with requests waiting "
                f"(server.stall_timeout_s={self.stall_timeout_s:g})")

    @property
    def ready(self) -> bool:
        """Healthy and done warming up (engine.compile=true compiles first, on the engine thread)."""
        return self.healthy and self._warm.is_set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Waits until the engine thread has warmed the engine up (or `timeout` seconds); whether
        it is ready then (False: still warming, or it failed)."""
        self._warm.wait(timeout)
        return self.ready

    def is_serving(self, adapter: str) -> bool:
        return adapter in self.engine.store and adapter not in self._retired

    async def submit(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None,
                     request_id: str, after: str | None = None, final_only: bool = False,
                     call_size: int = 1, joins_call: bool = False, arrival_s: float | None = None) -> asyncio.Queue:
        """Queues a request; raises RequestError / QueueFullError / EngineUnavailableError without
        changing anything. final_only: its queue gets one output, when it ends (Engine.add_request).
        A call of several requests (choices, prompts) is admitted or refused whole, at its first
        (`call_size`: how many it has): when they all fit in server.max_queue, or nothing waits
        (a call larger than the queue still runs, alone). joins_call: one of its other requests.
        arrival_s: when its call reached the server (time.perf_counter(); default now), which its
        TTFT counts from: templating, tokenizing, a grammar's compile and the wait for the engine
        thread (a step, a compile) all count."""
        if not self.healthy:
            raise EngineUnavailableError(f"the engine is not serving ({self.fault or 'stopped'})")
        arrival = arrival_s if arrival_s is not None else time.perf_counter()
        waiting = self.num_waiting
        if not joins_call and waiting and waiting + call_size > self.max_queue:
            raise QueueFullError(f"the queue is full ({waiting} of {self.max_queue} requests waiting, "
                                 f"{call_size} more asked); retry later")
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop, asyncio.Queue())
        with self._lock:
            if request_id in self._waiters:
                raise RequestError(f"request id {request_id!r} is already in flight")
            self._waiters[request_id] = waiter
            self._submitting += 1  # counted at once: handlers checking the queue meanwhile see it
            if adapter is not None:  # and an unload waits for it as for a running request
                self._submitting_for[adapter] += 1

        if adapter is not None:  # the read overlaps the step in progress; the add below runs after it
            try:
                self.engine.scheduler.read_ahead(adapter, ahead=self._submitting - 1)
            except Exception:  # a hint only: the engine checks the adapter when it adds the request
                log.debug("read-ahead of %r failed", adapter, exc_info=True)

        def settle():  # on the engine thread, once: as the request enters the queue, or does not
            with self._lock:
                self._submitting -= 1
                if adapter is not None:
                    self._submitting_for[adapter] -= 1
                    if not self._submitting_for[adapter]:
                        del self._submitting_for[adapter]

        def add():
            try:
                self.engine.add_request(prompt_ids, params, adapter, request_id, after, final_only, arrival)
            finally:
                settle()

        try:
            await asyncio.wrap_future(self._call(add, skipped=settle))
        except asyncio.CancelledError:
            # The caller went away: an add already running still adds the request, which nobody
            # would read; the abort, queued after it, ends it (and finds nothing when it did not run).
            self.abort(request_id, waiter.queue)
            raise
        except BaseException:
            with self._lock:
                self._waiters.pop(request_id, None)
            raise
        return waiter.queue

    def abort(self, request_id: str, queue: asyncio.Queue | None = None) -> None:
        """Queues the abort of the request `submit` returned `queue` for (None: whichever holds the
        id); no await: it must work from a cancelled handler too. A request that has ended (its
        last output delivered) is left alone, and so is the id: another call may hold it by now.
        The id stays taken until the engine thread has run the abort: a call that reused it
        meanwhile would otherwise be handed the outputs of the step in progress, the aborted
        request's."""
        with self._lock:
            waiter = self._waiters.get(request_id)
            if waiter is None or (queue is not None and waiter.queue is not queue):
                return
            waiter.aborted = True

        def run():
            with self._lock:
                if self._waiters.get(request_id) is waiter:
                    del self._waiters[request_id]
            out = self.engine.abort(request_id)
            if out is not None and self.on_output is not None:
                self.on_output(out)

        self._call(run)

    def end_all(self, message: str) -> None:
        """Ends every request in flight with `message` (a 503 to its caller): for a shutdown whose
        drain time ran out, so its callers get an answer rather than a cancelled connection."""
        def run():
            outs = self.engine.fail_all(message, ErrorCause.SHUTDOWN)
            if outs:
                log.warning("%d requests still in flight end with a 503: %s", len(outs), message)
            for out in outs:
                self._deliver(out)

        self._call(run)

    async def retire_adapter(self, name: str, timeout_s: float) -> None:
        """Stops new requests for the adapter at once, waits for its running ones and for a
        device copy in flight (here: removing it would wait for the copy on the engine thread,
        and every request with it), removes it."""
        self._retired.add(name)
        try:
            deadline = time.monotonic() + timeout_s
            while not await self.call(self._remove_if_unused, name):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"adapter {name!r} is still in use (or its device copy in flight) after "
                                       f"{timeout_s:.0f} s")
                await asyncio.sleep(0.05)
        finally:
            self._retired.discard(name)

    def _remove_if_unused(self, name: str) -> bool:
        """(On the engine thread, where the queues hold still: a request moving from waiting to
        running is never seen in neither.) Removes the adapter when no request uses it (queued
        to this thread, waiting or running) and no device copy of it is in flight (copies that
        ended flip to resident here, as at a step); whether it did."""
        with self._lock:
            if self._submitting_for.get(name):
                return False
        sched = self.engine.scheduler
        if any(r.adapter == name for r in (*sched.waiting, *sched.running)):
            return False
        self.engine.pool.poll()
        if self.engine.adapter_state(name) == "loading":
            return False
        self.engine.unregister_adapter(name)
        return True

    async def drain(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.engine.has_unfinished() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def _deliver(self, out: RequestOutput) -> None:
        if self.on_output is not None:
            try:
                self.on_output(out)
            except Exception:  # (metrics, logs): they must not keep an output from its caller
                log.exception("the output callback failed for request %s", out.request_id)
        with self._lock:
            waiter = self._waiters.get(out.request_id)
            if waiter is not None and out.finished:
                del self._waiters[out.request_id]
        if waiter is not None and not waiter.aborted:
            waiter.loop.call_soon_threadsafe(waiter.queue.put_nowait, out)

    def _run(self) -> None:
        try:
            self.engine.warm_up()  # on this thread, which runs the steps; requests queue meanwhile
        except Exception as e:  # nothing can be served: /health and wait_ready say so, with why
            log.exception("engine warm-up failed: the engine does not serve")
            self.fault = f"warm-up failed: {type(e).__name__}: {e}"
            self._warm.set()
            self._commands.refuse_until(self._stop)
            return
        self._warm.set()
        try:
            self._serve()
        except BaseException as e:
            # The engine isolates one request's faults itself (Engine.step): what reaches here is the
            # engine's own, or the loop's (idle work, delivering outputs), so every request ends,
            # commands are refused and /health reports it from now on, rather than callers
            # waiting on a thread that cannot go on.
            log.exception("the engine failed: it stops serving")
            if self.fault is None:
                self.fault = f"{type(e).__name__}: {e}"
            try:
                for out in self.engine.fail_all(f"internal error: {self.fault}"):
                    self._deliver(out)
            except BaseException:
                log.exception("ending the requests in flight failed")
            self._commands.refuse_until(self._stop)

    def _serve(self) -> None:
        """The step loop: commands between steps, idle-time work, steps and their outputs."""
        outputs = [None]
        last_busy = time.monotonic()
        while not self._stop.is_set():
            self._beat = time.monotonic()
            # Requests that only wait (an adapter being read or copied) leave nothing to step: wait
            # a little for commands instead of spinning on a core the reads and copies need.
            busy = self.engine.has_unfinished()
            waiting_only = busy and not outputs and self.engine.scheduler.stalled()
            self._commands.run(block=not busy or waiting_only, timeout_s=0.002 if waiting_only else 0.05)
            if not self.engine.has_unfinished():
                # idle for a while: the moment a compile (engine.compile=auto) delays the least
                if time.monotonic() - last_busy >= IDLE_WORK_AFTER_S and self._commands.empty():
                    if self._heap is not None:
                        self._heap.idle()  # what the steps' tensors left goes back
                    if self.engine.graphs is not None and self.engine.graphs.pending:
                        self._idle_state = self.engine.snapshot()  # before the flag: `state` reads it then
                    self._idle_work.set()  # then _stop: a stop() that missed this flag is seen here
                    try:
                        if not self._stop.is_set() and self.engine.idle():
                            last_busy = time.monotonic()
                    finally:
                        self._beat = time.monotonic()  # (before the flag: the idle work was not a stall)
                        self._idle_work.clear()
                        self._idle_state = None  # of this idle moment only: later ones take their own
                continue
            last_busy = time.monotonic()
            if self._heap is not None:
                self._heap.stepped()
            outputs = self.engine.step()
            for out in outputs:
                self._deliver(out)
