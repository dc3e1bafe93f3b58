"""Iteration-level scheduling: which requests run in the next step.

A step carries one token for every decoding request and, with the rest of `max_tokens_per_step`,
prefill chunks: the unfinished chunked prefills first, then new prompts (mixed steps). Without
mixed steps a step is either prefill (first) or decode. A finished request leaves at once.

KV memory is paged (`caraserve.kv_cache`): a request takes its prompt's blocks when admitted
and one more each time its tokens fill one, and returns them all when it finishes. Admission
stops when the next prompt would not fit (a small watermark stays free while others run). When
decoding requests cannot grow, the youngest running one is preempted: its blocks are freed and
it goes back to the head of the queue, to recompute its tokens later. A request larger than the
whole cache is refused when it arrives, so nothing deadlocks and nothing is lost. With CPU
assist, a request whose adapter is being copied is admitted for prefill at once (its LoRA delta
computed on the CPU) and decodes once the copy has landed.

Admission is FCFS with skip-ahead: a request whose adapter is still being copied to the device,
or that finds no slot (every slot of its rank bucket and of the larger ones held by running
requests; DevicePool.load spills into a larger bucket when its own is held), waits without
holding back requests behind it. Against starving, once the oldest such request is blocked, no
younger one may take a slot of the buckets it could use (they drain as running requests finish).

Rank-bucket grouping (`max_passed_over` not None): when more requests wait than the batch has
room for, those whose rank bucket the running batch already has (or base-model ones) are taken
first, so the decode step does not take on another, larger bucket needlessly; and with an SLO, a
request whose rank would push the predicted step past it lets the requests behind it that fit go
ahead. A request overtaken `max_passed_over` times is overtaken no more: it goes first, and with
an SLO it waits at the head until the batch has shrunk enough for it.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

from caraserve.kv_cache import KVCache, block_hashes
from caraserve.lora.device_pool import AdapterState, DevicePool
from caraserve.lora.host_store import HostStore
from caraserve.perf.slo import SloPricing
from caraserve.request import Request, RequestState


@dataclass(frozen=True)
class ScheduledBatch:
    """A step's rows. is_decode: every row decodes (one token each); otherwise prefill chunks,
    and in a mixed step decode rows too (the requests whose state is DECODE)."""

    is_decode: bool
    requests: list[Request]
    chunk_lens: list[int]  # tokens computed this step per request (1 for a decode row)
    num_decode: int = 0  # the first num_decode rows decode (all of them when is_decode)


PROMPT_LOGPROBS_CHUNK = 512  # prompt tokens a step scores per request (their rows' logits are kept)


class Scheduler:
    def __init__(
        self,
        kv: KVCache,
        pool: DevicePool,
        store: HostStore,
        max_batch_size: int,
        max_tokens_per_step: int,
        assist=None,
        perf_model=None,
        slo_ms: float = 0.0,
        max_passed_over: int | None = None,
        prefix_caching: bool = False,
        mixed_steps: bool = False,
    ):
        self.kv = kv
        self.pool = pool
        self.store = store
        self.max_batch_size = max_batch_size
        self.max_tokens_per_step = max_tokens_per_step
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admitted: prefilling (maybe chunked) or decoding
        self._holds: set[str] = set()  # request ids holding an adapter slot reference
        # assist(request, weights) -> bool: prefill now with a CPU-computed LoRA delta instead of
        # waiting for the adapter's copy (None: always wait)
        self.assist = assist
        self.perf_model = perf_model  # perf.model.PerfModel, used when slo_ms > 0
        self.slo_s = slo_ms / 1e3
        self.slo = SloPricing(perf_model, self.slo_s, pool.rank_buckets)
        self.max_passed_over = max_passed_over  # None: strict FCFS admission
        self._passed_over: dict[str, int] = {}  # request id -> times a younger request went first
        self._rejected: list[tuple[Request, Exception]] = []  # not admitted, for a reason of their own
        self.num_preemptions = 0  # running requests sent back to recompute when KV blocks ran out
        self.prefix_caching = prefix_caching
        self.mixed_steps = mixed_steps

    def take_rejected(self) -> list[tuple[Request, Exception]]:
        """(request, why) for the waiting requests admission refused since the last call (e.g. an
        adapter whose weights were refused on their first read); they have left the queue, the
        engine ends them."""
        rejected, self._rejected = self._rejected, []
        return rejected

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def rank_of(self, req: Request) -> int:
        return self.store.info(req.adapter).rank if req.adapter is not None else 0

    def _within_slo(self, batch: list[Request], req: Request) -> bool:
        """Would the decode step with `req` added still meet the per-token SLO? (A lone request
        always runs, so an SLO tighter than any step cannot stall the engine.)"""
        return not self.slo.active or not batch or self.slo.decode_fits([self.rank_of(r) for r in (*batch, req)])

    def _bucket(self, req: Request) -> int:
        return self.pool.bucket_for(self.rank_of(req)) if req.adapter is not None else -1

    def _may_overtake(self, req: Request) -> bool:
        """May requests behind `req` be admitted before it?"""
        return self.max_passed_over is not None and self._passed_over.get(req.request_id, 0) < self.max_passed_over

    def _admission_order(self, waiting: list[Request]) -> list[Request]:
        """The waiting requests (in arrival order) in the order admission considers them (see the
        module docstring)."""
        room = self.max_batch_size - len(self.running)
        if self.max_passed_over is None or len(waiting) <= room or not self.running:
            return waiting
        present = {self._bucket(r) for r in self.running} | {-1}
        due = [r for r in waiting if not self._may_overtake(r)]
        grouped = [r for r in waiting if self._may_overtake(r) and self._bucket(r) in present]
        others = [r for r in waiting if self._may_overtake(r) and self._bucket(r) not in present]
        return due + grouped + others

    def _adapter_ready(self, req: Request, blocked_buckets: set[int]) -> bool:
        """Makes sure the request's adapter is (being) loaded and held; True when it may run.
        Never waits: weights not in host memory are read on the store's I/O threads while the
        request waits here and the others run. Raises the AdapterError of weights refused on
        their first read."""
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
                if read.done() and read.exception() is None and self.assist(req, read.result()):
                    req.cpu_assisted, req.adapter_read = True, None
                    return True
            req.state = RequestState.LOADING_ADAPTER  # (a failed read: it waits for the copy)
            return False
        req.adapter_read = None
        return True

    def stalled(self) -> bool:
        """Nothing running can step: each decodes on an adapter whose device copy is in flight."""
        return all(r.state is RequestState.DECODE and r.adapter is not None
                   and self.pool.state(r.adapter) is not AdapterState.RESIDENT for r in self.running)

    def read_ahead(self, adapter: str, ahead: int = 0) -> None:
        """Starts the host read of an arriving request's adapter when the request will be among
        the next admissions (fewer than a batch waiting, counting `ahead` requests arriving before
        it), so the read overlaps the step in progress instead of starting at the next one (the
        request would then sit out that step). Called as a request arrives, from any thread: it
        reads only the queue's length and the pool's state, and the store locks its own."""
        if len(self.waiting) + ahead < self.max_batch_size and adapter in self.store and \
                self.pool.state(adapter) is AdapterState.HOST:
            self.store.fetch(adapter)

    def _prefetch(self) -> None:
        """Starts the host reads of the adapters the next admissions will need (each request
        keeps its read until admitted: `_adapter_ready`)."""
        for req in itertools.islice(self.waiting, self.max_batch_size):
            name = req.adapter
            if name is not None and req.adapter_read is None and self.pool.state(name) is AdapterState.HOST:
                req.adapter_read = self.store.fetch(name)

    def _cached_prefix(self, req: Request) -> list[int]:
        """The published blocks the request's prefill can start from (none without prefix
        caching). At least the prefill's last token is left to compute: its logits are needed."""
        if not self.prefix_caching:
            return []
        tokens = req.prompt_ids + req.output_ids[: req.recompute]
        req.block_hashes = block_hashes(req.block_hashes, tokens, self.kv.block_size, req.adapter_key)
        if req.params.prompt_logprobs is not None and len(req.prompt_logprobs) < len(req.prompt_ids):
            return []  # the prompt's logprobs come from its own rows: every one is computed
        return self.kv.match(req.block_hashes[: (req.prefill_len - 1) // self.kv.block_size])

    def _take_prefix(self, req: Request, hit: list[int]) -> None:
        """Admits the request onto its cached prefix: shares the blocks, skips their tokens."""
        if self.prefix_caching and not req.preemptions:  # (a recompute is no new query: vLLM's)
            self.kv.count_query(req.prefill_len, len(hit))
        if not hit:
            return
        self.kv.share(req.block_table, hit)
        req.num_computed = len(hit) * self.kv.block_size
        req.published_blocks = len(hit)
        if not req.preemptions:
            req.cached_tokens = req.num_computed

    def publish(self, reqs: list[Request]) -> None:
        """Publishes the blocks the step filled (prefix caching): each request's full blocks whose
        tokens are all in the cache."""
        if not self.prefix_caching:
            return
        bs = self.kv.block_size
        for req in reqs:
            full = req.kv_tokens // bs
            if full <= req.published_blocks or req.finished:
                continue
            tokens = req.prompt_ids + req.output_ids
            req.block_hashes = block_hashes(req.block_hashes, tokens[: full * bs], bs, req.adapter_key)
            for i in range(req.published_blocks, full):
                self.kv.publish(req.block_table[i], req.block_hashes[i])
            req.published_blocks = full

    def _watermark(self, others_running: bool) -> int:
        """Blocks admission leaves free while other requests run, so they can grow a while
        before one is preempted (none when nothing else runs: a lone request always starts)."""
        return max(1, self.kv.num_blocks // 100) if others_running else 0

    def _youngest_running(self) -> Request:
        return max(self.running, key=lambda r: r.arrival_s)

    def preempt(self, req: Request) -> None:
        """Frees a running request's KV blocks and sends it back to the head of the queue: it
        recomputes its prompt and the tokens it generated (the same tokens: the recomputed keys
        are those it had) and goes on decoding. It keeps its adapter reference."""
        self.kv.free(req.block_table)
        req.recompute = len(req.output_ids)
        req.num_computed = 0
        if len(req.prompt_logprobs) < len(req.prompt_ids):  # cut short mid-prompt: they start over with it
            req.prompt_logprobs.clear()
        req.published_blocks = 0
        req.state = RequestState.WAITING
        req.preemptions += 1
        self.num_preemptions += 1
        self.running.remove(req)
        self.waiting.appendleft(req)

    def _grow_or_preempt(self, req: Request, tokens: int) -> bool:
        """Gives `req` blocks for `tokens` positions, preempting the youngest running requests
        (`req` itself last) until they fit; False when `req` was preempted."""
        while not self.kv.grow(req.block_table, tokens):
            victim = self._youngest_running()
            self.preempt(victim)
            if victim is req:
                return False
        return True

    def schedule(self) -> ScheduledBatch | None:
        self.pool.poll()
        # mixed steps: every decoding request's next token first, then prefill with what is left
        decoding = self._decode_rows() if self.mixed_steps else []
        budget = min(self.max_tokens_per_step - len(decoding), self._slo_prefill_tokens(decoding))
        batch: list[Request] = []
        chunks: list[int] = []
        for req in self.running:  # unfinished chunked prefills first (their blocks are taken already)
            if req.state is RequestState.PREFILL and budget > 0:
                n = self._chunk(req, budget)
                batch.append(req)
                chunks.append(n)
                budget -= n
        arrival = list(self.waiting)
        admitted = self._admit(arrival, budget, batch, chunks)
        for req in admitted:
            self.waiting.remove(req)
            self.running.append(req)
            self._passed_over.pop(req.request_id, None)
        self._count_passed_over(arrival, admitted)
        self._prefetch()
        if batch:
            decoding = [r for r in decoding if r in self.running]
            return ScheduledBatch(False, decoding + batch, [1] * len(decoding) + chunks, len(decoding))
        if not self.mixed_steps:
            decoding = self._decode_rows()
        return ScheduledBatch(True, decoding, [1] * len(decoding), len(decoding)) if decoding else None

    def _admit(self, arrival: list[Request], budget: int, batch: list[Request], chunks: list[int]) -> list[Request]:
        """Waiting requests (`arrival`, in arrival order) admitted this step within the token
        budget, the batch and KV limits, the SLO and adapter readiness; each joins `batch` with
        its first chunk in `chunks`. Admitted requests stay in `waiting` for the caller to move."""
        blocked: set[int] = set()
        admitted: list[Request] = []
        for req in self._admission_order(arrival):
            if budget <= 0 or len(self.running) + len(admitted) >= self.max_batch_size:
                break
            first = req.after
            if self.prefix_caching and first is not None and not first.finished and first.state in (
                    RequestState.WAITING, RequestState.LOADING_ADAPTER, RequestState.PREFILL):
                continue  # a sibling: its prompt's blocks are computed once, by the first
            # the whole prefill's blocks are taken at admission, so a chunked prefill never waits;
            # blocks of a cached prefix are shared instead
            hit = self._cached_prefix(req)
            need = self.kv.blocks_needed(hit, req.prefill_len) + self.kv.evictable_among(hit)
            if need + self._watermark(bool(self.running or admitted)) > self.kv.free_blocks:
                break  # KV memory: later requests wait too, so this one is next when blocks free up
            if not self._within_slo(self.running + admitted, req):
                if self._may_overtake(req):
                    continue  # rank grouping: a lower-rank request behind it may still fit
                break  # FCFS: later requests wait too, so this one is next when the batch shrinks
            try:
                ready = self._adapter_ready(req, blocked)
            except Exception as e:  # this request's adapter, not the engine: it alone fails
                self.waiting.remove(req)
                self._rejected.append((req, e))
                continue
            if not ready:
                continue
            self._take_prefix(req, hit)
            if not self.kv.grow(req.block_table, req.prefill_len):
                raise AssertionError("KV blocks counted free could not be taken")
            n = self._chunk(req, budget)
            req.state = RequestState.PREFILL
            batch.append(req)
            chunks.append(n)
            budget -= n
            admitted.append(req)
        return admitted

    def _count_passed_over(self, arrival: list[Request], admitted: list[Request]) -> None:
        """Rank grouping: every request older than an admitted one and still waiting was passed over once more."""
        if admitted and self.max_passed_over is not None:
            taken = set(map(id, admitted))
            youngest = max(i for i, r in enumerate(arrival) if id(r) in taken)
            for req in arrival[:youngest]:
                if id(req) not in taken:
                    self._passed_over[req.request_id] = self._passed_over.get(req.request_id, 0) + 1

    @staticmethod
    def _chunk(req: Request, budget: int) -> int:
        """The prefill tokens `req` computes this step: what is left, within the budget, and at
        most PROMPT_LOGPROBS_CHUNK for a prompt being scored (its rows' logits are kept)."""
        n = min(req.prefill_len - req.num_computed, budget)
        if req.params.prompt_logprobs is not None and len(req.prompt_logprobs) < len(req.prompt_ids):
            n = min(n, PROMPT_LOGPROBS_CHUNK)
        return n

    def _slo_prefill_tokens(self, decoding: list[Request]) -> int:
        """The most prompt tokens a mixed step may carry beside `decoding` and still be predicted
        within the per-token SLO (unbounded without an SLO or decode rows). At least one KV
        block's worth, so prompts progress however tight the SLO (as a lone request always runs)."""
        if not self.slo.active or not decoding:
            return self.max_tokens_per_step
        prompts = [r for r in self.running if r.state is RequestState.PREFILL]
        prompts += list(itertools.islice(self.waiting, self.max_batch_size))
        chunk_rank = max((self.rank_of(r) for r in prompts), default=0)  # priced at the costliest
        return self.slo.prefill_tokens([self.rank_of(r) for r in decoding], chunk_rank, self.max_tokens_per_step,
                                       self.kv.block_size)

    def _decode_rows(self) -> list[Request]:
        """The decoding requests, oldest first, each with the KV block its next token needs (the
        youngest running requests preempted when blocks run out). Decode never uses the CPU
        path: a CPU-assisted request decodes once its adapter landed."""
        decoding = []
        for req in sorted(self.running, key=lambda r: r.arrival_s):
            if req.state is not RequestState.DECODE:  # (a preempted request is WAITING again)
                continue
            if req.adapter is not None and self.pool.state(req.adapter) is not AdapterState.RESIDENT:
                continue
            if self._grow_or_preempt(req, req.context_len):
                decoding.append(req)
        # a younger one's growth may have preempted one taken before it (ties in arrival time)
        return [r for r in decoding if r.state is RequestState.DECODE]

    def finish(self, req: Request) -> None:
        """Frees everything the request holds (KV blocks, adapter reference, queue place)."""
        self._passed_over.pop(req.request_id, None)
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if req.block_table:
            self.kv.free(req.block_table)
        if req.request_id in self._holds:
            self._holds.discard(req.request_id)
            self.pool.release(req.adapter)
            self.store.release(req.adapter)

    def holds_adapter(self, name: str) -> bool:
        return any(r.adapter == name and r.request_id in self._holds for r in (*self.waiting, *self.running))
