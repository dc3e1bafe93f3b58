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

Priority (`by_priority`, vLLM's priority policy): the queue is ordered by each request's
`priority` (lower first), then arrival; rank grouping reorders only within a priority. When KV
blocks run out, the running request of the lowest priority (the youngest of it) is preempted.
A request that finds no room (the batch full, or too few free blocks) preempts running requests
of a strictly lower priority, lowest first, when they hold enough to make room: requests of one
priority never preempt one another, so a preempted request cannot take its place back at once.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

from caraserve import prefix_cache
from caraserve.adapter_admission import AdapterAdmission
from caraserve.kv_cache import KVCache
from caraserve.lora.device_pool import AdapterState, DevicePool
from caraserve.lora.host_store import HostStore
from caraserve.perf.slo import SloPricing
from caraserve.request import Request, RequestError, RequestState


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
        by_priority: bool = False,
        long_rope_from: int | None = None,
    ):
        self.kv = kv
        self.pool = pool
        self.store = store
        self.max_batch_size = max_batch_size
        self.max_tokens_per_step = max_tokens_per_step
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admitted: prefilling (maybe chunked) or decoding
        self.adapters = AdapterAdmission(pool, store, assist)
        self.perf_model = perf_model  # perf.model.PerfModel, used when slo_ms > 0
        self.slo_s = slo_ms / 1e3
        self.slo = SloPricing(perf_model, self.slo_s, pool.rank_buckets)
        self.max_passed_over = max_passed_over  # None: strict FCFS admission
        self._passed_over: dict[str, int] = {}  # request id -> times a younger request went first
        self._rejected: list[tuple[Request, Exception]] = []  # not admitted, for a reason of their own
        self.num_preemptions = 0  # running requests sent back to recompute when KV blocks ran out
        self.prefix_caching = prefix_caching
        self.mixed_steps = mixed_steps
        self.by_priority = by_priority
        self.long_rope_from = long_rope_from  # ModelArgs.long_rope_from (longrope models)

    @classmethod
    def for_engine(cls, cfg, kv: KVCache, pool: DevicePool, store: HostStore, assist, perf_model,
                   long_rope_from: int | None = None) -> Scheduler:
        """The scheduler of an engine of config `cfg` (config.EngineConfig)."""
        sc = cfg.scheduler
        return cls(kv, pool, store, cfg.max_batch_size, cfg.max_tokens_per_step, assist, perf_model, sc.slo_ms,
                   sc.max_passed_over if sc.rank_grouping else None, prefix_caching=cfg.prefix_caching,
                   mixed_steps=sc.mixed_steps, by_priority=sc.policy == "priority", long_rope_from=long_rope_from)

    def take_rejected(self) -> list[tuple[Request, Exception]]:
        """(request, why) for the waiting requests admission refused since the last call (e.g. an
        adapter whose weights were refused on their first read); they have left the queue, the
        engine ends them."""
        rejected, self._rejected = self._rejected, []
        return rejected

    def add(self, req: Request) -> None:
        prefix_cache.set_rope(req, self.long_rope_from)
        if self.by_priority:
            self._queue(req)
        else:
            self.waiting.append(req)

    def check(self, params) -> None:
        """Refuses (RequestError) a priority the policy does not serve."""
        if params.priority and not self.by_priority:
            raise RequestError(f"priority={params.priority}: requests are served first come, first served here "
                               "(start the engine with scheduler.policy=priority to serve priorities)")

    def _order(self, req: Request) -> tuple:
        """Where a request stands in line: by priority (by_priority), then arrival."""
        return (req.params.priority if self.by_priority else 0, req.arrival_s)

    def _queue(self, req: Request) -> None:
        """Puts a request in the priority-ordered queue behind those that go before it."""
        key = self._order(req)
        at = next((i for i, r in enumerate(self.waiting) if self._order(r) > key), len(self.waiting))
        self.waiting.insert(at, req)

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
        order = due + grouped + others
        return sorted(order, key=lambda r: r.params.priority) if self.by_priority else order  # (stable)

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

    def _cached_prefix(self, req: Request) -> list[int]:
        """The published blocks the request's prefill can start from (none without prefix caching)."""
        return prefix_cache.cached_prefix(self.kv, req) if self.prefix_caching else []

    def publish(self, reqs: list[Request]) -> None:
        """Publishes the blocks the step filled (prefix caching)."""
        if self.prefix_caching:
            prefix_cache.publish(self.kv, reqs)

    def _watermark(self, others_running: bool) -> int:
        """Blocks admission leaves free while other requests run, so they can grow a while
        before one is preempted (none when nothing else runs: a lone request always starts)."""
        return max(1, self.kv.num_blocks // 100) if others_running else 0

    def _victim(self) -> Request:
        """The running request preempted first: the youngest (of the lowest priority)."""
        return max(self.running, key=self._order)

    def preempt(self, req: Request, count: bool = True) -> None:
        """Frees a running request's KV blocks and sends it back to the head of the queue: it
        recomputes its prompt and the tokens it generated (the same tokens: the recomputed keys
        are those it had) and goes on decoding. It keeps its adapter reference. count: a
        preemption for KV blocks (num_preemptions), not a longrope switch."""
        self.kv.free(req.block_table)
        req.recompute = len(req.output_ids)
        req.num_computed = 0
        prefix_cache.set_rope(req, self.long_rope_from)
        if len(req.prompt_logprobs) < len(req.prompt_ids):  # cut short mid-prompt: they start over with it
            req.prompt_logprobs.clear()
        req.published_blocks = 0
        req.state = RequestState.WAITING
        req.preemptions += 1
        self.num_preemptions += count
        self.running.remove(req)
        if self.by_priority:
            self._queue(req)
        else:
            self.waiting.appendleft(req)

    def _grow_or_preempt(self, req: Request, tokens: int) -> bool:
        """Gives `req` blocks for `tokens` positions, preempting the youngest running requests
        (of the lowest priority; `req` itself last) until they fit; False when `req` was preempted."""
        while not self.kv.grow(req.block_table, tokens):
            victim = self._victim()
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
        self.adapters.prefetch(itertools.islice(self.waiting, self.max_batch_size))
        decoding = [r for r in decoding if r in self.running]  # (not those preempted for an admission)
        if batch:
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
            if budget <= 0:
                break
            first = req.after
            if self.prefix_caching and first is not None and not first.finished and first.state in (
                    RequestState.WAITING, RequestState.LOADING_ADAPTER, RequestState.PREFILL):
                continue  # a sibling: its prompt's blocks are computed once, by the first
            # the whole prefill's blocks are taken at admission, so a chunked prefill never waits;
            # blocks of a cached prefix are shared instead
            hit = self._cached_prefix(req)
            victims = [] if self._fits(req, hit, admitted) else self._room(req, hit, batch, admitted)
            if victims is None:
                break  # no batch place or KV blocks: later requests wait too, so this one is next
            if not self._within_slo([r for r in self.running + admitted if r not in victims], req):
                if self._may_overtake(req):
                    continue  # rank grouping: a lower-rank request behind it may still fit
                break  # FCFS: later requests wait too, so this one is next when the batch shrinks
            try:
                ready = self.adapters.ready(req, blocked, req.prefill_len - len(hit) * self.kv.block_size)
            except Exception as e:  # this request's adapter, not the engine: it alone fails
                self.waiting.remove(req)
                self._rejected.append((req, e))
                continue
            if not ready:
                continue  # (nothing preempted for it: its room is made once it can run)
            for victim in victims:
                self.preempt(victim)
            prefix_cache.take_prefix(self.kv, req, hit, count=self.prefix_caching)
            if not self.kv.grow(req.block_table, req.prefill_len):
                raise AssertionError("KV blocks counted free could not be taken")
            n = self._chunk(req, budget)
            req.state = RequestState.PREFILL
            batch.append(req)
            chunks.append(n)
            budget -= n
            admitted.append(req)
        return admitted

    def _fits(self, req: Request, hit: list[int], admitted: list[Request]) -> bool:
        """Whether a batch place and the blocks of the request's prefill (on its cached prefix
        `hit`, whose blocks nobody holds count as taken) are free, the watermark kept."""
        if len(self.running) + len(admitted) >= self.max_batch_size:
            return False
        need = self.kv.blocks_needed(hit, req.prefill_len) + self.kv.evictable_among(hit)
        return need + self._watermark(bool(self.running or admitted)) <= self.kv.free_blocks

    def _room(self, req: Request, hit: list[int], batch: list[Request],
              admitted: list[Request]) -> list[Request] | None:
        """by_priority: the running requests of a strictly lower priority than `req` (the lowest
        first; none of this step's prefill chunks) whose preemption makes it fit (`_fits`, on its
        cached prefix `hit`); None when they cannot. Nothing changes here: the caller preempts
        them once `req` can run (its adapter ready), so no request is preempted for nothing."""
        if not self.by_priority:
            return None
        candidates = sorted((r for r in self.running if r.params.priority > req.params.priority and r not in batch),
                            key=self._order, reverse=True)
        need = self.kv.blocks_needed(hit, req.prefill_len) + self.kv.evictable_among(hit)
        for k in range(1, len(candidates) + 1):
            victims = candidates[:k]
            staying = len(self.running) + len(admitted) - k
            released = self.kv.held_only_by([r.block_table for r in victims])
            # blocks of its prefix that only victims hold become free, and are then taken from the free count
            blocks = need + len(released.intersection(hit)) + self._watermark(staying > 0)
            if staying < self.max_batch_size and blocks <= self.kv.free_blocks + len(released):
                return victims
        return None

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
        """The decoding requests, oldest (of the highest priority) first, each with the KV block
        its next token needs (the youngest running requests, of the lowest priority, preempted
        when blocks run out). Decode never uses the CPU path: a CPU-assisted request decodes once
        its adapter landed."""
        decoding = []
        for req in sorted(self.running, key=self._order):
            if req.state is not RequestState.DECODE:  # (a preempted request is WAITING again)
                continue
            if req.adapter is not None and self.pool.state(req.adapter) is not AdapterState.RESIDENT:
                continue
            if not req.rope_long and self.long_rope_from is not None and req.context_len > self.long_rope_from:
                # it outgrows the original context: its keys so far turned with longrope's short
                # factors, so it recomputes them with the long ones (transformers' Phi-3 does)
                self.preempt(req, count=False)
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
        self.adapters.release(req)

    def holds_adapter(self, name: str) -> bool:
        return self.adapters.holds(name, (*self.waiting, *self.running))
