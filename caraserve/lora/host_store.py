"""The host tier: every registered adapter, its metadata always, its weights within a budget.

Registration reads only an adapter's config and safetensors header (`inspect_adapter`), so
registering thousands costs neither start-up time nor memory in proportion to their bytes. The
weights are read on first use: `get` on the calling thread, `fetch` on the store's own I/O threads
(so the engine's step never waits on a disk), with at most one read in flight per adapter. A read
that finds bad values (NaN/Inf) or files changed since registration marks the adapter broken: it
stays registered, so a request naming it gets a clear error, until it is unregistered; a read
that fails for a reason that may pass (an I/O error) fails only the requests waiting on it.

Weights beyond `budget_bytes` are dropped least-recently-used first and re-read on the next use,
so the catalogue can be far larger than host memory; the weights of a held adapter (requests
running on it or loading it) are never dropped. With CUDA present the weights are pinned, which
lets device copies run asynchronously. What one registration may cost is bounded: at most
`max_registered` adapters, files of at most `max_file_bytes`, read only from inside `roots`
(symlinks resolved).

The engine thread, the event loop and the I/O threads all call in: one lock guards the catalogue,
and it is never held during a disk read.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from caraserve.config import AdapterConfig, ConfigError
from caraserve.lora.adapter_files import AdapterReadError, RegistryFullError
from caraserve.lora.adapter_info import AdapterInfo, HostStoreStats, UnknownAdapterError, next_uid
from caraserve.lora.checkpoint import (
    AdapterError,
    LoraWeights,
    ReadLimits,
    changed_error,
    check_name,
    check_unchanged,
    inspect_adapter,
    load_adapter,
)
from caraserve.lora.host_memory import default_budget_bytes
from caraserve.lora.weight_cache import WeightCache

log = logging.getLogger(__name__)

__all__ = ["AdapterInfo", "HostStore", "HostStoreStats", "UnknownAdapterError", "default_budget_bytes"]


class _Entry:
    """One registered adapter; mutated only under the store's lock."""

    __slots__ = ("info", "weights", "from_memory", "holds", "reading", "broken", "digest")

    def __init__(self, info: AdapterInfo, from_memory: bool = False):
        self.info = info
        self.weights: LoraWeights | None = None  # in host memory now
        self.from_memory = from_memory  # added from memory: no file to re-read, never dropped
        self.holds = 0
        self.reading: Future | None = None  # the read in flight
        self.broken: str | None = None  # why its weights were refused
        self.digest: tuple | None = None  # content_digest of the weights first read: every read must match it


