"""Commands for the engine thread: functions other threads hand it, run between steps, each
answered through a future (its result, its exception, or a refusal once the engine has failed)."""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable


class EngineCommands:
    """A FIFO of (fn, args, future, skipped): `put` from any thread; `run` on the engine thread.
    `skipped` (or None) runs on the engine thread instead of fn when the future was cancelled
    before fn started, or when the command is refused."""

    def __init__(self, refusal: Callable[[], BaseException]):
        self._inbox: queue.Queue = queue.Queue()
        self._refusal = refusal  # the exception a refused command's future gets

    def put(self, fn, args, skipped=None) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put((fn, args, fut, skipped))
        return fut

    def empty(self) -> bool:
        return self._inbox.empty()

    def run(self, block: bool, timeout_s: float = 0.05) -> None:
        """Runs every queued command, waiting up to timeout_s for the first when `block`."""
        try:
            item = self._inbox.get(timeout=timeout_s) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            fn, args, fut, skipped = item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args))
                except BaseException as e:  # handed to the awaiting handler
                    fut.set_exception(e)
            elif skipped is not None:  # cancelled before it ran
                skipped()
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def refuse_until(self, stop: threading.Event) -> None:
        """After an engine fault, on the engine thread: commands fail instead of waiting forever,
        until `stop` is set."""
        while True:
            try:
                item = self._inbox.get(timeout=0.05)
            except queue.Empty:
                if stop.is_set():
                    return
                continue
            self._refuse(item)

    def refuse_queued(self) -> None:
        """Once the engine thread has ended (from any thread): fails what is queued."""
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            self._refuse(item)

    def _refuse(self, item) -> None:
        fn, args, fut, skipped = item
        if fut.set_running_or_notify_cancel():
            fut.set_exception(self._refusal())
        if skipped is not None:
            skipped()
