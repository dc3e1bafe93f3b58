"""The host tier's weights in memory: least-recently-used order within a byte budget, never
dropping a held adapter. Not thread-safe: HostStore calls it under its lock."""

from __future__ import annotations

import logging
from collections import OrderedDict

log = logging.getLogger(__name__)


class WeightCache:
    """Entries are HostStore's: `.info.name`, `.weights` (None when not in memory), `.holds`
    and `.from_memory` (added from memory: no file to re-read, so never dropped)."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes  # 0: unbounded
        self.count = 0  # entries with weights in memory
        self.nbytes = 0  # their bytes
        self._lru: OrderedDict[str, object] = OrderedDict()  # droppable entries in memory, oldest use first

    def put(self, entry, weights) -> None:
        """Keeps weights just read (or added) and trims the others to the budget; weights the
        entry already had are replaced, counted once."""
        if entry.weights is not None:
            self.count -= 1
            self.nbytes -= entry.weights.nbytes
        entry.weights = weights
        self.count += 1
        self.nbytes += weights.nbytes
        if not entry.from_memory:
            self._lru[entry.info.name] = entry
        self.trim(keep=entry.info.name)

    def touch(self, entry) -> None:
        if entry.info.name in self._lru:
            self._lru.move_to_end(entry.info.name)

    def drop(self, entry) -> None:
        self.count -= 1
        self.nbytes -= entry.weights.nbytes
        entry.weights = None
        self._lru.pop(entry.info.name, None)

    def trim(self, keep: str | None = None) -> None:
        """Drops least-recently-used weights until the budget holds, sparing held adapters and
        `keep` (just read: about to be used). When the rest is held the budget stays exceeded
        until a release trims again."""
        over = self.nbytes - self.budget_bytes
        if self.budget_bytes <= 0 or over <= 0:
            return
        victims = []
        for name, entry in self._lru.items():
            if name != keep and entry.holds == 0:
                victims.append(entry)
                over -= entry.weights.nbytes
                if over <= 0:
                    break
        for entry in victims:
            self.drop(entry)
            log.debug("host budget: dropped %s weights (re-read on next use)", entry.info.name)
        if over > 0:
            log.debug("host budget exceeded by %d bytes: the other cached adapters are held", over)