def check_adapter_dir(root: str | Path) -> Path:
    """adapters.dir as a Path, or a ConfigError unless it is a folder."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"adapters.dir: {root} " + ("is a file, not a folder" if root.exists() else "does not exist"))
    if (root / "adapter_config.json").is_file():  # one adapter's own folder: it would register none
        raise ConfigError(f"adapters.dir: {root} is an adapter's own folder (it holds adapter_config.json); give "
                          f"the folder that holds the adapters' folders, e.g. {root.parent}")
    return root


class HostStore:
    """Every registered adapter. budget_bytes: -1 = default_budget_bytes(), 0 = unbounded.
    roots: folders adapter files may resolve into (None: anywhere, for plain-Python use).
    max_rank: adapters of a larger rank are refused before their weights are stacked.
    io_threads: the threads `fetch` reads weights on (started on the first fetch; `close` ends them).
    on_read: if set, called with each weight read's seconds, from the thread that read."""

    def __init__(
        self, model_args, budget_bytes: int = 0, dtype: torch.dtype = torch.float32, pin: bool | None = None, *,
        max_registered: int = AdapterConfig.max_registered, max_file_bytes: int | None = AdapterConfig.max_file_bytes,
        roots: Iterable[str | Path] | None = None, max_rank: int | None = None, io_threads: int = 2,
    ):
        if io_threads < 1:
            raise ValueError(f"io_threads={io_threads} must be at least 1")
        self.model_args = model_args
        self.dtype = dtype
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.max_registered = max_registered
        resolved = None if roots is None else tuple(Path(r).expanduser().resolve() for r in roots)
        self.limits = ReadLimits(max_file_bytes, resolved, max_rank)
        self.io_threads = io_threads
        self.on_read: Callable[[float], None] | None = None
        self._entries: dict[str, _Entry] = {}
        self._sorted: list[str] = []  # registered names, kept sorted so that listing thousands is cheap
        self._cache = WeightCache(default_budget_bytes() if budget_bytes < 0 else budget_bytes)
        self._hits = self._misses = self._disk_reads = 0
        self._read_s = 0.0
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False
        self._lock = threading.Lock()

    @property
    def budget_bytes(self) -> int:
        return self._cache.budget_bytes

    # ---- the catalogue ------------------------------------------------------------------
    def register_dir(self, root: str | Path) -> tuple[list[str], dict[str, str]]:
        """Registers every adapter folder under root. Returns (registered, {name: error}); a broken
        adapter is reported and skipped, the others still register."""
        root = check_adapter_dir(root)
        ok, bad = [], {}
        full = 0
        # by name: the same order as by path (one parent), and far cheaper to sort thousands
        for folder in sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                             key=lambda p: p.name):
            if len(self._entries) >= self.max_registered:  # one log line for all of them, not one each
                bad[folder.name] = self._full_message(folder.name)
                full += 1
                continue
            try:
                # The operator's own folder: its symlinks are the operator's (e.g. into a Hugging
                # Face cache), so they are followed; runtime loads stay inside the roots.
                self.register(folder.name, folder, confined=False)
                ok.append(folder.name)
            except AdapterError as e:
                bad[folder.name] = str(e)
                log.error("%s", e)
            except Exception as e:  # one unreadable adapter must not stop the scan
                bad[folder.name] = f"adapter {folder.name!r}: cannot be read ({type(e).__name__}: {e})"
                log.error("%s", bad[folder.name])
        if full:
            log.error("%d adapters under %s refused: adapters.max_registered=%d are registered", full, root,
                      self.max_registered)
        return ok, bad

    def register(self, name: str, path: str | Path, confined: bool = True) -> AdapterInfo:
        """Validates one adapter from its config and safetensors header (no weights read) and
        registers it; on any error nothing changes. confined: its files must resolve inside the
        store's roots (False only for the operator's start-up folder)."""
        check_name(name)
        with self._lock:
            self._check_room(name)  # before the read: a full store costs no disk read
        meta = inspect_adapter(path, self.model_args, name, self._limits(confined))
        info = AdapterInfo(name, str(path), meta.rank, meta.scale, meta.targets, meta.nbytes(self.dtype), confined,
                           next_uid())
        with self._lock:
            self._check_room(name)  # again: others may have registered during the read
            self._insert(_Entry(info))
        # the start-up folder's thousands of adapters get one summary line (register_dir's caller)
        log.log(logging.INFO if confined else logging.DEBUG, "registered adapter %s (rank %d, %s)", name, info.rank,
                ",".join(info.targets))
        return info

    def add(self, weights: LoraWeights) -> AdapterInfo:
        """Registers weights made in memory (benchmarks, tests); kept regardless of the budget
        since there is no file to re-read them from."""
        check_name(weights.name)
        w = self._prepare(weights)
        info = AdapterInfo(w.name, w.path, w.rank, w.scale, w.targets, w.nbytes, uid=next_uid())
        with self._lock:
            self._check_room(w.name)
            entry = _Entry(info, from_memory=True)
            self._insert(entry)
            self._cache.put(entry, w)
        return info

    def unregister(self, name: str) -> None:
        """Forgets the adapter, broken or not; a read in flight still answers its waiters but
        caches nothing."""
        with self._lock:
            entry = self._entries.pop(name, None)
            if entry is None:
                raise UnknownAdapterError(f"adapter {name!r} is not registered")
            del self._sorted[bisect.bisect_left(self._sorted, name)]
            if entry.weights is not None:
                self._cache.drop(entry)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    closed = property(lambda self: self._closed, doc="closed: no more reads on its I/O threads")

    def names(self) -> list[str]:
        with self._lock:
            return list(self._sorted)

    def names_page(self, after: str | None, limit: int) -> tuple[list[str], bool]:
        """At most `limit` names sorted, those strictly after `after` (None: from the first), and
        whether more follow."""
        if limit < 0:
            raise ValueError(f"limit={limit} must not be negative")
        with self._lock:
            start = 0 if after is None else bisect.bisect_right(self._sorted, after)
            return self._sorted[start:start + limit], start + limit < len(self._sorted)

    def info(self, name: str) -> AdapterInfo:
        return self._entry(name).info

    def infos(self) -> list[AdapterInfo]:
        """Every registered adapter's info, sorted by name, as of one moment (names() then info()
        of each could meet a name unregistered in between)."""
        with self._lock:
            return [self._entries[name].info for name in self._sorted]

    # ---- the weights ----------------------------------------------------------------------
    def get(self, name: str) -> LoraWeights:
        """The adapter's weights, read from disk on this thread when not in memory (or waiting
        for the read already in flight). AdapterError when they are refused (see `broken`)."""
        with self._lock:
            entry = self._entry(name)
            if entry.broken is not None:
                raise AdapterError(entry.broken)
            if entry.weights is not None:
                self._hits += 1
                self._cache.touch(entry)
                return entry.weights
            future, mine = entry.reading, entry.reading is None
            if mine:
                self._misses += 1  # (a lookup that joins a read in flight is neither)
                future = entry.reading = _running()
        if mine:
            self._read(name, entry, future)
        return future.result()

    def fetch(self, name: str) -> Future:
        """A future of the adapter's weights: already done when they are in memory, else the read
        in flight or a new one on the store's I/O threads. Its exception is the AdapterError of
        refused weights. Waiters cannot cancel it (others may share it)."""
        with self._lock:
            entry = self._entry(name)
            if entry.broken is not None:
                return _failed(AdapterError(entry.broken))
            if entry.weights is not None:
                self._hits += 1
                self._cache.touch(entry)
                return _done(entry.weights)
            if entry.reading is not None:
                return entry.reading  # (joining a read in flight is neither a hit nor a miss)
            self._misses += 1
            if self._closed:
                raise RuntimeError("the host store is closed: no more reads on its I/O threads")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.io_threads, thread_name_prefix="adapter-io")
                weakref.finalize(self, self._pool.shutdown, wait=False)  # a store dropped without close()
            entry.reading = future = _running()
            self._pool.submit(self._read, name, entry, future)
            return future

    def ready(self, name: str) -> bool:
        """Its weights are in host memory now (False for unknown names); no I/O."""
        with self._lock:
            entry = self._entries.get(name)
            return entry is not None and entry.weights is not None

    def broken(self, name: str) -> str | None:
        """Why the adapter's weights were refused when read, else None (also for unknown names)."""
        with self._lock:
            entry = self._entries.get(name)
            return None if entry is None else entry.broken

    def hold(self, name: str, weights: LoraWeights | None = None) -> None:
        """One more user (a request running on it or loading it): the budget keeps its weights;
        `weights` (its read's, of this registration) are put back if the budget dropped them."""
        with self._lock:
            entry = self._entry(name)
            entry.holds += 1
            if entry.weights is None and weights is not None and weights.digest == entry.digest and not entry.broken:
                self._cache.put(entry, weights)
            self._cache.touch(entry)

    def release(self, name: str) -> None:
        """Ends one hold; then the budget may drop the weights. A no-op for a name unregistered meanwhile."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                return
            if entry.holds == 0:
                log.warning("adapter %s released more often than held", name)
                return
            entry.holds -= 1
            if entry.holds == 0:
                self._cache.trim()

    def stats(self) -> HostStoreStats:
        with self._lock:
            return HostStoreStats(len(self._entries), self._cache.count, self._cache.nbytes, self.budget_bytes,
                                  self._hits, self._misses, self._disk_reads, self._read_s)

    def close(self) -> None:
        """Ends the I/O threads after the reads already queued (their waiters get answers)."""
        with self._lock:
            self._closed = True
            pool = self._pool
        if pool is not None:
            pool.shutdown(wait=True)

    # ---- internals ------------------------------------------------------------------------
    def _limits(self, confined: bool) -> ReadLimits:
        return self.limits if confined else dataclasses.replace(self.limits, roots=None)

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownAdapterError(f"adapter {name!r} is not registered") from None

    def _insert(self, entry: _Entry) -> None:
        self._entries[entry.info.name] = entry
        bisect.insort(self._sorted, entry.info.name)

    def _check_room(self, name: str) -> None:
        """Refuses a taken name or a full store; call with the lock held."""
        if name in self._entries:
            raise AdapterError(f"adapter {name!r} is already registered (from {self._entries[name].info.path})")
        if len(self._entries) >= self.max_registered:
            raise RegistryFullError(self._full_message(name))

    def _full_message(self, name: str) -> str:
        return (f"adapter {name!r} refused: {len(self._entries)} adapters are registered, the cap "
                f"adapters.max_registered={self.max_registered}; unregister one or raise the cap")

    def _read(self, name: str, entry: _Entry, future: Future) -> None:
        """Reads the weights and answers `future`; runs on an I/O thread or get's caller, never
        under the lock."""
        start = time.perf_counter()
        weights, error = None, None
        try:
            info = entry.info
            w = load_adapter(info.path, self.model_args, name, self._limits(info.confined))
            check_unchanged(info, w, self.dtype)
            weights = self._prepare(w)
        except BaseException as e:  # the future must be answered, or its waiters hang
            error = e
        seconds = time.perf_counter() - start
        with self._lock:
            self._disk_reads += 1
            self._read_s += seconds
            entry.reading = None
            if self._entries.get(name) is entry:  # not unregistered meanwhile
                if weights is not None and entry.digest not in (None, weights.digest):
                    error, weights = changed_error(entry.info), None
                elif weights is not None:
                    entry.digest = weights.digest
                # other errors (memory, an I/O error that may pass, ...) are not the adapter's
                if isinstance(error, AdapterError) and not isinstance(error, AdapterReadError):
                    entry.broken = str(error)
                    log.error("%s; requests naming it are refused until it is unregistered", error)
                elif weights is not None and entry.weights is None:  # (a hold may have put a read's back)
                    self._cache.put(entry, weights)
        on_read = self.on_read
        if on_read is not None:
            try:
                on_read(seconds)
            except Exception:  # metrics must not fail a read
                log.exception("host store on_read callback failed")
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(weights)

    def _prepare(self, w: LoraWeights) -> LoraWeights:
        """In the serving dtype, pinned when CUDA is present (async device copies need it)."""

        def conv(t):
            t = t.to(self.dtype)
            return t.pin_memory() if self.pin else t

        a = {m: conv(t) for m, t in w.a.items()}
        b = {m: conv(t) for m, t in w.b.items()}
        return LoraWeights(w.name, w.path, w.rank, w.scale, a, b, w.digest)


def _running() -> Future:
    f: Future = Future()
    f.set_running_or_notify_cancel()  # a shared future: no waiter may cancel it for the others
    return f


def _done(w: LoraWeights) -> Future:
    f: Future = Future()
    f.set_result(w)
    return f


def _failed(e: BaseException) -> Future:
    f: Future = Future()
    f.set_exception(e)
    return f
