"""The paged KV cache: per layer one preallocated [blocks + 1, block_size, n_kv, head_dim] buffer
pair, handed out to requests a block at a time as their tokens arrive.

A request's block table lists its blocks in position order: position p lives in block
table[p // block_size] at offset p % block_size. Blocks are freed when the request finishes or
is preempted. The buffers never move, so compiled steps and CUDA graphs that captured their
addresses stay valid. Block 0 belongs to no request: padding rows of a compiled step write
there, and unused table entries point at it.

Prefix caching: a full block can be published under the hash of (the adapter's identity, its
tokens, and every token before it) (`block_hashes`). A request whose prompt starts with
published blocks shares them (reference counts) and computes only the rest. A published block
nobody holds stays cached until its memory is needed: empty blocks are taken first, then the
least recently released cached ones.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, OrderedDict

import torch

from caraserve.config_checks import ConfigError

log = logging.getLogger(__name__)


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks that hold `tokens` positions."""
    return -(-tokens // block_size)


def block_hashes(prev: list[bytes], tokens: list[int], block_size: int, adapter_key: str) -> list[bytes]:
    """`prev` (the hashes of the first len(prev) full blocks of `tokens`) extended to every full
    block of `tokens`. Block i's hash covers the adapter's identity (a new one for every load of
    an adapter; "" for the base model), its tokens and, through block i-1's hash, all before it."""
    out = list(prev)
    for i in range(len(out), len(tokens) // block_size):
        h = hashlib.sha256(out[-1] if out else b"adapter:" + adapter_key.encode())
        h.update(b"".join(t.to_bytes(8, "little", signed=True) for t in tokens[i * block_size : (i + 1) * block_size]))
        out.append(h.digest()[:16])
    return out


def block_bytes(block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, num_layers: int) -> int:
    """Bytes one block takes over all layers, keys and values."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def plan_blocks(cfg, args, dtype: torch.dtype, device: torch.device, max_seq_len: int) -> int:
    """KV blocks per engine.num_kv_blocks, else engine.kv_cache_bytes, else the device's default
    (CUDA: gpu_memory_utilization of the device's memory less what is in use on it, so call it
    after the model and the adapter pools are allocated; CPU: the memory max_batch_size requests
    of max_seq_len tokens take). cfg: the EngineConfig; args: the model's ModelArgs."""

    per_block = block_bytes(cfg.kv_block_size, args.num_kv_heads, args.head_dim, dtype, args.num_layers)
    if cfg.num_kv_blocks:
        return cfg.num_kv_blocks
    budget = cfg.kv_cache_bytes
    if not budget and device.type == "cuda":
        # vLLM's rule: this engine may use that fraction of the device's memory, less what is in
        # use there already (its model and adapter pools, and anything else on the device)
        free, total = torch.cuda.mem_get_info(device)
        budget = int(total * cfg.gpu_memory_utilization) - (total - free)
    if not budget:
        budget = cfg.max_batch_size * blocks_for(max_seq_len, cfg.kv_block_size) * per_block
    blocks = budget // per_block
    if blocks < 1:
        raise ConfigError(f"the KV cache budget ({budget} bytes) holds no block of {cfg.kv_block_size} tokens "
                          f"({per_block} bytes): raise engine.kv_cache_bytes or engine.gpu_memory_utilization, "
                          "or set engine.num_kv_blocks")
    return int(blocks)


def context_limit(kv: KVCache, max_seq_len: int) -> tuple[int, str]:
    """(the most tokens one request may hold, what limits it when that is not max_seq_len: "").
    A request longer than the cache could never run, so a cache holding fewer tokens than
    max_seq_len makes its capacity the limit (a warning says so): clients read it as
    max_model_len and size their defaults by it."""
    if kv.capacity_tokens >= max_seq_len:
        return max_seq_len, ""
    log.warning("the KV cache holds %d tokens (%d blocks of %d), fewer than engine.max_seq_len=%d: a request's "
                "prompt + output tokens are limited to %d (more blocks: engine.num_kv_blocks, engine.kv_cache_bytes "
                "or engine.gpu_memory_utilization)", kv.capacity_tokens, kv.num_blocks, kv.block_size, max_seq_len,
                kv.capacity_tokens)
    return kv.capacity_tokens, f" (all the KV cache holds: {kv.num_blocks} blocks of {kv.block_size} tokens)"


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
        try:
            self.layers = [
                (torch.zeros(shape, dtype=dtype, device=d), torch.zeros(shape, dtype=dtype, device=d))
                for d in layer_devices
            ]
        except (RuntimeError, MemoryError) as e:  # (torch.OutOfMemoryError is a RuntimeError)
            size = 2 * len(layer_devices) * torch.Size(shape).numel() * dtype.itemsize
            raise ConfigError(f"the KV cache ({num_blocks} blocks of {block_size} tokens: {size / 2**30:.1f} GiB) "
                              "cannot be allocated: lower engine.num_kv_blocks, engine.kv_cache_bytes or "
                              "engine.max_batch_size") from e
        self._free = list(range(num_blocks, 0, -1))  # blocks holding nothing, lowest first, reused LIFO
        self._refs = [0] * (num_blocks + 1)  # requests holding each block
        self._hash_of: dict[int, bytes] = {}  # published block -> its hash
        self._cached: dict[bytes, int] = {}  # hash -> its published block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # published blocks nobody holds, LRU first
        self.query_tokens = 0  # prompt tokens looked up in the prefix cache
        self.hit_tokens = 0  # of those, found cached

    def count_query(self, tokens: int, hit_blocks: int) -> None:
        """A prefix-cache lookup of a prompt's `tokens`, `hit_blocks` whole blocks of them found."""
        self.query_tokens += tokens
        self.hit_tokens += hit_blocks * self.block_size

    @property
    def free_blocks(self) -> int:
        """Blocks a request can take: the empty ones and the cached ones nobody holds."""
        return len(self._free) + len(self._evictable)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.free_blocks

    @property
    def cached_blocks(self) -> int:
        """Published blocks, held or not."""
        return len(self._cached)

    @property
    def capacity_tokens(self) -> int:
        """The most tokens one request can hold (every block)."""
        return self.num_blocks * self.block_size

    def blocks_needed(self, table: list[int], tokens: int) -> int:
        """Blocks a sequence holding `table` must add to hold `tokens` positions."""
        return max(blocks_for(tokens, self.block_size) - len(table), 0)

    def _take(self) -> int:
        if self._free:
            block = self._free.pop()
        else:  # the least recently released cached block: its content is forgotten
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._hash_of.pop(block)]
        self._refs[block] = 1
        return block

    def grow(self, table: list[int], tokens: int) -> bool:
        """Appends blocks to `table` until it holds `tokens` positions; False (nothing taken)
        when not enough are free."""
        need = self.blocks_needed(table, tokens)
        if need > self.free_blocks:
            return False
        for _ in range(need):
            table.append(self._take())
        return True

    def free(self, table: list[int]) -> None:
        """Releases every block of `table` and empties it: a block nobody holds any more becomes
        empty, or, if published, stays cached until its memory is needed."""
        for block in table:
            if not 1 <= block <= self.num_blocks:
                raise ValueError(f"KV block {block} is not a block of this cache")
        if len(set(table)) != len(table) or any(self._refs[b] < 1 for b in table):
            raise ValueError("KV blocks freed twice")
        for block in reversed(table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None  # most recently released last
                else:
                    self._free.append(block)
        table.clear()

    def match(self, hashes: list[bytes]) -> list[int]:
        """The published blocks of the longest prefix of `hashes` (taking nothing)."""
        blocks = []
        for h in hashes:
            block = self._cached.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def evictable_among(self, blocks: list[int]) -> int:
        """How many of `blocks` nobody holds (sharing them takes them from the free count)."""
        return sum(1 for b in blocks if self._refs[b] == 0)

    def held_only_by(self, tables: list[list[int]]) -> set[int]:
        """The blocks that freeing all of `tables` would release (no other table holds them)."""
        holders = Counter(b for table in tables for b in table)
        return {b for b, n in holders.items() if self._refs[b] == n}

    def share(self, table: list[int], blocks: list[int]) -> None:
        """Puts published `blocks` (from `match`) at the start of an empty `table`, holding them."""
        if table:
            raise ValueError("shared prefix blocks go first, into an empty block table")
        for block in blocks:
            if block not in self._hash_of:
                raise ValueError(f"KV block {block} is not published")
            self._refs[block] += 1
            self._evictable.pop(block, None)
            table.append(block)

    def publish(self, block: int, h: bytes) -> None:
        """Makes a full block a request holds findable under hash `h` (unless another block
        already is: then this one stays private and is freed as usual)."""
        if self._refs[block] < 1:
            raise ValueError(f"KV block {block} is not held")
        if h not in self._cached and block not in self._hash_of:
            self._cached[h] = block
            self._hash_of[block] = h

    def unpublish(self, blocks: list[int]) -> None:
        """Makes `blocks` unfindable (their KV may be wrong: a request that filled or read them
        failed); whoever holds them keeps them, and a block nobody holds becomes empty."""
        for block in blocks:
            h = self._hash_of.pop(block, None)
            if h is None:
                continue
            del self._cached[h]
            if block in self._evictable:
                del self._evictable[block]
                self._free.append(block)

    def reset_prefix_cache(self) -> int:
        """Forgets every cached block nobody holds (they become empty); blocks requests hold keep
        theirs. How many were forgotten (vLLM's reset_prefix_cache: benchmarks start cold)."""
        for block in self._evictable:
            del self._cached[self._hash_of.pop(block)]
            self._free.append(block)
        n = len(self._evictable)
        self._evictable.clear()
        return n

    @property
    def bytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.layers)
