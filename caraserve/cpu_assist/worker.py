"""What a CPU worker thread runs: one slice of a request's LoRA delta from the host weights."""

from __future__ import annotations

import functools
import os

import torch

from caraserve.kernel_library import cpu_flags


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
    """scale * (x @ A) @ B on the CPU, in A's dtype (into pinned memory when CUDA is present);
    bfloat16 weights are multiplied in float32 where the CPU has no bfloat16 instructions."""
    if ready is not None:
        ready.synchronize()  # waits in this worker thread, never in the launching one
    out = torch.empty(x.shape[0], b.shape[1], dtype=a.dtype, pin_memory=ready is not None)
    if a.dtype == torch.bfloat16 and not native_bf16():
        out.copy_((x.float() @ a.float()) @ b.float())
    else:
        torch.matmul(x.to(a.dtype) @ a, b, out=out)
    return out.mul_(scale)


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX-512 BF16 or AMX): oneDNN's bfloat16
    products then run several times faster than float32 ones; without, it emulates them, 2.5-3.5x
    slower than float32."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_flags().split()))
