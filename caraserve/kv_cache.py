"""The KV cache: one preallocated [slots, max_len, n_kv, head_dim] buffer pair per layer.

A request holds one slot for its lifetime; the buffers never move, so compiled steps and CUDA
graphs that captured their addresses stay valid.
"""

from __future__ import annotations

import torch


class KVCacheFullError(RuntimeError):
    """No free KV slot."""


class KVCache:
    def __init__(
        self,
        num_slots: int,
        max_seq_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        layer_devices: list[torch.device],
    ):
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len
        # One extra slot that no request owns: padding rows of a compiled decode step write there.
        self.scratch_slot = num_slots
        shape = (num_slots + 1, max_seq_len, num_kv_heads, head_dim)
        # per layer: k, v [slots, max_len, n_kv, hd] on that layer's device
        self.layers = [
            (torch.zeros(shape, dtype=dtype, device=d), torch.zeros(shape, dtype=dtype, device=d))
            for d in layer_devices
        ]
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise KVCacheFullError(f"all {self.num_slots} KV slots are in use")
        return self._free.pop()

    def free(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots or slot in self._free:
            raise ValueError(f"KV slot {slot} is not allocated")
        self._free.append(slot)

    @property
    def bytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.layers)
