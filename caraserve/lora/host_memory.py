"""How much host memory this process may use, as the host tier's default budget sees it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

_UNKNOWN_MEM_BYTES = 16 * 2**30  # what the budget assumes when neither sysconf nor cgroups tell


def default_budget_bytes(proc_cgroup: Path = Path("/proc/self/cgroup"),
                         cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """A quarter of the memory this process may use (usable_memory_bytes): the host tier must
    leave room for the model load, the KV cache and the process itself."""
    return max(usable_memory_bytes(proc_cgroup, cgroup_root) // 4, 1)


def usable_memory_bytes(proc_cgroup: Path = Path("/proc/self/cgroup"),
                        cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """The memory this process may use: in a container the cgroup's memory limit, not the
    machine's (a share of a large host can exceed a pod's whole limit)."""
    try:
        phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or the name is unknown
        phys = None
    known = [m for m in (phys, _cgroup_limit_bytes(proc_cgroup, cgroup_root)) if m and m > 0]
    if not known:
        log.warning("machine memory unknown: assuming %d bytes", _UNKNOWN_MEM_BYTES)
    return min(known or [_UNKNOWN_MEM_BYTES])


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
