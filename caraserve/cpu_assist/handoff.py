"""Sync-free hand-off of LoRA work between the device and CPU workers.

At every adapted projection of a prefill, the rows of requests whose adapter is still on its way
to the device get their delta scale * (x A) B from the host copy of the adapter, until the layer
they are at has landed in the adapter's device slot:

    launching thread          device stream                 CPU worker(s)
    ----------------          -------------                 -------------
    at layer l, per loading adapter: has the copy group holding layer l landed? (event query,
    never a wait; asked once per layer, and the copy stream lands groups in layer order)
      yes: its rows join the device LoRA groups of this layer, read from its slot
      no:  its rows take the CPU path below
    submit(x rows)  -------->  copy rows -> pinned host
                               record event E  ..........>  wait E (worker thread, not the
    launch base GEMM  ------>  y = x W^T                    launching one), compute the delta
    ... (other groups) ----->  device LoRA kernels          into pinned memory
    add(y, pending): wait the worker's result (host-side, CPU work only), then
                     enqueue copy delta -> device and y[rows] += delta on the same stream

The launching thread never synchronizes the device: it only queries copy events and waits for
CPU work, while the base GEMM and the device LoRA kernels already queued keep the device busy.
Stream order makes the rows visible to the worker once E has completed, and makes the add run
after its upload. A copy group whose event has completed needs no stream wait before the device
kernels read it: everything launched afterwards sees the finished copy. So a cold request's
prefill moves to the device layer by layer as its adapter lands (early layers on the device,
later ones on the CPU while the copy is still behind), and is exact on either path.

Requests on the CPU path at the same time get disjoint workers, each pinned to its own core,
as many as the thread plan gives them while cores last (`assign_cores`); past that they share.
On a CPU-only machine the "device" is the CPU: rows are read in place (no copy, no event) and
the worker threads run beside the thread that runs the base GEMM.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from caraserve.cpu_assist.thread_plan import ThreadPlan, assign_cores
from caraserve.cpu_assist.worker import lora_delta, pin_worker

if TYPE_CHECKING:
    from caraserve.lora.batch import Landing
    from caraserve.lora.checkpoint import LoraWeights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostSegment:
    """Rows [start, start + count) use the adapter's host `weights` through the CPU path, except at
    the layers where `landing` (None: at none) finds the adapter's slot landed."""

    start: int
    count: int
    weights: LoraWeights
    landing: Landing | None = None


@dataclass
class Pending:
    start: int
    parts: list  # (row offset, Future of the delta rows) per slice


class Handoff:
    def __init__(self, plan: ThreadPlan):
        self.plan = plan
        workers = max(1, plan.max_threads)
        cores = list(plan.cores)
        cores = cores[-workers:] if len(cores) > workers else cores  # the first ones run the device side
        # One single-thread lane per worker, pinned to one core: requests given disjoint lanes
        # never queue behind each other.
        self._lanes = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"caraserve-cpu-lora-{i}", initializer=pin_worker,
                               initargs=([cores[i % len(cores)]] if cores else [],))
            for i in range(workers)
        ]
        self._shared_logged = False

    def submit(self, x: torch.Tensor, layer: int, module: str, segments: tuple[HostSegment, ...]) -> list[Pending]:
        """Starts the CPU deltas of every segment whose adapter targets `module`."""
        work = [seg for seg in segments if module in seg.weights.a]
        wants = [self.plan.threads_for(seg.count, seg.weights.a[module].shape[-1]) for seg in work]
        if sum(wants) > len(self._lanes) and not self._shared_logged:
            log.info("%d CPU-assisted requests want %d CPU workers, %d exist: they share workers "
                     "(logged once)", len(work), sum(wants), len(self._lanes))
            self._shared_logged = True
        pending = []
        for seg, lanes in zip(work, assign_cores(wants, range(len(self._lanes)))):
            w = seg.weights
            rows = x[seg.start : seg.start + seg.count]
            event = None
            if rows.is_cuda:
                host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
                host.copy_(rows, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                rows = host
            a, b = w.a[module][layer], w.b[module][layer]
            step = -(-seg.count // len(lanes))
            parts = []
            for lane, off in zip(lanes, range(0, seg.count, step)):
                fut: Future = self._lanes[lane].submit(lora_delta, rows[off : off + step], a, b, w.scale, event)
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
        for lane in self._lanes:
            lane.shutdown(wait=False, cancel_futures=True)


def handoff_for(ca, plan: ThreadPlan | None, model_args, emulate_copy_gbps: float = 0.0):
    """(Handoff, admission predicate(request, host weights, prefill tokens to compute) -> bool) for the engine's
    cpu_assist settings (CpuAssistConfig) and its thread plan; (None, None) when the mode is off. The predicate of
    "auto": the CPU path wins when its LoRA work ends before the adapter copy would, at the copy
    rate the device pool emulates (`emulate_copy_gbps`: the pool's, 0 on CUDA, which copies for
    real), else the plan's measured one."""
    if ca.mode == "off":
        return None, None
    if ca.mode == "on":
        return Handoff(plan), lambda req, weights, tokens: True

    def pays(req, weights, tokens: int) -> bool:
        flops = sum(2 * model_args.num_layers * a.shape[-1] * sum(model_args.module_shape(m))
                    for m, a in weights.a.items())
        cpu_s = plan.cpu_lora_seconds(tokens, flops, weights.rank)
        return cpu_s < plan.copy_seconds(weights.nbytes, emulate_copy_gbps)

    return Handoff(plan), pays
