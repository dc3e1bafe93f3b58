"""Device memory for adapters: slots allocated once, grouped by rank bucket.

Each bucket of rank R owns, per target module, A [L, S, in, R] and B [L, S, R, out] plus a
scale [S]. An adapter of rank r lives in the smallest bucket with R >= r, zero-padded (exact:
the padding contributes nothing). Addresses never change, so compiled steps and CUDA graphs
that captured them stay valid; loading is a copy into a slot, never an allocation.

States: host-only -> loading -> resident. The copy goes layer group by layer group (groups of
`pipeline_layers` layers), each group with its own completion marker: on CUDA an event recorded
on a side stream after the group's copies, on a CPU-only machine with an emulated link a flag the
paced copy thread sets once the group's share of the emulated time has passed (without
emulation the copy is immediate). `layers_ready` counts the leading layers whose group has
landed, so CPU-assisted prefill can move a loading adapter's rows to the device layer by layer;
the slot turns resident only when every group has landed (`poll`). A slot whose adapter is used
by running requests (`acquire`/`release` counts), or whose copy is in flight, is never evicted.
"""

from __future__ import annotations

import enum
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from caraserve.lora.batch import Landing, LoraBatch, LoraGroup, LoraIndex
from caraserve.lora.checkpoint import TARGETS, AdapterError, LoraWeights

log = logging.getLogger(__name__)


MAX_COPY_GROUPS = 8  # default pipelining: about this many layer groups (and markers) per copy
BATCH_LAYOUTS_KEPT = 256  # make_batch's cache: more layouts than a batch goes through between joins


class _HostMarker(threading.Event):
    """Completion marker of one layer group of a paced copy; query/synchronize mirror
    torch.cuda.Event's."""

    def query(self) -> bool:
        return self.is_set()

    def synchronize(self) -> None:
        self.wait()


class _PacedCopy:
    """A host copy on its own thread that emulates a link of a given speed on a CPU-only machine:
    group g is written, then marked landed once its share of `seconds` has passed since the start
    (and after `gate(g)` returns, when a gate is given)."""

    def __init__(self, writes: list[Callable[[], None]], seconds: float, gate: Callable[[int], None] | None):
        self.markers = [_HostMarker() for _ in writes]

        def run():
            t0 = time.perf_counter()
            for g, (write, marker) in enumerate(zip(writes, self.markers)):
                write()
                time.sleep(max(0.0, t0 + seconds * (g + 1) / len(writes) - time.perf_counter()))
                if gate is not None:
                    gate(g)
                marker.set()

        threading.Thread(target=run, name="caraserve-copy", daemon=True).start()


