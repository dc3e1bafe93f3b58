"""Priority scheduling (scheduler.policy=priority, vLLM's --scheduling-policy priority): the queue
is served by each request's priority (lower first), then arrival; a request that finds no room
preempts running requests of a strictly lower priority; KV pressure preempts the lowest priority
first. Preempted requests recompute to the same tokens. FCFS engines refuse a priority by name."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from test_server_hardening import in_process_server

from caraserve.config import AdapterConfig, EngineConfig, SchedulerConfig, ServerConfig
from caraserve.config_checks import ConfigError
from caraserve.engine import Engine
from caraserve.offline import parse_line
from caraserve.request import RequestError, SamplingParams


def engine(policy: str = "priority", **kw) -> Engine:
    kw.setdefault("compile", "false")
    return Engine(EngineConfig(device="cpu", adapters=AdapterConfig(dir="demo", preload="host"),
                               scheduler=SchedulerConfig(policy=policy), **kw))


def params(priority: int = 0, max_tokens: int = 12) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, priority=priority)


PROMPTS = [[1, 5, 9, 13, 17, 21, 25], [1, 7, 300], [1, 44, 45, 46, 47], [1, 90], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
ADAPTERS = ["demo-r16", None, "demo-r64", "demo-r8", "demo-r16"]


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    """Each prompt's greedy tokens with room for all (no queueing, no preemption)."""
    return [r.output_ids for r in engine("fcfs").generate(PROMPTS, params(), ADAPTERS)]


def run(e: Engine, on_step=None) -> list[str]:
    """Steps until done; the request ids in the order they were admitted (again after a preemption)."""
    admitted = []
    while e.has_unfinished():
        before = {r.request_id for r in e.scheduler.running}
        e.step()
        admitted += [r.request_id for r in e.scheduler.running if r.request_id not in before]
        if on_step:
            on_step()
    return admitted


def test_fcfs_refuses_a_priority_and_a_bad_policy_is_named():
    e = engine("fcfs")
    with pytest.raises(RequestError, match=r"priority=2: .*scheduler\.policy=priority"):
        e.add_request([1, 2, 3], params(priority=2))
    assert not e.has_unfinished()
    e.add_request([1, 2, 3], params(priority=0))  # the neutral value is taken
    with pytest.raises(ConfigError, match="scheduler.policy='lifo' must be one of fcfs|priority"):
        SchedulerConfig(policy="lifo")
    with pytest.raises(RequestError, match="priority must be an integer"):
        SamplingParams(priority=1.5)
    with pytest.raises(RequestError, match="priority must be an integer"):
        SamplingParams(priority=True)


def test_the_queue_is_served_by_priority_then_arrival(reference):
    e = engine(max_batch_size=1)
    prios = [3, 1, 2, 1, -4]
    ids = [e.add_request(p, params(prio), a) for p, prio, a in zip(PROMPTS, prios, ADAPTERS)]
    reqs = [e.request(rid) for rid in ids]
    assert run(e) == [ids[4], ids[1], ids[3], ids[2], ids[0]]
    assert [r.output_ids for r in reqs] == reference
    assert e.scheduler.num_preemptions == 0


def test_fcfs_keeps_arrival_order_whatever_was_asked():
    e = engine("fcfs", max_batch_size=1)
    ids = [e.add_request(p, params(), a) for p, a in zip(PROMPTS, ADAPTERS)]
    assert run(e) == ids


def test_a_higher_priority_arrival_preempts_the_lowest_when_the_batch_is_full(reference):
    """The batch (2 rows) is full of priorities 5 and 7: a priority-0 arrival preempts the 7 (not
    the younger 5), runs at once, and every request ends with the tokens it has alone."""
    e = engine(max_batch_size=2)
    low = e.add_request(PROMPTS[0], params(7), ADAPTERS[0])
    mid = e.add_request(PROMPTS[1], params(5), ADAPTERS[1])
    reqs = {rid: e.request(rid) for rid in (low, mid)}
    for _ in range(4):
        e.step()
    assert {r.request_id for r in e.scheduler.running} == {low, mid}
    high = e.add_request(PROMPTS[2], params(0), ADAPTERS[2])
    reqs[high] = e.request(high)
    e.step()
    assert {r.request_id for r in e.scheduler.running} == {mid, high}
    assert reqs[low].preemptions == 1 and reqs[mid].preemptions == 0
    run(e)
    assert [reqs[rid].output_ids for rid in (low, mid, high)] == reference[:3]
    assert e.scheduler.num_preemptions == 1 and e.kv.free_blocks == e.kv.num_blocks


