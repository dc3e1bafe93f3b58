"""Discrete-event simulation of a cluster of continuously batching replicas behind one router.

Each replica works in steps, as the engine does: at a step boundary, if requests wait in its FIFO
queue it prefills them together (time: the perf model's prefill prediction, which yields each
one's first token); otherwise it runs one decode step over its running batch (time: the decode
prediction for the batch's shape), which yields one token per request. A request finishes after
its output tokens; its slot frees at that boundary. Prefill stalls the decode of the batch (no
chunked prefill), which is the cost rank_aware's delta_prefill term accounts for.

Between batch changes a replica's steps all last the same, so the simulation jumps from change
to change (an arrival, a finish, the end of a prefill) instead of stepping: the work is
proportional to requests, not to tokens.

The router calls the policy once per arrival with a snapshot of every replica. When every
replica is full it holds requests in its own FIFO and retries as slots free.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import math
import zlib
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np

from caraserve.cluster.config import ClusterConfig, RouterConfig, WorkloadConfig
from caraserve.cluster.policies import Policy, PolicyParams, ReplicaState, make_policy
from caraserve.cluster.workload import SimRequest, generate
from caraserve.perf.model import PerfModel
from caraserve.state import RequestView

log = logging.getLogger(__name__)

_IDLE, _PREFILL, _DECODE = range(3)


def load_perf_model(spec: str) -> PerfModel:
    """"linear" = the paper-like model; anything else is a path to a perf model JSON, bare or as
    the "model" entry of a profile that scripts/profile_decode.py writes beside its raw timings."""
    return PerfModel.linear() if spec == "linear" else PerfModel.load(spec, "cluster.perf_model")


class _Replica:
    """One engine replica's batching state (mutable, private to the simulator)."""

    def __init__(self, index: int, cluster: ClusterConfig, perf: PerfModel):
        self.index = index
        self.max_batch_size = cluster.max_batch_size
        self.adapter_slots = cluster.adapter_slots
        self.cold_start_s = cluster.cold_start_ms / 1e3
        self.perf = perf
        self.running: dict[int, SimRequest] = {}
        self.finish_heap: list[tuple[int, int]] = []  # (decode step index it finishes at, request id)
        self.finish_step: dict[int, int] = {}
        self.prefilling: list[SimRequest] = []
        self.queue: deque[SimRequest] = deque()
        self.resident: OrderedDict[str, None] = OrderedDict()
        self.phase = _IDLE
        self.steps = 0  # decode steps completed when the current phase began
        self.seg_start_s = 0.0
        self.step_s = 0.0
        self.event_s = math.inf
        self.event_k = 0  # decode steps into the segment at which the pending event falls
        self.version = 0
        # Step-weighted sums over decode steps, for the mean batch shape a policy produces.
        self.decode_steps = 0
        self.step_batch_sum = 0
        self.step_max_rank_sum = 0
        self._batch_shape = (0, 0)
        self._state: ReplicaState | None = None
        self._state_steps = 0
        self._state_dirty = True

    @property
    def occupancy(self) -> int:
        return len(self.running) + len(self.prefilling) + len(self.queue)

    def steps_at(self, t: float) -> int:
        if self.phase != _DECODE:
            return self.steps
        return self.steps + min(int((t - self.seg_start_s) / self.step_s), self.event_k)

    def state(self, t: float) -> ReplicaState:
        steps = self.steps_at(t)
        if self._state_dirty or self._state is None:
            running = tuple(RequestView(r.adapter, r.rank, r.prompt_tokens, self.finish_step[r.id] - steps)
                            for r in self.running.values())
            running += tuple(RequestView(r.adapter, r.rank, r.prompt_tokens, r.output_tokens)
                             for r in self.prefilling)
            queued = tuple(RequestView(r.adapter, r.rank, r.prompt_tokens, r.output_tokens) for r in self.queue)
            self._state = ReplicaState(running, queued, self.max_batch_size, frozenset(self.resident), self.perf)
            self._state_steps, self._state_dirty = steps, False
        elif steps != self._state_steps + self._state.steps_since_snapshot:
            self._state = dataclasses.replace(self._state, steps_since_snapshot=steps - self._state_steps)
        return self._state

    def _touch(self, adapter: str) -> bool:
        """Marks the adapter used; returns whether it had to be loaded."""
        hit = adapter in self.resident
        self.resident[adapter] = None
        self.resident.move_to_end(adapter)
        if self.adapter_slots and len(self.resident) > self.adapter_slots:
            self.resident.popitem(last=False)
        return not hit

    def start_next(self, t: float) -> None:
        """Begins the phase that follows a step boundary at t; sets event_s."""
        self._state_dirty = True
        self.version += 1
        room = self.max_batch_size - len(self.running)
        if self.queue and room > 0:
            batch = [self.queue.popleft() for _ in range(min(room, len(self.queue)))]
            loads = sum(self._touch(a) for a in dict.fromkeys(r.adapter for r in batch))
            ranks = [r.rank for r in batch]
            tokens = [r.prompt_tokens for r in batch]
            dt = self.perf.prefill_s(len(batch), sum(tokens), max(ranks), sum(a * b for a, b in zip(tokens, ranks)))
            self.prefilling = batch
            self.phase, self.seg_start_s, self.event_s = _PREFILL, t, t + dt + loads * self.cold_start_s
        elif self.running:
            ranks = [r.rank for r in self.running.values()]
            # A fitted model can floor at 0 off its grid; a zero-length step would never advance time.
            self.step_s = max(self.perf.decode_s(len(ranks), max(ranks), sum(ranks)), 1e-6)
            self._batch_shape = (len(ranks), max(ranks))
            self.phase, self.seg_start_s = _DECODE, t
            self.event_k = self.finish_heap[0][0] - self.steps
            self.event_s = t + self.event_k * self.step_s
        else:
            self.phase, self.event_s = _IDLE, math.inf

    def enqueue(self, req: SimRequest, t: float) -> bool:
        """Queues a routed request; returns whether the pending event moved (needs a new heap entry)."""
        self.queue.append(req)
        self._state_dirty = True
        if self.phase == _IDLE:
            self.start_next(t)
            return True
        if self.phase == _DECODE:
            k = int((t - self.seg_start_s) / self.step_s) + 1
            if k < self.event_k:
                self.event_k, self.event_s = k, self.seg_start_s + k * self.step_s
                self.version += 1
                return True
        return False

    def boundary(self, t: float, finished: list[SimRequest], first_token: list[SimRequest]) -> None:
        """The step boundary the pending event marks: retires what ended there, starts what follows."""
        if self.phase == _PREFILL:
            for r in self.prefilling:
                first_token.append(r)
                if r.output_tokens == 1:
                    finished.append(r)
                else:
                    self.running[r.id] = r
                    self.finish_step[r.id] = self.steps + r.output_tokens - 1
                    heapq.heappush(self.finish_heap, (self.finish_step[r.id], r.id))
            self.prefilling = []
        elif self.phase == _DECODE:
            self.steps += self.event_k
            self.decode_steps += self.event_k
            self.step_batch_sum += self.event_k * self._batch_shape[0]
            self.step_max_rank_sum += self.event_k * self._batch_shape[1]
            while self.finish_heap and self.finish_heap[0][0] <= self.steps:
                _, rid = heapq.heappop(self.finish_heap)
                finished.append(self.running.pop(rid))
                del self.finish_step[rid]
        self.start_next(t)


