"""The serving process's memory: Python's garbage collector (freeze the start-up heap, time every
pause) and the C heap (give back what freed tensors left).

A full collection walks every tracked object; after start-up that is mostly the model, the
tokenizer and the libraries, none of which will ever be garbage, so a full pass over them cost
~0.3 s with the engine's requests waiting. `freeze_startup_heap` moves them to the permanent
generation (as vLLM and SGLang do), and `GcMonitor` reports the pauses that remain.

glibc's allocator keeps the memory of freed tensors in its arenas (prompts of new lengths leave
chunks no later allocation fits), so a server's resident memory climbs well past what it holds;
`trim_heap` hands the free pages back, which the engine thread does when the engine goes idle.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging
import time
import weakref

log = logging.getLogger(__name__)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (another C library, or none found)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def trim_heap() -> bool:
    """Returns the C heap's free pages to the system (glibc: malloc_trim); whether it could."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class HeapTrimmer:
    """When the engine thread trims the heap: at the first idle moment after steps ran, and every
    `busy_every_s` seconds of steps (a server that never idles). A trim costs tens of ms for
    hundreds of MB freed, so trimming often keeps each one small."""

    def __init__(self, busy_every_s: float = 10.0, clock=time.monotonic):
        self.busy_every_s, self._clock = busy_every_s, clock
        self._stepped_since: float | None = None  # first step since the last trim

    def stepped(self) -> None:
        now = self._clock()
        if self._stepped_since is None:
            self._stepped_since = now
        elif now - self._stepped_since >= self.busy_every_s:
            self._trim()

    def idle(self) -> None:
        if self._stepped_since is not None:
            self._trim()

    def _trim(self) -> None:
        trim_heap()
        self._stepped_since = None


def freeze_startup_heap() -> int:
    """Collects once, then exempts every object alive now from later collections; the number of
    objects frozen. The collection runs without gc.callbacks: a Ctrl-C that lands in a
    callback's Python code is swallowed there (the interpreter ignores what callbacks raise), and
    start-up went on as if it had not come."""
    callbacks = gc.callbacks[:]
    gc.callbacks.clear()
    try:
        gc.collect()
    finally:
        gc.callbacks.extend(callbacks)
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("garbage collector: %d start-up objects frozen", frozen)
    return frozen


class GcMonitor:
    """Calls observe(generation, seconds) after every collection, from the thread that collected.
    Registered in gc.callbacks through a weak reference, so a monitor that is dropped (or closed)
    leaves no callback behind: its finalizer takes the callback out, never the callback itself
    (a collection calls gc.callbacks by index, and one that removed itself would make it skip the
    next, another monitor's)."""

    def __init__(self, observe):
        self._observe = observe
        self._start: float | None = None
        ref = weakref.ref(self)

        def callback(phase: str, info: dict) -> None:
            monitor = ref()
            if monitor is not None:
                monitor._on(phase, info)

        self._callback = callback
        gc.callbacks.append(callback)
        weakref.finalize(self, _forget, callback)

    def _on(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            seconds, self._start = time.perf_counter() - self._start, None
            self._observe(info.get("generation", -1), seconds)

    def close(self) -> None:
        _forget(self._callback)


def _forget(callback) -> None:
    if callback in gc.callbacks:
        gc.callbacks.remove(callback)
