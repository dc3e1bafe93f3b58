"""What a CPU worker thread runs: one slice of a request's LoRA delta from the host weights."""

from __future__ import annotations

import os

import torch


def pin_worker(cores: list[int]) -> None:
    """Pins the calling worker thread to `cores` (Linux; elsewhere a no-op)."""
    if cores and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, cores)  # pid 0 = the calling thread
        except OSError:
            pass


def lora_delta(
    x: torch.Tensor,  # [n, in] host rows (pinned when they came from a CUDA device)
    a: torch.Tensor,  # [in, r] host adapter A of this layer and module
    b: torch.Tensor,  # [r, out]
    scale: float,
    ready=None,  # torch.cuda.Event after which x holds the rows, or None
) -> torch.Tensor:
    """scale * (x @ A) @ B on the CPU, in A's dtype, into pinned memory when CUDA is present."""
    if ready is not None:
        ready.synchronize()  # waits in this worker thread, never in the launching one
    x = x.to(a.dtype)
    out = torch.empty(x.shape[0], b.shape[1], dtype=a.dtype, pin_memory=ready is not None)
    torch.matmul(x @ a, b, out=out)
    return out.mul_(scale)