def test_requests_of_one_priority_never_preempt_one_another():
    e = engine(max_batch_size=2)
    first = [e.add_request(p, params(1), a) for p, a in zip(PROMPTS[:2], ADAPTERS[:2])]
    e.step()
    assert {r.request_id for r in e.scheduler.running} == set(first)
    lower = e.add_request(PROMPTS[3], params(2), ADAPTERS[3])
    later = e.add_request(PROMPTS[2], params(1), ADAPTERS[2])
    assert run(e) == [later, lower] and e.scheduler.num_preemptions == 0


def test_kv_pressure_preempts_the_lowest_priority_not_the_youngest():
    """Two requests outgrow 8 blocks of 4 tokens: FCFS preempts the younger one
    (test_paged_kv); here the older one, of the lower priority, goes back."""
    e = engine(kv_block_size=4, num_kv_blocks=8)
    old = e.add_request([1, 2, 3, 4, 5, 6], params(5, max_tokens=20))
    young = e.add_request([1, 9, 8, 7, 6, 5], params(0, max_tokens=20))
    reqs = {rid: e.request(rid) for rid in (old, young)}
    run(e)
    assert reqs[young].preemptions == 0 and reqs[old].preemptions > 0
    assert e.kv.free_blocks == 8


def test_a_higher_priority_arrival_preempts_for_kv_blocks_only_what_it_needs():
    """KV blocks held by three priority-9 requests: a priority-0 prompt that needs two of their
    blocks' worth preempts the youngest of them only; the others keep decoding."""
    want = [r.output_ids for r in engine("fcfs").generate(
        [[1, 2, 3], [1, 4, 5], [1, 6, 7], list(range(10, 19))], params(max_tokens=6))]
    e = engine(kv_block_size=4, num_kv_blocks=9, max_batch_size=8, max_seq_len=16)
    low = [e.add_request(p, params(9, max_tokens=6)) for p in ([1, 2, 3], [1, 4, 5], [1, 6, 7])]
    reqs = {rid: e.request(rid) for rid in low}
    for _ in range(3):
        e.step()  # each holds 2 blocks now (5 positions), 3 of 9 free
    assert e.kv.free_blocks == 3
    high = e.add_request(list(range(10, 19)), params(0, max_tokens=6))  # 9 prompt tokens: 3 blocks, + watermark
    reqs[high] = e.request(high)
    e.step()
    assert [reqs[rid].preemptions for rid in low] == [0, 0, 1]
    assert reqs[high].output_ids and e.scheduler.num_preemptions == 1  # admitted at once
    run(e)
    assert [reqs[rid].output_ids for rid in (*low, high)] == want


def test_no_preemption_when_the_lower_priorities_cannot_make_room():
    """A priority-5 arrival needs more blocks than are free plus all the priority-9 request
    holds (the rest belong to a priority-0 one): nothing is preempted, it waits its turn."""
    e = engine(kv_block_size=4, num_kv_blocks=8, max_batch_size=8, max_seq_len=32)
    top = e.add_request(list(range(20, 37)), params(0, max_tokens=4))  # 17 + 4 positions: 5-6 blocks
    low = e.add_request([1, 2, 3], params(9, max_tokens=4))
    e.step()
    e.step()
    mid = e.add_request(list(range(40, 51)), params(5, max_tokens=2))  # 11 positions: 3 blocks
    reqs = {rid: e.request(rid) for rid in (top, low, mid)}
    e.step()
    assert e.scheduler.num_preemptions == 0 and reqs[mid].state.name == "WAITING"
    run(e)
    assert all(r.finished for r in reqs.values()) and e.kv.free_blocks == 8


