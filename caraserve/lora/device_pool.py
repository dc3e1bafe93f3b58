"""Device memory for adapters: slots allocated once, grouped by rank bucket.

Each bucket of rank R owns, per target module, A [L, S, in, R] and B [L, S, R, out] plus a
scale [S]. An adapter of rank r lives in the smallest bucket with R >= r, zero-padded (exact:
the padding contributes nothing). Addresses never change, so compiled steps and CUDA graphs
that captured them stay valid; loading is a copy into a slot, never an allocation.

States: host-only -> loading -> resident. On CUDA the copy runs on a side stream and the slot
turns resident when its event has completed (`poll`); on CPU the copy is immediate. A slot whose
adapter is used by running requests (`acquire`/`release` counts) is never evicted; when every
slot of a bucket is busy, `load` returns False and the caller waits.
"""

from __future__ import annotations

import enum
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from caraserve.lora.batch import LoraBatch, LoraGroup, LoraIndex
from caraserve.lora.checkpoint import TARGETS, AdapterError, LoraWeights

log = logging.getLogger(__name__)


class _PacedCopy:
    """A host copy on its own thread that takes at least `seconds` (an emulated PCIe transfer on a
    CPU-only machine); query/synchronize mirror torch.cuda.Event's."""

    def __init__(self, copy, seconds: float):
        self._done = threading.Event()

        def run():
            t0 = time.perf_counter()
            copy()
            time.sleep(max(0.0, seconds - (time.perf_counter() - t0)))
            self._done.set()

        threading.Thread(target=run, name="caraserve-copy", daemon=True).start()

    def query(self) -> bool:
        return self._done.is_set()

    def synchronize(self) -> None:
        self._done.wait()


class AdapterState(enum.Enum):
    HOST = "host"
    LOADING = "loading"
    RESIDENT = "resident"


@dataclass
class _Slot:
    bucket: int
    index: int
    adapter: str | None = None
    refs: int = 0
    last_used: int = 0
    targets: tuple = ()  # modules the adapter in the slot targets
    event: object = None  # torch.cuda.Event of the copy in flight, or None


@dataclass
class _Bucket:
    rank: int
    weights: dict  # module -> (A, B); A [L, S, in, R] (or a per-layer list of [S, in, R])
    scale: torch.Tensor  # [S] float32
    slots: list = field(default_factory=list)
    host_scale: list = field(default_factory=list)  # [S] the same scales as host floats