@dataclass(frozen=True)
class Timeline:
    """Per request (indexed by id): when its first token came out and when it finished (seconds)."""

    first_token_s: np.ndarray  # [n] float64
    finish_s: np.ndarray  # [n] float64
    max_router_queue: int
    mean_decode_batch: float = 0.0  # requests per decode step, over all replicas' steps
    mean_decode_max_rank: float = 0.0  # max rank per decode step: what a padded kernel pays for


@dataclass(frozen=True)
class PolicyResult:
    """Outcome of one policy on one workload. Times per token are (finish - arrival) / output tokens."""

    policy: str
    count: int
    slo_attainment: float
    tpt_mean_ms: float
    tpt_p99_ms: float
    ttft_mean_ms: float
    ttft_p99_ms: float
    latency_mean_s: float
    makespan_s: float
    tokens_per_s: float
    max_router_queue: int
    mean_decode_batch: float = 0.0
    mean_decode_max_rank: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def summarize(policy: str, requests: list[SimRequest], tl: Timeline, slo_s: float) -> PolicyResult:
    if not requests:
        return PolicyResult(policy, 0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, tl.max_router_queue)
    arrival = np.array([r.arrival_s for r in requests])
    out = np.array([r.output_tokens for r in requests], dtype=np.float64)
    tpt = (tl.finish_s - arrival) / out
    ttft = tl.first_token_s - arrival
    makespan = float(tl.finish_s.max() - arrival.min())
    return PolicyResult(
        policy=policy, count=len(requests), slo_attainment=float(np.mean(tpt <= slo_s)),
        tpt_mean_ms=float(tpt.mean() * 1e3), tpt_p99_ms=float(np.percentile(tpt, 99) * 1e3),
        ttft_mean_ms=float(ttft.mean() * 1e3), ttft_p99_ms=float(np.percentile(ttft, 99) * 1e3),
        latency_mean_s=float((tl.finish_s - arrival).mean()), makespan_s=makespan,
        tokens_per_s=float(out.sum() / makespan) if makespan > 0 else 0.0, max_router_queue=tl.max_router_queue,
        mean_decode_batch=tl.mean_decode_batch, mean_decode_max_rank=tl.mean_decode_max_rank)


