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


def pending_of(hint: RouteHint, internal: str, future=None):
    """Serve's PendingRequest as the router reads it (its future: what the caller's cancellation
    cancels while the request waits for a replica)."""
    return SimpleNamespace(args=[hint], kwargs={}, metadata=SimpleNamespace(internal_request_id=internal),
                           future=future if future is not None else SimpleNamespace(add_done_callback=lambda f: None))


def choose(router, replicas, rid: str, adapter: str = "a8", attempt: int = 0, internal: str | None = None,
           origin: str = "", requests: int = 1, future=None):
    pending = pending_of(RouteHint(adapter, 16, 32, rid, attempt, origin=origin, requests=requests),
                         internal or f"i-{rid}-{attempt}", future)
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
    # the ingress's retry has an id of its own; the replicas tried are kept under the first one's
    assert choose(router, reps, "x.1", adapter="a64", attempt=1, origin="x") == "r1"
    assert choose(router, reps, "x.2", adapter="a64", attempt=2, origin="x") == "r2"  # both tried: any


def test_a_call_naming_a_target_replica_goes_there_while_it_is_up():
    router = make_router("most_idle")
    reps = [replica("r1", idle()), replica("r2", idle(queued=(RequestView("a8", 8, 1, 1, "z"),) * 3))]
    pending = pending_of(RouteHint("a8", 16, 32, "t", 1, target="r2"), "it")
    assert asyncio.run(router.choose_replicas(reps, pending))[0][0].replica_id.unique_id == "r2"
    gone = pending_of(RouteHint("a8", 16, 32, "u", 1, target="r9"), "iu")
    assert asyncio.run(router.choose_replicas(reps, gone))[0][0].replica_id.unique_id == "r1"


def test_replicas_without_the_adapter_are_skipped_and_fan_outs_go_to_the_others():
    router = make_router("round_robin")
    reps = [replica("r1", EngineState(8, adapters={"a8": 8}, model="tiny")),
            replica("r2", EngineState(8, adapters={"late": 16}, model="tiny"))]
    assert {choose(router, reps, f"l{i}", adapter="late") for i in range(4)} == {"r2"}
    pending = pending_of(RouteHint(covered=frozenset({"r1"})), "f")
    assert [[r.replica_id.unique_id for r in g] for g in asyncio.run(router.choose_replicas(reps, pending))] == [["r2"]]


def test_an_adapter_no_poll_lists_yet_is_routed_with_the_rank_the_ingress_knows():
    """Just after a runtime load the replicas' last states do not list the adapter: its rank
    comes from the hint (the load's answer), not 0 (the base model's)."""
    router = make_router("rank_aware")
    states = [idle(), idle()]
    hint = RouteHint("fresh", 16, 32, "q", rank=32)
    assert router._views(hint, states)[0].rank == 32
    assert router._views(RouteHint("fresh", 16, 32, "q"), states)[0].rank == 0
    assert router._views(RouteHint("a64", 16, 32, "q", rank=8), states)[0].rank == 64  # a poll that lists it wins


def test_a_request_cancelled_before_it_was_sent_stops_counting():
    """A caller gone while its request waited for a replica with room: Serve cancels the
    request's future and calls no hook; the replica chosen for it must not count it for good."""
    router = make_router("most_idle")
    reps = [replica("r1", idle()), replica("r2", idle())]

    async def run():
        waiting = asyncio.get_running_loop().create_future()
        pending = pending_of(RouteHint("a8", 16, 32, "c", 0), "ic", waiting)
        chosen = (await router.choose_replicas(reps, pending))[0][0]
        counted = router.replica_state(chosen).num_requests
        waiting.cancel()
        await asyncio.sleep(0)  # the future's callbacks run
        return counted, router.replica_state(chosen).num_requests

    assert asyncio.run(run()) == (1, 0)


@pytest.mark.parametrize("completion_first", [True, False])
def test_a_rejected_attempt_counts_once_where_serve_sent_it_next(completion_first):
    """A replica at its limit rejects; Serve reports the attempt completed there and routes the
    request again, in either order. It counts on the replica that took it, also after a poll."""
    router = make_router("most_idle")
    reps = [replica("r1", idle()), replica("r2", idle())]
    first = choose(router, reps, "q", internal="iq")
    rejecting = next(r for r in reps if r.replica_id.unique_id == first)
    other = next(r for r in reps if r is not rejecting)
    if completion_first:
        router.on_request_completed(rejecting.replica_id, "iq")
    router.on_request_routed(pending_of(RouteHint("a8", 16, 32, "q"), "iq"), other.replica_id, None)
    if not completion_first:
        router.on_request_completed(rejecting.replica_id, "iq")
    if completion_first:  # routed again after the rejection: Serve asks for a choice first
        router._record("iq", other.replica_id, router._views(RouteHint("a8", 16, 32, "q"), [idle()]))
    assert router.replica_state(other).num_requests == 1 and router.replica_state(rejecting).num_requests == 0
    polled = replica(other.replica_id.unique_id, idle(queued=(RequestView("a8", 8, 16, 32, "q"),)))
    assert router.replica_state(polled).num_requests == 1


def test_a_call_of_n_completions_counts_as_its_n_engine_requests():
    router = make_router("most_idle")
    reps = [replica("r1", idle()), replica("r2", idle())]
    chosen = next(r for r in reps if r.replica_id.unique_id == choose(router, reps, "m", requests=3))
    assert router.replica_state(chosen).num_requests == 3
    # the poll lists the replica's own ids for them (choice c > 0 is request m#c): counted once each
    views = tuple(RequestView("a8", 8, 16, 32, rid) for rid in ("m", "m#1", "m#2"))
    polled = replica(chosen.replica_id.unique_id, idle(queued=views))
    assert router.replica_state(polled).num_requests == 3
