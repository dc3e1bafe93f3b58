"""Launch-size helpers the Triton LoRA kernels (`triton_ops`, `triton_multi`) share."""

from __future__ import annotations

import triton

# Elements of a BGMV program's weight tile (BLOCK_K x BLOCK_R or BLOCK_R x BLOCK_N): the rank
# sets one side, this bound the other, so the tile stays in registers.
BGMV_TILE = 8192


def np2(n: int, lo: int = 1) -> int:
    """The next power of two >= n, at least lo."""
    return max(lo, triton.next_power_of_2(n))


def auto_split_k(n_rows: int, n_in: int) -> int:
    """Splits the IN reduction when few rows would leave the GPU idle; 1 (deterministic) otherwise."""
    if n_rows >= 64 or n_in < 2048:
        return 1
    return min(8, n_in // 1024)
