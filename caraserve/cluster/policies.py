"""Routing policies: which replica a new request goes to.

Every policy answers `choose(request, replicas) -> index | None` from a snapshot of each replica
(`ReplicaState`). A replica is full when its running plus queued requests reach its max batch
size; every policy skips full replicas, so policies differ only in where they place a request,
never in how much they admit. None means every replica is full: the caller holds the request
and asks again when a slot frees.

`rank_aware` is CaraServe's policy (paper, mechanism D); the rest are the paper's baselines.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, NamedTuple

import numpy as np

from caraserve.perf.model import PerfModel
from caraserve.state import EngineState, RequestView


@dataclass(frozen=True)
class ReplicaState:
    """A snapshot of one replica. running includes requests being prefilled now; queued are
    admitted to the replica but wait for its next step boundary to be prefilled.

    steps_since_snapshot: decode steps the replica has run since the running views' remaining
    tokens were recorded (a simulator refreshes this cheaply instead of rebuilding every view).
    """

    running: tuple[RequestView, ...]
    queued: tuple[RequestView, ...]
    max_batch_size: int
    resident_adapters: frozenset[str]
    perf: PerfModel
    steps_since_snapshot: int = 0

    @classmethod
    def of(cls, state: EngineState, fallback: PerfModel, extra_queued: tuple[RequestView, ...] = ()) -> ReplicaState:
        """A replica as its engine state shows it (judged with `fallback` when it publishes no
        latency model), plus requests a router sent it since that state was taken."""
        return cls(state.running, state.queued + extra_queued, state.max_batch_size, state.resident_adapters,
                   state.perf_model or fallback)

    @cached_property
    def num_requests(self) -> int:
        return len(self.running) + len(self.queued)

    @property
    def has_room(self) -> bool:
        return self.num_requests < self.max_batch_size

    @cached_property
    def batch(self) -> tuple[int, int, int]:
        """(batch size, max rank, sum of ranks) of the decode batch once the queue is prefilled."""
        ranks = [v.rank for v in self.running] + [v.rank for v in self.queued]
        return len(ranks), max(ranks, default=0), sum(ranks)

    @cached_property
    def queue_prefill(self) -> tuple[int, int, int, int]:
        """(requests, prompt tokens, max rank, sum of tokens * rank) of the next prefill."""
        q = self.queued
        return (len(q), sum(v.prompt_tokens for v in q), max((v.rank for v in q), default=0),
                sum(v.prompt_tokens * v.rank for v in q))

    @cached_property
    def prefills_s(self) -> float:
        """Seconds of prefilling each running and queued request once, alone (what the SLO
        check amortises over the output length)."""
        perf = self.perf
        return sum(perf.prefill_s(1, v.prompt_tokens, v.rank, v.prompt_tokens * v.rank)
                   for v in (*self.running, *self.queued))

    @cached_property
    def outstanding_tokens(self) -> int:
        """Output tokens still to generate over running and queued requests."""
        k = self.steps_since_snapshot
        return sum(max(v.remaining_tokens - k, 0) for v in self.running) + sum(v.remaining_tokens for v in self.queued)


@dataclass(frozen=True)
class PolicyParams:
    """slo_s: per-token latency target (end-to-end latency / output tokens).
    avg_output_tokens: the router's estimate of a request's output length (it cannot know it).
    resident_discount: fraction taken off rank_aware's cost on replicas that hold the adapter."""

    slo_s: float = 0.040
    avg_output_tokens: float = 200.0
    resident_discount: float = 0.1

    def __post_init__(self):
        if self.slo_s <= 0:
            raise ValueError(f"slo_s={self.slo_s} must be > 0")
        if self.avg_output_tokens < 1:
            raise ValueError(f"avg_output_tokens={self.avg_output_tokens} must be >= 1")
        if not 0 <= self.resident_discount < 1:
            raise ValueError(f"resident_discount={self.resident_discount} must be in [0, 1)")


def open_replicas(replicas: Sequence[ReplicaState]) -> list[int]:
    return [i for i, s in enumerate(replicas) if s.has_room]


class Policy:
    """Base of every policy; subclasses implement choose()."""

    name: ClassVar[str] = ""
    # Whether the replicas' order only breaks ties (a router may then shuffle it to break them at
    # random); False where the order is the policy (first_fit, round_robin).
    order_breaks_ties: ClassVar[bool] = True

    def __init__(self, params: PolicyParams, rng: np.random.Generator | None = None):
        self.params = params
        self.rng = rng if rng is not None else np.random.default_rng(0)

    def choose(self, request: RequestView, replicas: Sequence[ReplicaState]) -> int | None:
        raise NotImplementedError


class RankAwareScore(NamedTuple):
    """rank_aware's view of one replica for one request; its order is the preference order."""

    cost: float
    not_resident: bool
    per_token_s: float
    index: int


