"""What the host tier tells about its adapters: each one's metadata (AdapterInfo), the tier's
counters (HostStoreStats), and the error for a name it does not know."""

from __future__ import annotations

import itertools
from dataclasses import dataclass


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
    uid: int = 0  # this registration's number: a reload under the same name gets a new one (prefix caching)


_uids = itertools.count(1)  # registration numbers, unique in the process


def next_uid() -> int:
    """A new registration number (AdapterInfo.uid)."""
    return next(_uids)


@dataclass(frozen=True)
class HostStoreStats:
    """A snapshot of the host tier, for metrics."""

    registered: int
    cached: int  # adapters whose weights are in host memory
    cached_bytes: int  # their bytes (adapters added from memory included)
    budget_bytes: int  # 0: unbounded
    hits: int  # get / fetch calls answered from memory
    misses: int  # get / fetch calls that started a disk read (those joining one in flight count in neither)
    disk_reads: int  # weight reads done, failed ones included
    read_seconds_total: float  # time those reads took