def test_offline_lines_and_engine_generate_take_a_priority():
    rid, kw = parse_line(json.dumps({"prompt": "x", "priority": -3}), 1)
    assert kw["params"].priority == -3
    with pytest.raises(Exception, match="priority must be an integer"):
        parse_line(json.dumps({"prompt": "x", "priority": "high"}), 1)


def test_the_server_serves_a_late_urgent_request_first():
    """On a one-row server with the priority policy, an urgent request sent while a long
    low-priority one streams gets its answer before that one ends, and that one's text is what
    it is alone. A priority on an FCFS server is a 400 naming the setting."""
    e = Engine(EngineConfig(compile="false", max_batch_size=1, max_seq_len=512, adapters=AdapterConfig(dir="none"),
                            scheduler=SchedulerConfig(policy="priority")))
    body = {"model": "tiny", "prompt": "def main():", "max_tokens": 300, "temperature": 0, "ignore_eos": True}
    with in_process_server(e, ServerConfig()) as (base, _):
        alone = httpx.post(base + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
        done, texts = [], {}
        urgent_sent = threading.Event()

        def urgent():
            urgent_sent.wait(60)
            r = httpx.post(base + "/v1/completions", json={**body, "max_tokens": 3, "priority": -1}, timeout=120)
            assert r.status_code == 200, r.text
            done.append("urgent")

        t = threading.Thread(target=urgent)
        t.start()
        with httpx.stream("POST", base + "/v1/completions", json={**body, "stream": True, "priority": 10},
                          timeout=120) as r:
            parts = []
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    parts.append(json.loads(line[6:])["choices"][0]["text"])
                    urgent_sent.set()
            done.append("long")
        t.join(60)
        texts["long"] = "".join(parts)
    assert done == ["urgent", "long"] and texts["long"] == alone
    assert e.scheduler.num_preemptions >= 1


def test_an_fcfs_server_refuses_a_priority_by_its_setting():
    e = Engine(EngineConfig(compile="false", max_batch_size=2, max_seq_len=128, adapters=AdapterConfig(dir="none")))
    with in_process_server(e, ServerConfig()) as (base, _):
        r = httpx.post(base + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2,
                                                       "priority": 1}, timeout=60)
        assert r.status_code == 400 and "scheduler.policy=priority" in r.json()["error"]["message"], r.text
        r = httpx.post(base + "/v1/chat/completions", json={"model": "tiny", "max_tokens": 2, "priority": 0,
                                                            "messages": [{"role": "user", "content": "x"}]}, timeout=60)
        assert r.status_code == 200, r.text


def test_a_request_waiting_for_its_adapter_preempts_nothing_until_it_can_run():
    """A high-priority request whose adapter is still being read preempts no one meanwhile (a
    preemption then would free room for nobody, or for a lower priority: the inversion), and
    once it runs, the request it preempted recomputes to its own tokens (it was once left in
    the step's decode rows with no blocks, and failed)."""
    def cold(**kw):  # adapters read on first use
        return Engine(EngineConfig(device="cpu", compile="false", max_batch_size=1, adapters=AdapterConfig(dir="demo"),
                                   scheduler=SchedulerConfig(policy="priority"), **kw))

    want = {p: r.output_ids for p, r in zip(("v", "m", "h"), cold().generate(
        [[1, 5, 9, 13], [1, 2, 3], [1, 7, 300]], params(), [None, None, "demo-r16"]))}
    e = cold()
    v = e.add_request([1, 5, 9, 13], params(priority=5), request_id="v")
    for _ in range(3):
        e.step()
    e.add_request([1, 2, 3], params(priority=7), request_id="m")
    e.step()
    e.add_request([1, 7, 300], params(priority=0), "demo-r16", request_id="h")
    reqs = {rid: e.request(rid) for rid in "vmh"}
    admitted = run(e)
    assert admitted.index("h") < admitted.index("m"), admitted  # the lower priority waited behind it
    assert e.scheduler.num_preemptions == 1  # v, once, when h could run
    for rid, r in reqs.items():
        assert r.finish_reason.name == "LENGTH" and r.output_ids == want[rid], rid
    assert reqs[v].preemptions == 1 and e.kv.free_blocks == e.kv.num_blocks