class DevicePool:
    def __init__(
        self,
        model_args,
        rank_buckets: tuple[int, ...],
        slots_per_bucket: int,
        dtype: torch.dtype,
        layer_devices: list[torch.device],
        targets: tuple[str, ...] = TARGETS,
        emulate_copy_gbps: float = 0.0,
    ):
        self.rank_buckets = tuple(rank_buckets)
        self.targets = tuple(targets)
        self.device = layer_devices[0]
        self._one_device = len(set(layer_devices)) == 1
        self._clock = itertools.count(1)
        self._where: dict[str, _Slot] = {}
        self.loads = 0
        self.evictions = 0
        cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self.emulate_copy_gbps = 0.0 if cuda else emulate_copy_gbps
        self.buckets: list[_Bucket] = []
        L, S = model_args.num_layers, slots_per_bucket
        for bi, R in enumerate(self.rank_buckets):
            weights = {}
            for m in self.targets:
                fan_in, fan_out = model_args.module_shape(m)
                if self._one_device:
                    a = torch.zeros(L, S, fan_in, R, dtype=dtype, device=self.device)
                    b = torch.zeros(L, S, R, fan_out, dtype=dtype, device=self.device)
                else:
                    a = [torch.zeros(S, fan_in, R, dtype=dtype, device=d) for d in layer_devices]
                    b = [torch.zeros(S, R, fan_out, dtype=dtype, device=d) for d in layer_devices]
                weights[m] = (a, b)
            scale = torch.zeros(S, dtype=torch.float32, device=self.device)
            self.buckets.append(_Bucket(R, weights, scale, [_Slot(bi, i) for i in range(S)], [0.0] * S))

    @property
    def nbytes(self) -> int:
        total = 0
        for bucket in self.buckets:
            for a, b in bucket.weights.values():
                for t in (a if isinstance(a, list) else [a]) + (b if isinstance(b, list) else [b]):
                    total += t.numel() * t.element_size()
        return total

    def bucket_for(self, rank: int) -> int:
        for i, r in enumerate(self.rank_buckets):
            if rank <= r:
                return i
        raise AdapterError(f"rank {rank} exceeds the largest rank bucket {self.rank_buckets[-1]}")

    def check(self, w: LoraWeights) -> None:
        """Raises AdapterError when the adapter can never be placed in this pool."""
        if w.rank > self.rank_buckets[-1]:
            raise AdapterError(
                f"adapter {w.name!r}: rank {w.rank} exceeds the largest rank bucket {self.rank_buckets[-1]}"
            )
        missing = [m for m in w.targets if m not in self.targets]
        if missing:
            raise AdapterError(f"adapter {w.name!r} targets {missing}, not in the pool's modules {self.targets}")

    def state(self, name: str) -> AdapterState:
        slot = self._where.get(name)
        if slot is None:
            return AdapterState.HOST
        return AdapterState.LOADING if slot.event is not None else AdapterState.RESIDENT

    def slot_of(self, name: str) -> tuple[int, int]:
        s = self._where[name]
        return s.bucket, s.index

    def used_slots(self) -> int:
        return len(self._where)

    def load(self, w: LoraWeights) -> bool:
        """Starts copying `w` into a slot (no-op when already there). False when every slot of its
        bucket is held by running requests."""
        if w.name in self._where:
            return True
        self.check(w)
        bucket = self.buckets[self.bucket_for(w.rank)]
        slot = next((s for s in bucket.slots if s.adapter is None), None)
        if slot is None:
            idle = [s for s in bucket.slots if s.refs == 0 and s.event is None]
            if not idle:
                return False
            slot = min(idle, key=lambda s: s.last_used)
            log.debug("evicting %s from bucket %d slot %d", slot.adapter, slot.bucket, slot.index)
            del self._where[slot.adapter]
            self.evictions += 1
        slot.adapter, slot.refs, slot.last_used, slot.targets = w.name, 0, next(self._clock), w.targets
        self._where[w.name] = slot
        self._copy_in(bucket, slot, w)
        self.loads += 1
        return True

    def _copy_in(self, bucket: _Bucket, slot: _Slot, w: LoraWeights) -> None:
        if self._copy_stream is None:
            if self.emulate_copy_gbps > 0:
                seconds = w.nbytes / (self.emulate_copy_gbps * 1e9)
                slot.event = _PacedCopy(lambda: self._write(bucket, slot.index, w), seconds)
            else:
                self._write(bucket, slot.index, w)
            return
        # The compute stream may still read the evicted adapter: order the overwrite after it.
        self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._copy_stream):
            self._write(bucket, slot.index, w)
            slot.event = torch.cuda.Event()
            slot.event.record(self._copy_stream)

    def _write(self, bucket: _Bucket, s: int, w: LoraWeights) -> None:
        for m, (a, b) in bucket.weights.items():
            host_a, host_b = w.a.get(m), w.b.get(m)
            layers = range(len(a)) if isinstance(a, list) else [None]
            for layer in layers:
                da = a[layer][s] if layer is not None else a[:, s]  # [(L,) in, R]
                db = b[layer][s] if layer is not None else b[:, s]  # [(L,) R, out]
                da.zero_()
                db.zero_()
                if host_a is None:
                    continue
                ha = host_a[layer] if layer is not None else host_a
                hb = host_b[layer] if layer is not None else host_b
                r = ha.shape[-1]
                da[..., :r].copy_(ha, non_blocking=True)
                db[..., :r, :].copy_(hb, non_blocking=True)
        bucket.scale[s].fill_(w.scale)
        bucket.host_scale[s] = w.scale

    def poll(self) -> list[str]:
        """Flips finished copies to resident; returns the adapters that became resident."""
        done = []
        for name, slot in self._where.items():
            if slot.event is not None and slot.event.query():
                slot.event = None
                done.append(name)
        return done

    def wait_loaded(self, name: str) -> None:
        slot = self._where[name]
        if slot.event is not None:
            slot.event.synchronize()
            slot.event = None

    def acquire(self, name: str) -> None:
        slot = self._where[name]
        slot.refs += 1
        slot.last_used = next(self._clock)

    def release(self, name: str) -> None:
        slot = self._where.get(name)
        if slot is not None and slot.refs > 0:
            slot.refs -= 1

    def evict(self, name: str) -> bool:
        """Frees the adapter's slot now; False when running requests still hold it."""
        slot = self._where.get(name)
        if slot is None:
            return True
        if slot.refs > 0:
            return False
        if slot.event is not None:
            slot.event.synchronize()
            slot.event = None
        del self._where[name]
        slot.adapter = None
        return True

    def sort_key(self, name: str | None) -> tuple[int, int]:
        """Orders rows so each bucket, and each adapter inside it, is contiguous (base rows first)."""
        if name is None:
            return (-1, -1)
        return self.slot_of(name)

    def make_batch(
        self, runs: list[tuple[int, int, str | None]], is_decode: bool, device: torch.device | str
    ) -> LoraBatch | None:
        """LoRA metadata for rows given as (start, count, adapter or None) runs, already ordered by
        `sort_key`. Rows of adapters still loading must not be passed here."""
        per_bucket: dict[int, list[tuple[int, int, int]]] = {}
        for start, count, name in runs:
            if name is None:
                continue
            b, s = self.slot_of(name)
            per_bucket.setdefault(b, []).append((start, count, s))
        if not per_bucket:
            return None
        groups = []
        for b, segs in sorted(per_bucket.items()):
            bucket = self.buckets[b]
            modules = frozenset(m for _, _, s in segs for m in bucket.slots[s].targets)
            groups.append(LoraGroup(bucket.rank, bucket.weights, bucket.scale, LoraIndex.from_segments(segs, device),
                                    modules, tuple(bucket.host_scale)))
        return LoraBatch(tuple(groups), is_decode)