def policy_params(router: RouterConfig, requests: list[SimRequest]) -> PolicyParams:
    avg_out = router.avg_output_tokens or (float(np.mean([r.output_tokens for r in requests])) if requests else 1.0)
    return PolicyParams(slo_s=router.slo_ms / 1e3, avg_output_tokens=max(avg_out, 1.0),
                        resident_discount=router.resident_discount)


def run_policy(policy: Policy, requests: list[SimRequest], cluster: ClusterConfig, perf: PerfModel,
               slo_s: float) -> PolicyResult:
    return summarize(policy.name, requests, timeline(policy, requests, cluster, perf), slo_s)


def timeline(policy: Policy, requests: list[SimRequest], cluster: ClusterConfig, perf: PerfModel) -> Timeline:
    """Simulates `requests` (sorted by arrival, ids 0..n-1) under `policy` until every one has finished."""
    if [r.id for r in requests] != list(range(len(requests))):
        raise ValueError("request ids must be 0..n-1 in arrival order")
    replicas = [_Replica(i, cluster, perf) for i in range(cluster.replicas)]
    n = len(requests)
    first_s = np.full(n, np.nan)
    finish_s = np.full(n, np.nan)
    events: list[tuple[float, int, int, int]] = []  # (time, seq, replica, version)
    seq = 0
    held: deque[SimRequest] = deque()  # the router's own queue while every replica is full
    max_held = 0
    next_arrival = 0

    def route(req: SimRequest, t: float) -> bool:
        nonlocal seq
        states = [rep.state(t) for rep in replicas]
        i = policy.choose(RequestView(req.adapter, req.rank, req.prompt_tokens, req.output_tokens), states)
        if i is None:
            return False
        rep = replicas[i]
        if rep.occupancy >= rep.max_batch_size:
            raise RuntimeError(f"policy {policy.name} chose full replica {i}")
        if rep.enqueue(req, t):
            heapq.heappush(events, (rep.event_s, seq, i, rep.version))
            seq += 1
        return True

    def drain_held(t: float) -> None:
        while held and route(held[0], t):
            held.popleft()

    while next_arrival < n or events:
        if events and (next_arrival >= n or events[0][0] <= requests[next_arrival].arrival_s):
            t, _, i, version = heapq.heappop(events)
            rep = replicas[i]
            if version != rep.version:
                continue
            finished: list[SimRequest] = []
            started: list[SimRequest] = []
            rep.boundary(t, finished, started)
            for r in started:
                first_s[r.id] = t
            for r in finished:
                if not math.isnan(finish_s[r.id]):
                    raise RuntimeError(f"request {r.id} finished twice")
                finish_s[r.id] = t
            if rep.event_s < math.inf:
                heapq.heappush(events, (rep.event_s, seq, i, rep.version))
                seq += 1
            if finished:
                drain_held(t)
        else:
            req = requests[next_arrival]
            next_arrival += 1
            if held or not route(req, req.arrival_s):
                held.append(req)
                max_held = max(max_held, len(held))
    if held or np.isnan(finish_s).any():
        raise RuntimeError(f"{int(np.isnan(finish_s).sum())} requests never finished under {policy.name}")
    steps = sum(rep.decode_steps for rep in replicas)
    return Timeline(first_s, finish_s, max_held, sum(rep.step_batch_sum for rep in replicas) / max(steps, 1),
                    sum(rep.step_max_rank_sum for rep in replicas) / max(steps, 1))


def simulate(cluster: ClusterConfig, workload: WorkloadConfig, router: RouterConfig, policies: list[str],
             perf: PerfModel | None = None) -> dict[str, PolicyResult]:
    """Every policy on the same generated workload; a policy's random stream is seeded by the
    workload's seed and the policy's name (not its position in the list)."""
    perf = perf if perf is not None else load_perf_model(cluster.perf_model)
    requests = generate(workload)
    params = policy_params(router, requests)
    results = {}
    for name in policies:
        policy = make_policy(name, params, np.random.default_rng([workload.seed, zlib.crc32(name.encode())]))
        results[name] = run_policy(policy, requests, cluster, perf, params.slo_s)
        log.info("%s at %.1f rps: SLO attainment %.4f, %.2f ms/token", name, workload.rps,
                 results[name].slo_attainment, results[name].tpt_mean_ms)
    return results
