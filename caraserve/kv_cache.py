"""The KV cache: one preallocated [slots + 1, max_len, n_kv, head_dim] buffer pair per layer.

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
        # Slot 0 belongs to no request: padding rows of a compiled decode step write there. It
        # comes first so that slots [0, n] cover the scratch slot and the first n request slots.
        self.scratch_slot = 0
        shape = (num_slots + 1, max_seq_len, num_kv_heads, head_dim)
        # per layer: k, v [slots, max_len, n_kv, hd] on that layer's device
        self.layers = [
            (torch.zeros(shape, dtype=dtype, device=d), torch.zeros(shape, dtype=dtype, device=d))
            for d in layer_devices
        ]
        self._free = list(range(num_slots, 0, -1))  # lowest first, reused last-in first-out: slots stay dense

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise KVCacheFullError(f"all {self.num_slots} KV slots are in use")
        return self._free.pop()

    def free(self, slot: int) -> None:
        if not 1 <= slot <= self.num_slots or slot in self._free:
            raise ValueError(f"KV slot {slot} is not allocated")
        self._free.append(slot)

    @property
    def bytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.layers)
