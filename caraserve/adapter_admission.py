"""A waiting request's adapter on its way to admission: read into host memory on the store's I/O
threads, given a device slot (or, with CPU assist, its prefill's LoRA delta computed on the CPU
while the copy is in flight), and held until the request ends. The scheduler asks `ready` for
each request it would admit; nothing here waits."""

from __future__ import annotations

from collections.abc import Iterable

from caraserve.lora.device_pool import AdapterState, DevicePool
from caraserve.lora.host_store import HostStore
from caraserve.request import Request, RequestState


class AdapterAdmission:
    def __init__(self, pool: DevicePool, store: HostStore, assist=None):
        self.pool = pool
        self.store = store
        # assist(request, weights, tokens) -> bool: prefill now with a CPU-computed LoRA delta
        # instead of waiting for the adapter's copy, `tokens` of prefill to compute (None: always wait)
        self.assist = assist
        self._holds: set[str] = set()  # request ids holding an adapter slot reference

    def ready(self, req: Request, blocked_buckets: set[int], todo: int | None = None) -> bool:
        """Makes sure the request's adapter is (being) loaded and held; True when it may run.
        Never waits: weights not in host memory are read on the store's I/O threads while the
        request waits and the others run. `blocked_buckets` (the step's, shared by its calls):
        rank buckets an older request found no slot in, which younger ones may not take. Raises
        the AdapterError of weights refused on their first read. todo: the prefill tokens left to
        compute (its cached prefix off; default the whole prefill), what CPU assist would cost."""
        name = req.adapter
        if name is None:
            return True
        if req.request_id not in self._holds:
            state = self.pool.state(name)
            req.cold_start = req.cold_start or state is not AdapterState.RESIDENT  # (as it arrived)
            if state is AdapterState.HOST:
                bucket = self.pool.bucket_for(self.store.info(name).rank)
                if bucket in blocked_buckets:
                    return False
                # its read, kept: a failure fails it (a refetch hides it); its weights wait with it for a slot
                read = req.adapter_read = req.adapter_read or self.store.fetch(name)
                if not read.done():
                    return False
                if not self.pool.load(read.result(), avoid=blocked_buckets):
                    # it could use a slot of any bucket from its own up: younger requests take none
                    blocked_buckets.update(range(bucket, len(self.pool.rank_buckets)))
                    return False
            self.pool.acquire(name)
            read, req.adapter_read = req.adapter_read, None  # the host copy stays while the copy or CPU assist needs it
            self.store.hold(name, read.result() if read is not None and read.done() and not read.exception() else None)
            self._holds.add(req.request_id)
        if self.pool.state(name) is AdapterState.LOADING:
            if self.assist is not None:  # the host copy CPU assist needs, read once per request
                read = req.adapter_read = req.adapter_read or self.store.fetch(name)
                tokens = req.prefill_len if todo is None else max(todo, 1)
                if read.done() and read.exception() is None and self.assist(req, read.result(), tokens):
                    req.cpu_assisted, req.adapter_read = True, None
                    return True
            req.state = RequestState.LOADING_ADAPTER  # (a failed read: it waits for the copy)
            return False
        req.adapter_read = None
        return True

    def prefetch(self, upcoming: Iterable[Request]) -> None:
        """Starts the host reads of the adapters the `upcoming` admissions will need (each
        request keeps its read until admitted: `ready`)."""
        for req in upcoming:
            name = req.adapter
            if name is not None and req.adapter_read is None and self.pool.state(name) is AdapterState.HOST:
                req.adapter_read = self.store.fetch(name)

    def release(self, req: Request) -> None:
        """Drops the request's hold on its adapter's slot and host copy (it ended)."""
        if req.request_id in self._holds:
            self._holds.discard(req.request_id)
            self.pool.release(req.adapter)
            self.store.release(req.adapter)

    def holds(self, name: str, reqs: Iterable[Request]) -> bool:
        """Whether any of `reqs` holds adapter `name`."""
        return any(r.adapter == name and r.request_id in self._holds for r in reqs)