class RankAware(Policy):
    """CaraServe: route to argmin over replicas s of

        cost(s) = n(s) * (delta_prefill(s) / avg_output_tokens + delta_decode(s))

    n(s): requests already on s (running + queued); delta_decode: how much one decode step of s
    grows when the request joins its batch (rank-aware through the perf model: a rank-64 request
    joining rank-8 requests re-prices every step at rank 64 on a padded kernel); delta_prefill:
    how much the prefill s is about to run grows, amortised over the output length, since the
    prefill stalls the decode of the n requests already there.

    A replica whose predicted per-token latency with the request exceeds the SLO costs infinity.
    That prediction is the steady state of s with the request: one decode step of the enlarged
    batch plus the prefills that interrupt it, each of its n + 1 requests (each its own prompt)
    being prefilled once per avg_output_tokens steps:
    decode(s + r) + (sum of prefill(q) over s's requests q + prefill(r)) / avg_output_tokens.
    If every open replica breaks the SLO, the request goes where that prediction is least.
    Replicas holding the request's adapter get `resident_discount` off their cost and win ties
    (an adapter load is avoided), then the lower predicted per-token latency, then the index.
    """

    name = "rank_aware"

    def score(self, request: RequestView, index: int, s: ReplicaState) -> RankAwareScore:
        perf, r, p = s.perf, request.rank, request.prompt_tokens
        avg_out = self.params.avg_output_tokens
        n, max_rank, sum_ranks = s.batch
        decode_with = perf.decode_s(n + 1, max(max_rank, r), sum_ranks + r)
        delta_decode = decode_with - perf.decode_s(n, max_rank, sum_ranks)
        qn, qt, qmax, qtr = s.queue_prefill
        delta_prefill = perf.prefill_s(qn + 1, qt + p, max(qmax, r), qtr + p * r) - perf.prefill_s(qn, qt, qmax, qtr)
        per_token = decode_with + (s.prefills_s + perf.prefill_s(1, p, r, p * r)) / avg_out
        resident = request.adapter in s.resident_adapters
        cost = n * (delta_prefill / avg_out + delta_decode)
        if per_token > self.params.slo_s:
            cost = math.inf
        elif resident:
            cost *= 1 - self.params.resident_discount
        return RankAwareScore(cost, not resident, per_token, index)

    def choose(self, request: RequestView, replicas: Sequence[ReplicaState]) -> int | None:
        scores = [self.score(request, i, s) for i, s in enumerate(replicas) if s.has_room]
        if not scores:
            return None
        best = min(scores)
        if best.cost < math.inf:
            return best.index
        return min(scores, key=lambda sc: (sc.per_token_s, sc.index)).index


class RandomChoice(Policy):
    """Uniformly random among replicas with room (the rng is the caller's, seeded)."""

    name = "random"

    def choose(self, request, replicas):
        open_ = open_replicas(replicas)
        return open_[int(self.rng.integers(len(open_)))] if open_ else None


class RoundRobin(Policy):
    """The next replica with room after the last one chosen."""

    name = "round_robin"
    order_breaks_ties = False

    def __init__(self, params, rng=None):
        super().__init__(params, rng)
        self._next = 0

    def choose(self, request, replicas):
        n = len(replicas)
        for k in range(n):
            i = (self._next + k) % n
            if replicas[i].has_room:
                self._next = (i + 1) % n
                return i
        return None


class FirstFit(Policy):
    """Punica: the first replica (in index order) with room; packs replicas to their max batch."""

    name = "first_fit"
    order_breaks_ties = False

    def choose(self, request, replicas):
        open_ = open_replicas(replicas)
        return open_[0] if open_ else None


class MostIdle(Policy):
    """The replica with the fewest requests (running + queued)."""

    name = "most_idle"

    def choose(self, request, replicas):
        open_ = open_replicas(replicas)
        return min(open_, key=lambda i: (replicas[i].num_requests, i)) if open_ else None


class DLora(Policy):
    """dLoRA-style: the replica with the fewest outstanding output tokens. It reads each
    request's true remaining tokens, an oracle no real router has, so it errs in the
    baseline's favour."""

    name = "dlora"

    def choose(self, request, replicas):
        open_ = open_replicas(replicas)
        return min(open_, key=lambda i: (replicas[i].outstanding_tokens, i)) if open_ else None


POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (RankAware, RandomChoice, RoundRobin, FirstFit, MostIdle, DLora)
}


def ranking(policy: Policy, request: RequestView, replicas: Sequence[ReplicaState]) -> list[int]:
    """Every replica's index, the policy's choice first, then the rest from the least loaded
    (fallbacks for a router whose first choice turns out to be full); with no choice (every
    replica full by the states), all of them from the least loaded."""
    first = policy.choose(request, replicas)
    rest = sorted((i for i in range(len(replicas)) if i != first), key=lambda i: (replicas[i].num_requests, i))
    return rest if first is None else [first, *rest]


def make_policy(name: str, params: PolicyParams, rng: np.random.Generator | None = None) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; known: {sorted(POLICIES)}")
    return POLICIES[name](params, rng)
