"""The paged KV cache: per layer one preallocated [blocks + 1, block_size, n_kv, head_dim] buffer
pair, handed out to requests a block at a time as their tokens arrive.

A request's block table lists its blocks in position order: position p lives in block
table[p // block_size] at offset p % block_size. Blocks are freed when the request finishes or
is preempted. The buffers never move, so compiled steps and CUDA graphs that captured their
addresses stay valid. Block 0 belongs to no request: padding rows of a compiled step write
there, and unused table entries point at it.
"""

from __future__ import annotations

import torch

SCRATCH_BLOCK = 0


class KVCacheFullError(RuntimeError):
    """Not enough free KV blocks."""


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks that hold `tokens` positions."""
    return -(-tokens // block_size)


def block_bytes(block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, num_layers: int) -> int:
    """Bytes one block takes over all layers, keys and values."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class KVCache:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        layer_devices: list[torch.device],
    ):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV cache needs at least one block of at least one token, got {num_blocks} "
                             f"blocks of {block_size}")
        self.num_blocks = num_blocks  # blocks requests can hold (the scratch block is not one of them)
        self.block_size = block_size
        shape = (num_blocks + 1, block_size, num_kv_heads, head_dim)
        # per layer: k, v [blocks + 1, block_size, n_kv, hd] on that layer's device
        self.layers = [
            (torch.zeros(shape, dtype=dtype, device=d), torch.zeros(shape, dtype=dtype, device=d))
            for d in layer_devices
        ]
        self._free = list(range(num_blocks, 0, -1))  # lowest first, reused last-in first-out

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def capacity_tokens(self) -> int:
        """The most tokens one request can hold (every block)."""
        return self.num_blocks * self.block_size

    def blocks_needed(self, table: list[int], tokens: int) -> int:
        """Blocks a sequence holding `table` must add to hold `tokens` positions."""
        return max(blocks_for(tokens, self.block_size) - len(table), 0)

    def grow(self, table: list[int], tokens: int) -> bool:
        """Appends blocks to `table` until it holds `tokens` positions; False (nothing taken)
        when not enough are free."""
        need = self.blocks_needed(table, tokens)
        if need > len(self._free):
            return False
        for _ in range(need):
            table.append(self._free.pop())
        return True

    def free(self, table: list[int]) -> None:
        """Returns every block of `table` to the pool and empties it."""
        for block in table:
            if not 1 <= block <= self.num_blocks:
                raise ValueError(f"KV block {block} is not a block of this cache")
        if len(set(table)) != len(table) or set(table) & set(self._free):
            raise ValueError("KV blocks freed twice")
        self._free.extend(reversed(table))
        table.clear()

    @property
    def bytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.layers)
