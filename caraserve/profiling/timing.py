"""Timing for the benchmarks: the median time of a call, with caches warm or cold, the
device's copy bandwidth (the memory floor the benchmarks hold kernels against), percentiles of
a run's latencies and the CPU time other processes took during it."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def median_us(fn: Callable[[], object], iters: int, sync: Callable[[], None] = lambda: None,
              before: Callable[[], None] | None = None) -> float:
    """Median microseconds of `iters` calls of fn after one untimed call; `before` (untimed) runs
    ahead of every call, e.g. a `CacheFlush`, so each call starts with what it reads in memory."""
    fn()
    sync()
    times = []
    for _ in range(iters):
        if before is not None:
            before()
            sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def last_level_cache_bytes(default: int = 32 << 20, root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """The largest CPU cache's size as sysfs reports it under `root` (default when it does not)."""
    sizes = []
    for f in root.glob("index*/size"):
        text = f.read_text().strip().upper()
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * unit)
        except ValueError:
            continue
    return max(sizes, default=default)


class CacheFlush:
    """Called, reads a CPU buffer twice the size of the last-level cache: whatever a kernel read
    before is then in memory again, as in an engine step, where a layer's weights and KV are
    evicted by the other layers' before the next step reads them. (It reads rather than writes:
    written lines would cost the timed call their write-back.)"""

    def __init__(self, nbytes: int | None = None):
        self.buffer = torch.ones((nbytes or 2 * last_level_cache_bytes()) // 4, dtype=torch.float32)

    def __call__(self) -> None:
        self.buffer.sum()


def copy_bandwidth_gbs(device: torch.device) -> float:
    """GB/s of a large device-to-same-device copy, bytes read plus bytes written."""
    n = (1 << 30) if device.type == "cuda" else (1 << 27)
    src = torch.ones(n, dtype=torch.uint8, device=device)  # written: untouched CPU pages all read one zero page
    dst = torch.zeros_like(src)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return 2 * n / (median_us(lambda: dst.copy_(src), 10, sync) * 1e-6) / 1e9


def pct(xs, q: float):
    """The q-th percentile of xs by nearest rank (one of its values, no interpolation)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def busy_cpu_s() -> float | None:
    """Seconds of CPU time every process on the machine has used (Linux /proc/stat), or None."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    except (OSError, ValueError):
        return None
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def own_cpu_s() -> float:
    """Seconds of CPU time this process has used."""
    t = os.times()
    return t.user + t.system
