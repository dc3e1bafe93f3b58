"""Seeded random adapters made in memory, for profiling sweeps and benchmarks."""

from __future__ import annotations

import torch

from caraserve.lora.checkpoint import LoraWeights


def random_lora(name: str, rank: int, model_args, targets: tuple[str, ...], seed: int,
                scale: float = 2.0) -> LoraWeights:
    """A LoraWeights of `rank` on `targets` for every layer, with nonzero A and B."""
    g = torch.Generator().manual_seed(seed)
    a, b = {}, {}
    for m in targets:
        fan_in, fan_out = model_args.module_shape(m)
        a[m] = torch.randn(model_args.num_layers, fan_in, rank, generator=g) / fan_in**0.5
        b[m] = torch.randn(model_args.num_layers, rank, fan_out, generator=g) * 0.01
    return LoraWeights(name, "", rank, scale, a, b)
