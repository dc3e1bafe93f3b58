"""The Triton kernel modules for the tests: interpreted on CPU, compiled on CUDA.

Without a GPU the kernels run in the Triton interpreter. The switch is read when `@triton.jit`
decorates, so it is set before triton is first imported, and a kernel module imported earlier
(decorated before the switch was set) is imported again. On a CUDA machine the same tests check
the compiled kernels on the GPU.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def kernel_modules(*names: str) -> list:
    """The modules `names`, their kernels interpreted on CPU; skips the calling test module when
    triton cannot be imported."""
    if DEVICE == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the environment
        pytest.skip(f"triton cannot be imported ({exc!r}); the Triton kernels are untestable here",
                    allow_module_level=True)
    preloaded = {n for n in names if n in sys.modules}
    mods = [importlib.import_module(n) for n in names]
    if DEVICE == "cpu":
        mods = [importlib.reload(m) if m.__name__ in preloaded else m for m in mods]
    return mods
