"""RankAwareRequestRouter: the routing policies of caraserve.cluster.policies as a Ray Serve
request router (rank_aware, or any baseline, by name).

Each replica is judged on a `ReplicaState` built, as in the simulator, from two sources:
  - the replica's EngineState, which the replica publishes (`record_routing_stats`) and Serve's
    controller polls every `request_routing_stats_period_s`: running and queued requests with
    their ranks and remaining tokens, resident adapters, the replica's latency model;
  - this router's own accounting between two polls: a request routed here counts as queued on
    its replica (as many engine requests as it makes: n completions of each prompt) until the
    replica's state shows it, and one that completed since no longer counts although the state
    still shows it. So a burst between two polls spreads out instead of landing on the replica
    that looked emptiest at the last poll. A request cancelled before Serve sent it stops
    counting, and an attempt a replica rejected counts where Serve sent the request next.
The request's adapter, prompt and output lengths reach the router as the call's first argument
(a RouteHint). The ranking is the policy's choice first, then the others from the least loaded
(Serve tries them in that order when one's queue is full); ties are broken at random (the
replicas are shuffled first) except for policies whose order is the policy (first_fit,
round_robin), which see the replicas sorted by id. A retry of a request (hint.attempt > 0, an
id of its own, hint.origin the first's) is kept off the replicas already tried while others
are up; a call naming a target replica goes there while it is up. Each decision is logged
(logger `ray.serve.caraserve`, so it lands in the ingress replica's Serve log).
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from dataclasses import replace
from typing import Any

import numpy as np
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from caraserve.cluster.policies import PolicyParams, ReplicaState, make_policy, ranking
from caraserve.perf.model import PerfModel
from caraserve.ray_serve.messages import RouteHint
from caraserve.state import EngineState, RequestView

log = logging.getLogger("ray.serve.caraserve")

DEFAULT_MAX_BATCH = 32  # a replica whose state has not been polled yet
_REMEMBERED = 4096  # finished / tried request ids kept (they matter for a few polls at most)


class _Bounded(OrderedDict):
    def remember(self, key, value=None):
        self[key] = value
        self.move_to_end(key)
        while len(self) > _REMEMBERED:
            self.popitem(last=False)


class RankAwareRequestRouter(RequestRouter):
    def initialize_state(self, policy: str = "rank_aware", slo_ms: float = 40.0, avg_output_tokens: float = 64.0,
                         resident_discount: float = 0.1, perf_model: str = "", seed: int = 0, max_calls: int = 0,
                         **_: Any) -> None:
        self.rng = np.random.default_rng(seed)
        self.max_calls = max_calls  # a replica's completion calls at once (cluster.max_ongoing_requests; 0: no limit)
        self.policy = make_policy(policy, PolicyParams(slo_ms / 1e3, avg_output_tokens, resident_discount),
                                  np.random.default_rng(seed + 1))
        self.fallback = PerfModel.load(perf_model, "router.perf_model") if perf_model else PerfModel.linear()
        self._parsed: dict[ReplicaID, tuple[dict, EngineState]] = {}  # the stats dict last parsed, its state
        self._routed: dict[str, tuple[ReplicaID, tuple[RequestView, ...]]] = {}  # Serve's internal id -> where, what
        self._on: dict[ReplicaID, dict[str, RequestView]] = {}  # replica -> request id -> view
        self._finished = _Bounded()  # request ids completed since (maybe) the last poll
        self._tried: _Bounded = _Bounded()  # request id -> replicas chosen for it

    # ---- state --------------------------------------------------------------------------------

    def _engine_state(self, replica: RunningReplica) -> EngineState | None:
        stats = replica.routing_stats
        if not stats:
            return None
        cached = self._parsed.get(replica.replica_id)
        if cached is not None and cached[0] is stats:  # (held, so no later dict can share its address)
            return cached[1]
        try:
            state = EngineState.from_dict(stats)
        except (KeyError, ValueError, TypeError) as e:
            log.warning("replica %s published a malformed state (%s): judged as empty", replica.replica_id, e)
            return None
        self._parsed[replica.replica_id] = (stats, state)
        return state

    def replica_state(self, replica: RunningReplica) -> ReplicaState:
        state = self._engine_state(replica) or EngineState(DEFAULT_MAX_BATCH)
        seen: set[str] = set()

        def live(views: tuple[RequestView, ...]) -> tuple[RequestView, ...]:
            seen.update(v.request_id for v in views)
            return tuple(v for v in views if v.request_id not in self._finished)

        state = replace(state, running=live(state.running), queued=live(state.queued))
        sent = tuple(v for rid, v in self._on.get(replica.replica_id, {}).items() if rid not in seen)
        return ReplicaState.of(state, self.fallback, sent)

    def _views(self, hint: RouteHint, states: list[EngineState | None]) -> tuple[RequestView, ...]:
        """The engine requests the call makes, under the ids the replica gives them (a call's
        choice c > 0 is request `{id}#{c}`), so that a poll listing them replaces them."""
        known = [s for s in states if s is not None]
        base = any(hint.adapter == s.model for s in known)
        adapter = "" if base else hint.adapter
        rank = 0 if base else next((s.adapters[hint.adapter] for s in known if hint.adapter in s.adapters), hint.rank)
        ids = [hint.request_id] + [f"{hint.request_id}#{c}" for c in range(1, max(1, hint.requests))]
        return tuple(RequestView(adapter, rank, hint.prompt_tokens, hint.max_tokens, rid) for rid in ids)

    # ---- choice -------------------------------------------------------------------------------

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        hint = pending_request.args[0] if pending_request is not None and pending_request.args else None
        if not isinstance(hint, RouteHint) or not candidate_replicas:
            return [candidate_replicas]
        if hint.covered is not None:  # a fan-out: the replicas not done yet, else any (it is skipped there)
            left = [r for r in candidate_replicas if r.replica_id.unique_id not in hint.covered]
            return [left or candidate_replicas]
        candidates = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        if hint.target:
            candidates = [r for r in candidates if r.replica_id.unique_id == hint.target] or candidates
        origin = hint.origin or hint.request_id  # retries have ids of their own
        tried = self._tried.get(origin) or set()
        if hint.attempt > 0:
            candidates = [r for r in candidates if r.replica_id not in tried] or candidates
        if self.policy.order_breaks_ties:
            candidates = [candidates[i] for i in self.rng.permutation(len(candidates))]
        engine_states = [self._engine_state(r) for r in candidates]
        serving = [i for i, s in enumerate(engine_states)
                   if s is None or hint.adapter == s.model or hint.adapter in s.adapters]
        if serving and len(serving) < len(candidates):  # only replicas that serve the model
            candidates = [candidates[i] for i in serving]
            engine_states = [engine_states[i] for i in serving]
        views = self._views(hint, engine_states)
        view = views[0]
        states = [self.replica_state(r) for r in candidates]
        order = self._with_room_first(ranking(self.policy, view, states), candidates)
        chosen = candidates[order[0]]
        internal_id = pending_request.metadata.internal_request_id
        self._record(internal_id, chosen.replica_id, views)
        # A request cancelled while it waits for a replica with room is never sent, and Serve
        # tells no hook: its future's cancellation is the only sign.
        pending_request.future.add_done_callback(lambda f: self._forget(internal_id) if f.cancelled() else None)
        self._tried.remember(origin, tried | {chosen.replica_id})
        log.info("routing decision: request=%s attempt=%d adapter=%s rank=%d policy=%s replica=%s "
                 "load=%s", hint.request_id, hint.attempt, view.adapter or "-", view.rank, self.policy.name,
                 chosen.replica_id.unique_id, [s.num_requests for s in states])
        return [[candidates[i]] for i in order]

    def _with_room_first(self, order: list[int], candidates: list[RunningReplica]) -> list[int]:
        """A replica at max_calls refuses one more (503) although Serve, whose own limit leaves room
        for probes, would send it: the others come first, in the policy's order."""
        if not self.max_calls:
            return order
        calls = Counter(where for where, _ in self._routed.values())
        room = [i for i in order if calls[candidates[i].replica_id] < self.max_calls]
        return room + [i for i in order if i not in room]

    # ---- accounting ---------------------------------------------------------------------------

    def _record(self, internal_id: str, replica_id: ReplicaID, views: tuple[RequestView, ...]) -> None:
        self._forget(internal_id)  # chosen again (its first choice was full): it goes where chosen now
        self._routed[internal_id] = (replica_id, views)
        on = self._on.setdefault(replica_id, {})
        for v in views:
            on[v.request_id] = v
            self._finished.pop(v.request_id, None)  # re-routed after a rejection: not finished

    def _forget(self, internal_id: str) -> tuple[RequestView, ...]:
        where = self._routed.pop(internal_id, None)
        if where is None:
            return ()
        replica_id, views = where
        on = self._on.get(replica_id, {})
        for v in views:
            on.pop(v.request_id, None)
        return views

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        where = self._routed.get(pending_request.metadata.internal_request_id)
        if where is not None and where[0] != replica_id:  # Serve sent it to a fallback
            self._record(pending_request.metadata.internal_request_id, replica_id, where[1])

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        where = self._routed.get(internal_request_id)
        if where is None or where[0] != replica_id:
            return  # an attempt a replica rejected, the request re-routed elsewhere since
        for v in self._forget(internal_request_id):
            self._finished.remember(v.request_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        for rid in list(self._on.pop(replica_id, {})):
            self._finished.remember(rid)
        self._parsed.pop(replica_id, None)
