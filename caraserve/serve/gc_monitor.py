"""Python's garbage collector in a serving process: freeze the start-up heap, time every pause.

A full collection walks every tracked object; after start-up that is mostly the model, the
tokenizer and the libraries, none of which will ever be garbage, so a full pass over them cost
~0.3 s with the engine's requests waiting. `freeze_startup_heap` moves them to the permanent
generation (as vLLM and SGLang do), and `GcMonitor` reports the pauses that remain.
"""

from __future__ import annotations

import gc
import logging
import time
import weakref

log = logging.getLogger(__name__)


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
    leaves no callback behind."""

    def __init__(self, observe):
        self._observe = observe
        self._start: float | None = None
        ref = weakref.ref(self)

        def callback(phase: str, info: dict) -> None:
            monitor = ref()
            if monitor is None:
                gc.callbacks.remove(callback)
                return
            monitor._on(phase, info)

        self._callback = callback
        gc.callbacks.append(callback)

    def _on(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            seconds, self._start = time.perf_counter() - self._start, None
            self._observe(info.get("generation", -1), seconds)

    def close(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)
