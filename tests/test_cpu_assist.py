"""CPU-assisted prefill: exact tokens while adapters are still being copied, and the states."""

from __future__ import annotations

import os
import time

import pytest
import torch

from caraserve.config import AdapterConfig, CpuAssistConfig, EngineConfig, ModelConfig
from caraserve.cpu_assist.thread_plan import ThreadPlan
from caraserve.engine import Engine
from caraserve.lora.device_pool import AdapterState
from caraserve.model.tiny import tiny_paths, write_random_adapter
from caraserve.request import RequestState, SamplingParams

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
SLOW_COPY_GBPS = 0.004  # a ~1-3 MB adapter takes ~0.3-1 s to "copy": prefill runs before it lands


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    model_dir, demo = tiny_paths()
    root = tmp_path_factory.mktemp("assist")
    for d in demo.iterdir():
        os.symlink(d, root / d.name)
    for i, m in enumerate(MODULES):  # every module alone; the demo adapters cover mixes
        write_random_adapter(root / f"only-{m}", 8 + 4 * i, 16, [m], seed=900 + i)
    return model_dir, root


def make(catalogue, mode="off", slots=16, gbps=0.0, preload="none", **kw):
    model_dir, root = catalogue
    return Engine(EngineConfig(
        model=ModelConfig(path=str(model_dir)),
        adapters=AdapterConfig(dir=str(root), device_slots=slots, preload=preload),
        cpu_assist=CpuAssistConfig(mode=mode, emulate_copy_gbps=gbps, threads=1),
        device="cpu", compile="false", max_batch_size=32, **kw))


def workload(names, lengths):
    g = torch.Generator().manual_seed(5)
    items = []
    for i, name in enumerate(names):
        n = lengths[i % len(lengths)]
        items.append((torch.randint(10, 7000, (n,), generator=g).tolist(), name))
    return items


@pytest.fixture(scope="module")
def cached(catalogue):
    return make(catalogue, preload="all")


def run(engine, items):
    reqs = engine.generate([p for p, _ in items], GREEDY, [a for _, a in items])
    return [r.output_ids for r in reqs], reqs


def test_cold_prefill_on_cpu_equals_cached(catalogue, cached):
    names = sorted(p.name for p in catalogue[1].iterdir())
    # every adapter cold, mixed in one prefill batch with base requests; prompts 1 to 1100 tokens
    items = workload(names + [None, None], [1, 37, 300, 1100, 5, 64])
    want, _ = run(cached, items)
    engine = make(catalogue, mode="on", gbps=SLOW_COPY_GBPS)
    got, reqs = run(engine, items)
    assert got == want
    assisted = [r for r in reqs if r.adapter is not None]
    assert all(r.cold_start and r.cpu_assisted for r in assisted)


def test_cold_and_warm_together_and_chunked_prefill(catalogue, cached):
    items = workload(["demo-r8", "demo-r32", "only-down_proj", None, "demo-r64", "only-q_proj"], [900, 3, 250])
    want, _ = run(cached, items)
    engine = make(catalogue, mode="on", gbps=SLOW_COPY_GBPS, max_tokens_per_step=256)
    for name in ("demo-r8", "only-q_proj"):
        assert engine.pool.load(engine.store.get(name))
        engine.pool.wait_loaded(name)
    got, reqs = run(engine, items)
    assert got == want
    by_adapter = {r.adapter: r for r in reqs}
    assert not by_adapter["demo-r8"].cpu_assisted and by_adapter["demo-r64"].cpu_assisted


def test_off_waits_for_the_copy_and_gives_the_same_tokens(catalogue, cached):
    items = workload(["demo-r16", "only-v_proj", None], [20, 7])
    want, _ = run(cached, items)
    engine = make(catalogue, mode="off", gbps=SLOW_COPY_GBPS)
    ids = [engine.add_request(p, GREEDY, a) for p, a in items]
    engine.step()
    states = {engine.request(i).adapter: engine.request(i).state for i in ids if engine.request(i)}
    assert states["demo-r16"] is RequestState.LOADING_ADAPTER  # waiting for the copy, not prefilling
    got = []
    reqs = [engine.request(i) for i in ids]
    while engine.has_unfinished():
        engine.step()
    got = [r.output_ids for r in reqs]
    assert got == want and not any(r.cpu_assisted for r in reqs)


def test_state_machine_and_no_eviction_during_assisted_prefill(catalogue):
    engine = make(catalogue, mode="on", slots=1, gbps=SLOW_COPY_GBPS)
    pool = engine.pool
    assert pool.state("demo-r32") is AdapterState.HOST
    rid = engine.add_request(list(range(10, 60)), SamplingParams(max_tokens=3, temperature=0, ignore_eos=True),
                             "demo-r32")
    engine.step()  # admits and prefills on the CPU while the copy runs
    req = engine.request(rid)
    assert pool.state("demo-r32") is AdapterState.LOADING and req.cpu_assisted
    assert req.state is RequestState.DECODE and len(req.output_ids) == 1
    # the only rank-32 slot is held: another rank-32 adapter can neither evict it nor load
    other = engine.store.get("only-gate_proj")  # rank 24 -> bucket 32
    assert pool.bucket_for(other.rank) == pool.slot_of("demo-r32")[0]
    assert not pool.load(other)
    assert not engine.step()  # nothing to decode until the copy lands
    deadline = time.time() + 30
    while pool.state("demo-r32") is not AdapterState.RESIDENT and time.time() < deadline:
        pool.poll()
        time.sleep(0.02)
    assert pool.state("demo-r32") is AdapterState.RESIDENT
    while engine.has_unfinished():
        engine.step()
    assert pool.load(other)  # released: now it can take the slot


def test_auto_uses_the_cpu_only_when_the_plan_says_it_pays():
    plan = ThreadPlan(max_threads=1, gflops_per_thread=30.0)
    # 8 MB adapter at 16 GB/s: 0.5 ms of copy; 10 tokens x 1 MFLOP: 0.3 us of CPU -> assist
    assert plan.cpu_lora_seconds(10, 1e6) < plan.copy_seconds(8_000_000)
    # 4096 tokens x 100 MFLOP on one thread: 14 s -> wait for the copy instead
    assert plan.cpu_lora_seconds(4096, 1e8) > plan.copy_seconds(8_000_000)
    assert plan.threads_for(4096, 64) == 1 and ThreadPlan(max_threads=8).threads_for(1000, 64) == 4