@dataclass
class _Copy:
    """A copy in flight: marker g completes when layers [0, ends[g]) of the slot have landed."""

    markers: list  # torch.cuda.Event or _HostMarker, one per layer group, completing in order
    ends: tuple[int, ...]  # leading layers resident once each marker has completed
    landed: int = 0  # markers already seen complete (only grows)

    def layers_ready(self) -> int:
        """Leading layers resident now; queries markers, never waits on them."""
        while self.landed < len(self.markers) and self.markers[self.landed].query():
            self.landed += 1
        return self.ends[self.landed - 1] if self.landed else 0

    def done(self) -> bool:
        return self.layers_ready() == self.ends[-1]

    def wait(self) -> None:
        self.markers[-1].synchronize()  # groups complete in order: the last one implies all
        self.landed = len(self.markers)


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
    copy: _Copy | None = None  # the copy in flight, None once resident


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
        pipeline_layers: int = 0,
        copy_gate: Callable[[str, int], None] | None = None,
    ):
        """pipeline_layers: layers per copy group, each with its own completion marker (0 = about
        MAX_COPY_GROUPS groups per adapter). copy_gate(adapter, group), CPU emulation only: called
        on the copy thread before a group is marked landed, so tests can hold a copy at an exact
        layer."""
        if pipeline_layers < 0:
            raise ValueError(f"pipeline_layers={pipeline_layers} must be >= 0")
        self.rank_buckets = tuple(rank_buckets)
        self.targets = model_args.pool_targets(targets)
        self.device = layer_devices[0]
        self._one_device = len(set(layer_devices)) == 1
        self._clock = itertools.count(1)
        self._where: dict[str, _Slot] = {}
        self._batches: dict[tuple, LoraBatch | None] = {}  # make_batch's cache (entries of evicted adapters dropped)
        # Called with (bucket index, slot) after each write into a slot (possibly on a copy
        # thread): caches derived from slot weights (the CPU LoRA backend's) drop them.
        self.on_write: list = []
        self.loads = 0
        self.evictions = 0
        self.spills = 0  # loads into a larger bucket than the adapter's own (its own was held)
        cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self.emulate_copy_gbps = 0.0 if cuda else emulate_copy_gbps
        self.copy_gate = copy_gate
        self.buckets: list[_Bucket] = []
        L, S = model_args.num_layers, slots_per_bucket
        self.num_layers = L
        step = pipeline_layers or -(-L // MAX_COPY_GROUPS)
        self._groups = [(l0, min(l0 + step, L)) for l0 in range(0, L, step)]  # [first, end) layers
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
        return AdapterState.LOADING if slot.copy is not None else AdapterState.RESIDENT

    def layers_ready(self, name: str) -> int:
        """Leading layers of the adapter resident in its slot: 0 without a slot, all once resident.
        Never blocks (it queries the copy's markers); the answer only grows while the copy runs."""
        slot = self._where.get(name)
        if slot is None:
            return 0
        return self.num_layers if slot.copy is None else slot.copy.layers_ready()

    def slot_of(self, name: str) -> tuple[int, int]:
        s = self._where[name]
        return s.bucket, s.index

    def used_slots(self) -> int:
        return len(self._where)

    def load(self, w: LoraWeights, avoid: frozenset[int] | set[int] = frozenset(), evict: bool = True) -> bool:
        """Starts copying `w` into a slot (no-op when already there). Its own rank bucket first (a
        free slot, else (evict) the least recently used idle one); when every slot there is held,
        a larger bucket's (zero-padded to its rank: the same delta), except those in `avoid`.
        False when none can take it."""
        if w.name in self._where:
            return True
        self.check(w)
        home = self.bucket_for(w.rank)
        slot = None
        for b in range(home, len(self.buckets)):
            if b != home and b in avoid:
                continue
            slot = self._free_or_idle(self.buckets[b], evict)
            if slot is not None:
                break
        if slot is None:
            return False
        self.spills += slot.bucket != home
        bucket = self.buckets[slot.bucket]
        if slot.adapter is not None:
            log.debug("evicting %s from bucket %d slot %d", slot.adapter, slot.bucket, slot.index)
            self._forget(slot.adapter)
            self.evictions += 1
        slot.adapter, slot.refs, slot.last_used, slot.targets = w.name, 0, next(self._clock), w.targets
        self._where[w.name] = slot
        self._copy_in(bucket, slot, w)
        self.loads += 1
        return True

    @staticmethod
    def _free_or_idle(bucket: _Bucket, evict: bool = True) -> _Slot | None:
        """A free slot of the bucket, else (evict) its least recently used one no request holds."""
        slot = next((s for s in bucket.slots if s.adapter is None), None)
        if slot is None and evict:
            idle = [s for s in bucket.slots if s.refs == 0 and s.copy is None]
            slot = min(idle, key=lambda s: s.last_used) if idle else None
        return slot

    def _copy_in(self, bucket: _Bucket, slot: _Slot, w: LoraWeights) -> None:
        s = slot.index
        # The scale goes first: group 0's marker then covers it too.
        writes = [lambda l0=l0, l1=l1, first=(l0 == 0): self._write(bucket, s, w, l0, l1, first)
                  for l0, l1 in self._groups]
        ends = tuple(l1 for _, l1 in self._groups)
        bucket.host_scale[s] = w.scale
        if self._copy_stream is None:
            if self.emulate_copy_gbps > 0:
                gate = self.copy_gate
                paced = _PacedCopy(writes, w.nbytes / (self.emulate_copy_gbps * 1e9),
                                   (lambda g: gate(w.name, g)) if gate is not None else None)
                slot.copy = _Copy(paced.markers, ends)
            else:  # one write over every layer: nothing reads the slot before the copy returns
                self._write(bucket, s, w, 0, self.num_layers, True)
            return
        # The compute stream may still read the evicted adapter: order the overwrite after it.
        self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        markers = []
        with torch.cuda.stream(self._copy_stream):
            for write in writes:
                write()
                markers.append(torch.cuda.Event())
                markers[-1].record(self._copy_stream)
        slot.copy = _Copy(markers, ends)

    def _write(self, bucket: _Bucket, s: int, w: LoraWeights, l0: int, l1: int, with_scale: bool) -> None:
        """Copies layers [l0, l1) of `w` into slot s, zero-padded to the bucket's rank."""
        for m, (a, b) in bucket.weights.items():
            host_a, host_b = w.a.get(m), w.b.get(m)
            if isinstance(a, list):  # one tensor per layer (layers spread over devices)
                parts = [(a[layer][s], b[layer][s], layer) for layer in range(l0, l1)]
            else:
                parts = [(a[l0:l1, s], b[l0:l1, s], slice(l0, l1))]
            for da, db, layers in parts:  # da [(l,) in, R], db [(l,) R, out]
                if host_a is None:  # a module the adapter leaves alone adds nothing
                    da.zero_()
                    db.zero_()
                    continue
                ha, hb = host_a[layers], host_b[layers]  # [(l,) in, r], [(l,) r, out]
                r = ha.shape[-1]
                da[..., :r].copy_(ha, non_blocking=True)
                db[..., :r, :].copy_(hb, non_blocking=True)
                if r < da.shape[-1]:  # the padding up to the bucket's rank adds nothing either
                    da[..., r:].zero_()
                    db[..., r:, :].zero_()
        if with_scale:
            bucket.scale[s].fill_(w.scale)
        index = self.buckets.index(bucket)
        for fn in self.on_write:
            fn(index, s)

    def poll(self) -> list[str]:
        """Flips finished copies to resident; returns the adapters that became resident."""
        done = []
        for name, slot in self._where.items():
            if slot.copy is not None and slot.copy.done():
                slot.copy = None
                done.append(name)
        return done

    def wait_loaded(self, name: str) -> None:
        slot = self._where[name]
        if slot.copy is not None:
            slot.copy.wait()
            slot.copy = None

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
        if slot is None or slot.refs > 0:
            return slot is None
        if slot.copy is not None:
            slot.copy.wait()
            slot.copy = None
        self._forget(name)
        slot.adapter = None
        self.evictions += 1
        return True

    def _forget(self, name: str) -> None:
        """Takes the adapter out of the pool's index. Cached batch metadata names slots by
        adapter: its layouts go (the adapter may come back in another slot, or under its name
        another adapter); the others' slots did not move, so their layouts, and what kernels
        keep for them, stay."""
        del self._where[name]
        self._batches = {k: v for k, v in self._batches.items() if all(r[2] != name for r in k[0])}

    def sort_key(self, name: str | None) -> tuple[int, int]:
        """Orders rows so each bucket, and each adapter inside it, is contiguous (base rows first)."""
        if name is None:
            return (-1, -1)
        return self.slot_of(name)

    def make_batch(
        self, runs: list[tuple[int, int, str | None]], is_decode: bool, device: torch.device | str
    ) -> LoraBatch | None:
        """LoRA metadata for rows given as (start, count, adapter or None) runs, already ordered by
        `sort_key`. Rows of adapters still loading must not be passed here (see `landing`)."""
        # A decode batch keeps its layout for many steps: the metadata (and its index tensors) is
        # reused until a request joins or leaves or a slot changes hands.
        key = (tuple(runs), is_decode, str(device))
        cached = self._batches.get(key)
        if cached is not None:
            return cached
        if len(self._batches) >= BATCH_LAYOUTS_KEPT:
            self._batches.clear()
        self._batches[key] = batch = self._build_batch(runs, is_decode, device)
        return batch

    def _build_batch(self, runs, is_decode, device) -> LoraBatch | None:
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
                                    modules, tuple(bucket.host_scale), tuple(s.targets for s in bucket.slots)))
        return LoraBatch(tuple(groups), is_decode)

    def landing(self, name: str, start: int, count: int, device: torch.device | str) -> Landing:
        """Rows [start, start + count) of an adapter still loading, in the device form of its slot,
        used layer by layer as its groups land (never, when the adapter has no slot)."""
        group = self.make_batch([(start, count, name)], False, device).groups[0] if name in self._where else None
        return Landing(group, lambda: self.layers_ready(name))
