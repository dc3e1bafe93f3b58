"""Routing policies on hand-made replica states."""

import math

import numpy as np
import pytest

from caraserve.cluster.policies import (
    POLICIES,
    PolicyParams,
    RankAware,
    ReplicaState,
    RequestView,
    make_policy,
)
from caraserve.perf.model import PerfModel

PERF = PerfModel.linear()  # padded kernel: a step costs ~ batch size x max rank
PARAMS = PolicyParams(slo_s=0.040, avg_output_tokens=200)


def req(rank, adapter="x", prompt=100, remaining=200):
    return RequestView(adapter, rank, prompt, remaining)


def replica(ranks, queued=(), max_bs=32, resident=(), perf=PERF, remaining=200, steps=0):
    return ReplicaState(tuple(req(r, remaining=remaining) for r in ranks), tuple(req(r) for r in queued), max_bs,
                        frozenset(resident), perf, steps)


def choose(name, request, replicas, params=PARAMS, seed=0):
    return make_policy(name, params, np.random.default_rng(seed)).choose(request, replicas)


def test_registry_names_every_policy():
    assert set(POLICIES) == {"rank_aware", "random", "round_robin", "first_fit", "most_idle", "dlora"}
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("nope", PARAMS)


def test_rank_aware_differs_from_most_idle_because_of_ranks():
    a = replica([64] * 4)  # fewer requests, all rank 64
    b = replica([8] * 6)  # more requests, all rank 8
    assert choose("most_idle", req(8), [a, b]) == 0
    # A rank-8 request costs A's four requests a rank-64 slot each step; it costs B almost nothing.
    assert choose("rank_aware", req(8), [a, b]) == 1
    # A rank-64 request would re-price every step of B at rank 64: it belongs with A.
    assert choose("rank_aware", req(64), [a, b]) == 0


def test_rank_aware_cost_is_the_papers_formula():
    s = replica([16] * 3, queued=[32])
    r = req(64, prompt=50)
    n = 4
    delta_decode = PERF.decode_s(5, 64, 3 * 16 + 32 + 64) - PERF.decode_s(4, 32, 3 * 16 + 32)
    delta_prefill = PERF.prefill_s(2, 150, 64, 100 * 32 + 50 * 64) - PERF.prefill_s(1, 100, 32, 100 * 32)
    score = RankAware(PARAMS).score(r, 0, s)
    assert score.cost == pytest.approx(n * (delta_prefill / 200 + delta_decode))
    # each of the 5 requests prefilled once per 200 steps, each with its own prompt and rank
    prefills = 3 * PERF.prefill_s(1, 100, 16, 100 * 16) + PERF.prefill_s(1, 100, 32, 100 * 32) \
        + PERF.prefill_s(1, 50, 64, 50 * 64)
    assert score.per_token_s == pytest.approx(PERF.decode_s(5, 64, 3 * 16 + 32 + 64) + prefills / 200)


def test_rank_aware_excludes_replicas_that_would_break_the_slo():
    slow = PerfModel.linear(decode_base_ms=45.0)  # any batch on it is over 40 ms a token
    a = replica([8], perf=slow)
    b = replica([8] * 5)
    assert choose("rank_aware", req(8), [a, b], PolicyParams(slo_s=10.0, avg_output_tokens=200)) == 0
    assert choose("rank_aware", req(8), [a, b]) == 1
    assert RankAware(PARAMS).score(req(8), 0, a).cost == math.inf


def test_rank_aware_falls_back_to_least_per_token_latency_when_all_break_the_slo():
    slow = PerfModel.linear(decode_base_ms=45.0)
    slower = PerfModel.linear(decode_base_ms=60.0)
    a = replica([8], perf=slower)
    b = replica([8] * 10, perf=slow)
    assert choose("rank_aware", req(8), [a, b]) == 1


def test_full_replicas_are_skipped_by_every_policy():
    full = replica([8] * 3, queued=[8], max_bs=4)
    busy = replica([64] * 20)
    for name in POLICIES:
        for seed in range(5):
            assert choose(name, req(8), [full, busy], seed=seed) == 1, name
        assert choose(name, req(8), [full, full]) is None, name


def test_rank_aware_prefers_a_replica_holding_the_adapter():
    a, b = replica([]), replica([], resident={"hot"})
    assert choose("rank_aware", req(8, adapter="hot"), [a, b]) == 1  # tie broken by residency
    assert choose("rank_aware", req(8, adapter="cold"), [a, b]) == 0
    # A discount: the resident replica wins while its cost is within the discount of the other.
    c, d = replica([16] * 10), replica([16] * 11, resident={"hot"})
    sa, sb = RankAware(PARAMS).score(req(16, "hot"), 0, c), RankAware(PARAMS).score(req(16, "hot"), 1, d)
    assert sa.cost < sb.cost / (1 - PARAMS.resident_discount) and sb.cost < sa.cost
    assert choose("rank_aware", req(16, adapter="hot"), [c, d]) == 1
    assert choose("rank_aware", req(16, adapter="hot"), [c, d], PolicyParams(resident_discount=0.0)) == 0


def test_first_fit_packs_the_first_replica_with_room():
    states = [replica([8] * 4, max_bs=4), replica([64] * 3, max_bs=4), replica([])]
    assert choose("first_fit", req(8), states) == 1


def test_most_idle_and_dlora_count_different_things():
    long_few = replica([8] * 2, remaining=900)  # 1800 tokens still to come
    short_many = replica([8] * 5, remaining=50, steps=20)  # 5 x 30 = 150 tokens still to come
    assert choose("most_idle", req(8), [long_few, short_many]) == 0
    assert choose("dlora", req(8), [long_few, short_many]) == 1
    assert short_many.outstanding_tokens == 5 * 30
    # steps since the snapshot shorten the running requests only: a queued one has not started
    assert replica([8], queued=[8, 8], remaining=50, steps=20).outstanding_tokens == 30 + 2 * 200


def test_round_robin_cycles_and_skips_full_replicas():
    states = [replica([]), replica([8], max_bs=1), replica([])]
    policy = make_policy("round_robin", PARAMS)
    assert [policy.choose(req(8), states) for _ in range(4)] == [0, 2, 0, 2]


def test_random_is_seeded_spreads_and_avoids_full():
    states = [replica([]), replica([8], max_bs=1), replica([]), replica([])]
    picks = [choose("random", req(8), states, seed=s) for s in range(60)]
    assert set(picks) == {0, 2, 3}
    policy_a = make_policy("random", PARAMS, np.random.default_rng(5))
    policy_b = make_policy("random", PARAMS, np.random.default_rng(5))
    assert [policy_a.choose(req(8), states) for _ in range(20)] == [policy_b.choose(req(8), states) for _ in range(20)]


def test_policy_params_are_validated():
    with pytest.raises(ValueError):
        PolicyParams(slo_s=0)
    with pytest.raises(ValueError):
        PolicyParams(resident_discount=1.0)
