"""Priority scheduling cases beyond the main tests': requests of one
call (one priority, one arrival) keep their order, FCFS refuses a negative priority too, a
preempted request goes back to its place by priority (not the queue's head), a request in this
step's prefill is not preempted, the KV watermark once every running request is preempted, a
cached prefix only victims hold, a request that does not fit holds back lower priorities behind
it, and the SLO judged without the victims."""

from __future__ import annotations

import json
import time

import pytest
from test_priority import PROMPTS, engine, params, run

from caraserve.config import AdapterConfig, EngineConfig, SchedulerConfig
from caraserve.engine import Engine
from caraserve.request import RequestError, SamplingParams


def alone(prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    """Each prompt's greedy tokens, run with room for all."""
    return [r.output_ids for r in engine("fcfs").generate(
        prompts, [params(max_tokens=m) for m in max_tokens])]


def test_requests_of_one_priority_and_arrival_are_admitted_as_they_were_added():
    """A call's requests share its arrival time: they go in the order they were added, as FCFS."""
    e = engine(max_batch_size=1)
    at = time.perf_counter()
    ids = [e.add_request(p, params(2, max_tokens=2), arrival_s=at) for p in PROMPTS[:4]]
    assert run(e) == ids


def test_fcfs_refuses_a_negative_priority_too():
    e = engine("fcfs")
    with pytest.raises(RequestError, match=r"priority=-1: .*scheduler\.policy=priority"):
        e.add_request([1, 2, 3], params(priority=-1))
    assert not e.has_unfinished()


def test_a_preempted_request_waits_behind_the_higher_priorities_waiting():
    """L (9) is preempted for H0 (0); W (5), which arrived with H0 and could preempt no one,
    waits ahead of L and takes the first free place: L is preempted once, not again by W.
    (Without rank grouping, whose admission order sorts by priority anew, the queue's order is
    the admission order.)"""
    e = Engine(EngineConfig(device="cpu", compile="false", adapters=AdapterConfig(dir="none"), max_batch_size=2,
                            scheduler=SchedulerConfig(policy="priority", rank_grouping=False)))
    h1 = e.add_request(PROMPTS[3], params(1, max_tokens=4))
    low = e.add_request(PROMPTS[1], params(9, max_tokens=20))
    e.step()
    e.step()
    h0 = e.add_request(PROMPTS[2], params(0, max_tokens=16))
    w = e.add_request(PROMPTS[0], params(5, max_tokens=4))
    reqs = {rid: e.request(rid) for rid in (h1, low, h0, w)}
    admitted = run(e)
    assert admitted == [h0, w, low], admitted
    assert reqs[low].preemptions == 1 and e.scheduler.num_preemptions == 1
    want = alone([PROMPTS[3], PROMPTS[1], PROMPTS[2], PROMPTS[0]], [4, 20, 16, 4])
    assert [reqs[rid].output_ids for rid in (h1, low, h0, w)] == want


def test_a_request_in_this_steps_prefill_is_not_preempted():
    """L's prompt takes two steps (16 tokens a step): H, arriving after the first, waits for L's
    second chunk to be computed, preempts it in the next step, and both end as alone."""
    e = engine(max_batch_size=1, max_tokens_per_step=16)
    low = e.add_request(list(range(100, 120)), params(9, max_tokens=6))
    e.step()
    high = e.add_request(PROMPTS[1], params(0, max_tokens=6))
    reqs = {rid: e.request(rid) for rid in (low, high)}
    e.step()
    assert reqs[low].num_computed == 20 and reqs[low].preemptions == 0 and not reqs[high].output_ids
    run(e)
    assert reqs[low].preemptions == 1
    assert [reqs[rid].output_ids for rid in (low, high)] == alone([list(range(100, 120)), PROMPTS[1]], [6, 6])
    assert all(r.finish_reason.name == "LENGTH" for r in reqs.values())


def test_preempting_every_running_request_keeps_no_watermark():
    """H needs all 8 KV blocks: with L, the only one running, preempted, nothing else runs, so
    no watermark is kept (as a lone request always starts) and H runs at once."""
    e = engine(kv_block_size=4, num_kv_blocks=8, max_batch_size=4, max_seq_len=32)
    low = e.add_request([1, 2, 3, 4, 5], params(9, max_tokens=12))
    e.step()
    high = e.add_request(list(range(10, 40)), params(0, max_tokens=2))  # 30 tokens: 8 blocks
    reqs = {rid: e.request(rid) for rid in (low, high)}
    e.step()
    assert reqs[low].preemptions == 1 and reqs[high].output_ids
    run(e)
    assert [reqs[rid].output_ids for rid in (low, high)] == alone([[1, 2, 3, 4, 5], list(range(10, 40))], [12, 2])
    assert e.kv.free_blocks == 8


def test_a_cached_prefix_only_the_victims_hold_counts_as_taken():
    """H's prompt starts with L's (4 cached blocks, held by L only). Preempting L frees 5 blocks,
    but 4 of them are H's prefix, which H then takes: too few are left for the rest of its
    prompt, so L is not preempted and H waits for T to end; every request ends as alone."""
    e = Engine(EngineConfig(device="cpu", compile="false", adapters=AdapterConfig(dir="none"), prefix_caching=True,
                            kv_block_size=4, num_kv_blocks=10, max_batch_size=8, max_seq_len=40,
                            scheduler=SchedulerConfig(policy="priority")))
    prefix = list(range(200, 216))
    top = e.add_request(list(range(100, 113)), params(0, max_tokens=3))
    low = e.add_request(prefix, params(9, max_tokens=8))
    e.step()
    e.step()
    assert e.kv.free_blocks == 1
    high = e.add_request(prefix + list(range(300, 312)), params(5, max_tokens=4))
    reqs = {rid: e.request(rid) for rid in (top, low, high)}
    run(e)
    assert e.scheduler.num_preemptions == 0
    assert all(r.finish_reason.name == "LENGTH" for r in reqs.values()), [r.error for r in reqs.values()]
    assert [reqs[rid].output_ids for rid in (top, low, high)] == alone(
        [list(range(100, 113)), prefix, prefix + list(range(300, 312))], [3, 8, 4])


def test_a_request_that_does_not_fit_holds_back_the_lower_priorities_behind_it():
    """M (5) needs more KV blocks than are free and can preempt no one; S (6), small enough to
    fit, still waits behind it (it would overtake it again and again): M goes first."""
    e = engine(kv_block_size=4, num_kv_blocks=8, max_batch_size=8, max_seq_len=32)
    top = e.add_request(list(range(20, 37)), params(0, max_tokens=4))  # 17 + 4 positions: 5-6 blocks
    e.step()
    mid = e.add_request(list(range(40, 51)), params(5, max_tokens=2))  # 11 tokens: 3 blocks
    small = e.add_request([1, 2, 3], params(6, max_tokens=2))  # 1 block
    e.step()
    reqs = [e.request(rid) for rid in (top, mid, small)]
    assert reqs[1].state.name == reqs[2].state.name == "WAITING"
    assert run(e) == [mid, small] and e.scheduler.num_preemptions == 0
    assert all(r.finish_reason.name == "LENGTH" for r in reqs)


def test_the_slo_is_judged_without_the_requests_a_higher_priority_preempts(tmp_path):
    """Decode is predicted at 2 ms + 1 ms a row, the SLO 4.5 ms: two rows fit, three do not. With
    A (0) and L (9) running, H (1) preempts L and runs beside A (two rows), at once."""
    from caraserve.perf.model import PerfModel

    model = PerfModel.linear(decode_base_ms=2.0, decode_per_request_ms=1.0, decode_per_rank_request_ms=0.0,
                             prefill_base_ms=1.0, prefill_per_token_ms=0.01, prefill_per_token_rank_ms=0.0)
    path = tmp_path / "latency.json"
    path.write_text(json.dumps({"model": model.to_dict()}))
    e = Engine(EngineConfig(device="cpu", compile="false", adapters=AdapterConfig(dir="none"), max_batch_size=2,
                            scheduler=SchedulerConfig(policy="priority", slo_ms=4.5, perf_model=str(path))))
    sp = dict(max_tokens=4, temperature=0, ignore_eos=True)
    a = e.add_request(PROMPTS[0], SamplingParams(**sp, priority=0))
    low = e.add_request(PROMPTS[1], SamplingParams(**sp, priority=9))
    e.step()  # their prefill (no decode step observed yet: the predictions are the model's)
    high = e.add_request(PROMPTS[2], SamplingParams(**sp, priority=1))
    e.step()
    assert e.request(low).preemptions == 1 and e.request(high).output_ids
    assert {r.request_id for r in e.scheduler.running} == {a, high}
