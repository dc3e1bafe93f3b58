"""RankAwareRequestRouter without a Ray instance: its choices over fake replicas whose published
states are stale, its own accounting between polls, retries kept off tried replicas."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

pytest.importorskip("ray")

from ray.serve._private.common import DeploymentHandleSource, DeploymentID  # noqa: E402
from ray.serve.request_router import ReplicaID  # noqa: E402

from caraserve.ray_serve.messages import RouteHint  # noqa: E402
from caraserve.ray_serve.request_router import RankAwareRequestRouter  # noqa: E402
from caraserve.state import EngineState, RequestView  # noqa: E402

DEPLOYMENT = DeploymentID(name="EngineReplica", app_name="test")


def replica(uid: str, state: EngineState | None):
    return SimpleNamespace(replica_id=ReplicaID(uid, DEPLOYMENT), routing_stats=state.to_dict() if state else {})


def idle(**kw) -> EngineState:
    return EngineState(8, adapters={"a8": 8, "a64": 64}, model="tiny", **kw)


def make_router(policy: str) -> RankAwareRequestRouter:
    async def build():
        r = RankAwareRequestRouter(DEPLOYMENT, DeploymentHandleSource.UNKNOWN)
        r.initialize_state(policy=policy, slo_ms=1000.0, seed=0)
        return r

    return asyncio.run(build())


def choose(router, replicas, rid: str, adapter: str = "a8", attempt: int = 0, internal: str | None = None):
    pending = SimpleNamespace(args=[RouteHint(adapter, 16, 32, rid, attempt)], kwargs={},
                              metadata=SimpleNamespace(internal_request_id=internal or f"i-{rid}-{attempt}"))
    groups = asyncio.run(router.choose_replicas(replicas, pending))
    assert all(len(g) == 1 for g in groups) and 1 <= len(groups) <= len(replicas)
    return groups[0][0].replica_id.unique_id


@pytest.mark.parametrize("policy", ["rank_aware", "most_idle", "dlora"])
def test_a_burst_between_two_polls_spreads_over_the_replicas(policy):
    router = make_router(policy)
    reps = [replica("r1", idle()), replica("r2", idle())]  # the stats never change: a burst within one poll
    chosen = [choose(router, reps, f"q{i}") for i in range(10)]
    assert sorted(chosen.count(u) for u in ("r1", "r2")) == [5, 5]
    assert router.replica_state(reps[0]).num_requests == 5


def test_completed_requests_stop_counting_even_while_the_stale_state_lists_them():
    router = make_router("most_idle")
    queued = (RequestView("a8", 8, 16, 32, "q0"),)
    reps = [replica("r1", idle()), replica("r2", idle(running=(RequestView("a8", 8, 4, 9, "other"),)))]
    assert choose(router, reps, "q0", internal="i0") == "r1"
    reps[0] = replica("r1", idle(queued=queued))  # the next poll shows it: counted once, not twice
    assert router.replica_state(reps[0]).num_requests == 1
    router.on_request_completed(reps[0].replica_id, "i0")  # done, though the state still lists it
    assert router.replica_state(reps[0]).num_requests == 0
    router.on_replica_actor_died(reps[1].replica_id)
    assert router.replica_state(reps[1]).num_requests == 1  # another router's request, still in its state


def test_rank_aware_prefers_the_replica_holding_the_adapter_and_retries_go_elsewhere():
    router = make_router("rank_aware")
    reps = [replica("r1", idle()), replica("r2", idle(resident_adapters=frozenset({"a64"})))]
    assert choose(router, reps, "x", adapter="a64", internal="ix") == "r2"
    router.on_request_completed(reps[1].replica_id, "ix")
    assert choose(router, reps, "x.1", adapter="a64", attempt=1) == "r2"  # a new id: nothing tried yet
    router._tried.remember("y", {reps[1].replica_id})
    assert choose(router, reps, "y", adapter="a64", attempt=1) == "r1"


def test_a_call_naming_a_target_replica_goes_there_while_it_is_up():
    router = make_router("most_idle")
    reps = [replica("r1", idle()), replica("r2", idle(queued=(RequestView("a8", 8, 1, 1, "z"),) * 3))]
    hint = RouteHint("a8", 16, 32, "t", 1, target="r2")
    pending = SimpleNamespace(args=[hint], kwargs={}, metadata=SimpleNamespace(internal_request_id="it"))
    assert asyncio.run(router.choose_replicas(reps, pending))[0][0].replica_id.unique_id == "r2"
    gone = SimpleNamespace(args=[RouteHint("a8", 16, 32, "u", 1, target="r9")], kwargs={},
                           metadata=SimpleNamespace(internal_request_id="iu"))
    assert asyncio.run(router.choose_replicas(reps, gone))[0][0].replica_id.unique_id == "r1"


def test_replicas_without_the_adapter_are_skipped_and_fan_outs_go_to_the_others():
    router = make_router("round_robin")
    reps = [replica("r1", EngineState(8, adapters={"a8": 8}, model="tiny")),
            replica("r2", EngineState(8, adapters={"late": 16}, model="tiny"))]
    assert {choose(router, reps, f"l{i}", adapter="late") for i in range(4)} == {"r2"}
    pending = SimpleNamespace(args=[RouteHint(covered=frozenset({"r1"}))], kwargs={},
                              metadata=SimpleNamespace(internal_request_id="f"))
    assert [[r.replica_id.unique_id for r in g] for g in asyncio.run(router.choose_replicas(reps, pending))] == [["r2"]]


def test_an_adapter_no_poll_lists_yet_is_routed_with_the_rank_the_ingress_knows():
    """Just after a runtime load the replicas' last states do not list the adapter: its rank
    comes from the hint (the load's answer), not 0 (the base model's)."""
    router = make_router("rank_aware")
    states = [idle(), idle()]
    hint = RouteHint("fresh", 16, 32, "q", rank=32)
    assert router._view(hint, states).rank == 32
    assert router._view(RouteHint("fresh", 16, 32, "q"), states).rank == 0
    assert router._view(RouteHint("a64", 16, 32, "q", rank=8), states).rank == 64  # a poll that lists it wins
