"""Sync-free hand-off of LoRA work between the device and CPU workers.

At every adapted projection of a prefill, the rows of requests whose adapter is still on its way
to the device get their delta scale * (x A) B from the host copy of the adapter:

    launching thread          device stream                 CPU worker(s)
    ----------------          -------------                 -------------
    submit(x rows)  -------->  copy rows -> pinned host
                               record event E  ..........>  wait E (worker thread, not the
    launch base GEMM  ------>  y = x W^T                    launching one), compute the delta
    ... (other groups) ----->  device LoRA kernels          into pinned memory
    add(y, pending): wait the worker's result (host-side, CPU work only), then
                     enqueue copy delta -> device and y[rows] += delta on the same stream

The launching thread never synchronizes the device: it only waits for CPU work, while the base
GEMM and the device LoRA kernels already queued keep the device busy. Stream order makes the
rows visible to the worker once E has completed, and makes the add run after its upload.
On a CPU-only machine the "device" is the CPU: rows are read in place (no copy, no event) and
the worker threads run beside the thread that runs the base GEMM.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from caraserve.cpu_assist.thread_plan import ThreadPlan
from caraserve.cpu_assist.worker import lora_delta, pin_worker


@dataclass(frozen=True)
class HostSegment:
    """Rows [start, start + count) use `weights` (a host LoraWeights) through the CPU path."""

    start: int
    count: int
    weights: object


@dataclass
class Pending:
    start: int
    parts: list  # (row offset, Future of the delta rows) per slice


class Handoff:
    def __init__(self, plan: ThreadPlan):
        self.plan = plan
        cores = list(plan.cores)
        workers = max(1, plan.max_threads)
        self._pool = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="caraserve-cpu-lora",
            initializer=pin_worker, initargs=(cores[-workers:] if len(cores) > workers else cores,),
        )

    def submit(self, x: torch.Tensor, layer: int, module: str, segments: tuple[HostSegment, ...]) -> list[Pending]:
        """Starts the CPU deltas of every segment whose adapter targets `module`."""
        pending = []
        for seg in segments:
            w = seg.weights
            if module not in w.a:
                continue
            rows = x[seg.start : seg.start + seg.count]
            event = None
            if rows.is_cuda:
                host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
                host.copy_(rows, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                rows = host
            a, b = w.a[module][layer], w.b[module][layer]
            parts = []
            n = seg.count
            k = self.plan.threads_for(n, a.shape[-1])
            step = -(-n // k)
            for off in range(0, n, step):
                fut: Future = self._pool.submit(lora_delta, rows[off : off + step], a, b, w.scale, event)
                parts.append((off, fut))
            pending.append(Pending(seg.start, parts))
        return pending

    @staticmethod
    def add(y: torch.Tensor, pending: list[Pending]) -> None:
        """y[rows] += each delta (waits for the CPU work, never for the device)."""
        for p in pending:
            for off, fut in p.parts:
                delta = fut.result()
                start = p.start + off
                y[start : start + delta.shape[0]] += delta.to(y.device, non_blocking=True).to(y.dtype)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
