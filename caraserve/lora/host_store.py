"""The host tier: every registered adapter, its metadata always, its weights within a budget.

Weights beyond `budget_bytes` are dropped least-recently-used first and re-read from disk on
the next use, so the catalogue can be far larger than host memory. With CUDA present the
weights are pinned, which lets device copies run asynchronously. What one registration may cost
is bounded: at most `max_registered` adapters, files of at most `max_file_bytes`, read only from
inside `roots` (symlinks resolved).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from caraserve.config import AdapterConfig
from caraserve.lora.checkpoint import AdapterError, LoraWeights, ReadLimits, check_name, load_adapter

log = logging.getLogger(__name__)


class UnknownAdapterError(KeyError):
    """No adapter of that name is registered."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: str
    rank: int
    scale: float
    targets: tuple[str, ...]
    nbytes: int
    confined: bool = True  # its files must resolve inside the store's roots (runtime loads)


_UNKNOWN_MEM_BYTES = 16 * 2**30  # what the budget assumes when neither sysconf nor cgroups tell


def default_budget_bytes(proc_cgroup: Path = Path("/proc/self/cgroup"),
                         cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """A quarter of the memory this process may use: the host tier must leave room for the model
    load, the KV cache and the process itself. In a container that is the cgroup's memory limit,
    not the machine's (a quarter of a large host can exceed a pod's whole limit)."""
    try:
        phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or the name is unknown
        phys = None
    known = [m for m in (phys, _cgroup_limit_bytes(proc_cgroup, cgroup_root)) if m and m > 0]
    if not known:
        log.warning("machine memory unknown: host adapter budget assumes %d bytes", _UNKNOWN_MEM_BYTES)
    return max(min(known or [_UNKNOWN_MEM_BYTES]) // 4, 1)


def _cgroup_limit_bytes(proc_cgroup: Path, cgroup_root: Path) -> int | None:
    """The tightest memory limit on this process's cgroup and its ancestors (v2 memory.max, v1
    memory.limit_in_bytes); None when there is none or it cannot be read."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, rel = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            base, file = cgroup_root, "memory.max"
        elif "memory" in controllers.split(","):
            base, file = cgroup_root / "memory", "memory.limit_in_bytes"
        else:
            continue
        here = base / rel.strip().lstrip("/")
        for folder in (here, *(p for p in here.parents if p == base or base in p.parents)):
            try:
                text = (folder / file).read_text().strip()
            except OSError:
                continue
            if text.isdigit() and int(text) < 2**60:  # "max" and v1's near-2**63 mean no limit
                limits.append(int(text))
    return min(limits) if limits else None


class HostStore:
    """Every registered adapter. budget_bytes: -1 = default_budget_bytes(), 0 = unbounded.
    roots: folders adapter files may resolve into (None: anywhere, for plain-Python use).
    max_rank: adapters of a larger rank are refused before their weights are stacked."""

    def __init__(
        self, model_args, budget_bytes: int = 0, dtype: torch.dtype = torch.float32, pin: bool | None = None, *,
        max_registered: int = AdapterConfig.max_registered, max_file_bytes: int | None = AdapterConfig.max_file_bytes,
        roots: Iterable[str | Path] | None = None, max_rank: int | None = None,
    ):
        self.model_args = model_args
        self.dtype = dtype
        self.budget_bytes = default_budget_bytes() if budget_bytes < 0 else budget_bytes
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.max_registered = max_registered
        resolved = None if roots is None else tuple(Path(r).expanduser().resolve() for r in roots)
        self.limits = ReadLimits(max_file_bytes, resolved, max_rank)
        self._info: dict[str, AdapterInfo] = {}
        self._weights: OrderedDict[str, LoraWeights] = OrderedDict()  # LRU order, oldest first
        self._pinned: dict[str, LoraWeights] = {}  # added from memory: never dropped
        self._lock = threading.Lock()
        self.disk_reads = 0

    def register_dir(self, root: str | Path) -> tuple[list[str], dict[str, str]]:
        """Registers every adapter folder under root. Returns (registered, {name: error}); a broken
        adapter is reported and skipped, the others still register."""
        root = Path(root)
        if not root.is_dir():
            raise AdapterError(f"adapter folder {root} does not exist")
        ok, bad = [], {}
        full = 0
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if len(self._info) >= self.max_registered:  # one log line for all of them, not one each
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
        """Validates and registers one adapter; on any error nothing changes. confined: its files
        must resolve inside the store's roots (False only for the operator's start-up folder)."""
        check_name(name)
        with self._lock:
            self._check_room(name)  # before the read: a full store costs no disk read
        weights = self._prepare(load_adapter(path, self.model_args, name, self._limits(confined)))
        info = AdapterInfo(name, str(path), weights.rank, weights.scale, weights.targets, weights.nbytes, confined)
        with self._lock:
            self._check_room(name)  # again: others may have registered during the read
            self._info[name] = info
            self._keep(weights)
        log.info("registered adapter %s (rank %d, %s)", name, info.rank, ",".join(info.targets))
        return info

    def _limits(self, confined: bool) -> ReadLimits:
        return self.limits if confined else dataclasses.replace(self.limits, roots=None)

    def add(self, weights: LoraWeights) -> AdapterInfo:
        """Registers weights made in memory (benchmarks, tests); kept regardless of the budget
        since there is no file to re-read them from."""
        check_name(weights.name)
        w = self._prepare(weights)
        info = AdapterInfo(w.name, w.path, w.rank, w.scale, w.targets, w.nbytes)
        with self._lock:
            self._check_room(w.name)
            self._info[w.name] = info
            self._pinned[w.name] = w
        return info

    def unregister(self, name: str) -> None:
        with self._lock:
            if name not in self._info:
                raise UnknownAdapterError(f"adapter {name!r} is not registered")
            del self._info[name]
            self._weights.pop(name, None)
            self._pinned.pop(name, None)

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._info)

    def info(self, name: str) -> AdapterInfo:
        try:
            return self._info[name]
        except KeyError:
            raise UnknownAdapterError(f"adapter {name!r} is not registered") from None

    def get(self, name: str) -> LoraWeights:
        """The adapter's weights, re-read from disk when the budget dropped them."""
        with self._lock:
            info = self.info(name)
            if name in self._pinned:
                return self._pinned[name]
            w = self._weights.get(name)
            if w is not None:
                self._weights.move_to_end(name)
                return w
        w = self._prepare(load_adapter(info.path, self.model_args, name, self._limits(info.confined)))
        with self._lock:
            self.disk_reads += 1
            if name in self._info:
                self._keep(w)
        return w

    def resident_bytes(self) -> int:
        with self._lock:
            return sum(w.nbytes for w in self._weights.values())

    def _check_room(self, name: str) -> None:
        """Refuses a taken name or a full store; call with the lock held."""
        if name in self._info:
            raise AdapterError(f"adapter {name!r} is already registered (from {self._info[name].path})")
        if len(self._info) >= self.max_registered:
            raise AdapterError(self._full_message(name))

    def _full_message(self, name: str) -> str:
        return (f"adapter {name!r} refused: {len(self._info)} adapters are registered, the cap "
                f"adapters.max_registered={self.max_registered}; unregister one or raise the cap")

    def _prepare(self, w: LoraWeights) -> LoraWeights:
        """In the serving dtype, pinned when CUDA is present (async device copies need it)."""

        def conv(t):
            t = t.to(self.dtype)
            return t.pin_memory() if self.pin else t

        a = {m: conv(t) for m, t in w.a.items()}
        b = {m: conv(t) for m, t in w.b.items()}
        return LoraWeights(w.name, w.path, w.rank, w.scale, a, b)

    def _keep(self, w: LoraWeights) -> None:
        self._weights[w.name] = w
        self._weights.move_to_end(w.name)
        if self.budget_bytes <= 0:
            return
        total = sum(x.nbytes for x in self._weights.values())
        while total > self.budget_bytes and len(self._weights) > 1:
            _, dropped = self._weights.popitem(last=False)
            total -= dropped.nbytes
            log.debug("host budget: dropped %s weights (re-read on next use)", dropped.name)
