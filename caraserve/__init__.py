"""CaraServe: a multi-LoRA serving engine. `from caraserve import Engine, EngineConfig,
SamplingParams` (and `StructuredOutputs`) for the Python API (as vLLM's `from vllm import LLM,
SamplingParams`); they are imported on first use, so `import caraserve` alone loads no torch."""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("caraserve")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

_EXPORTS = {"Engine": "caraserve.engine", "EngineConfig": "caraserve.config", "SamplingParams": "caraserve.request",
            "StructuredOutputs": "caraserve.structured_output"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'caraserve' has no attribute {name!r}")
