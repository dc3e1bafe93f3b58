"""CPU-assisted prefill: exact tokens while adapters are still being copied, and the states."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest
import torch

from caraserve.config import AdapterConfig, ConfigError, CpuAssistConfig, EngineConfig, ModelConfig
from caraserve.cpu_assist import handoff as handoff_mod
from caraserve.cpu_assist.handoff import Handoff, HostSegment
from caraserve.cpu_assist.thread_plan import DEFAULT_TOKENS_PER_THREAD, ThreadPlan
from caraserve.engine import Engine
from caraserve.lora.device_pool import AdapterState
from caraserve.model.tiny import tiny_paths, write_random_adapter
from caraserve.request import RequestState, SamplingParams

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
SLOW_COPY_GBPS = 0.004  # a ~1-3 MB adapter takes ~0.3-1 s to "copy": prefill runs before it lands
FAST_COPY_GBPS = 1000.0  # paced copies that take no time: a CopyGate alone decides when layers land


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    model_dir, demo = tiny_paths()
    root = tmp_path_factory.mktemp("assist")
    for d in demo.iterdir():
        os.symlink(d, root / d.name)
    for i, m in enumerate(MODULES):  # every module alone; the demo adapters cover mixes
        write_random_adapter(root / f"only-{m}", 8 + 4 * i, 16, [m], seed=900 + i)
    return model_dir, root


def make(catalogue, mode="off", slots=16, gbps=0.0, preload="host", pipeline_layers=0, **kw):
    model_dir, root = catalogue
    return Engine(EngineConfig(
        model=ModelConfig(path=str(model_dir)),
        adapters=AdapterConfig(dir=str(root), device_slots=slots, preload=preload),
        cpu_assist=CpuAssistConfig(mode=mode, emulate_copy_gbps=gbps, threads=1, pipeline_layers=pipeline_layers),
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
    # the only rank-32 slot is held: another rank-32 adapter cannot evict it (it takes the larger
    # bucket's slot), and with that one held too it cannot load
    other = engine.store.get("only-gate_proj")  # rank 24 -> bucket 32
    assert pool.bucket_for(other.rank) == pool.slot_of("demo-r32")[0]
    larger = set(range(pool.bucket_for(other.rank) + 1, len(pool.rank_buckets)))
    assert not pool.load(other, avoid=larger)
    assert pool.load(other) and pool.slot_of("only-gate_proj")[0] in larger
    assert pool.state("demo-r32") is not AdapterState.HOST  # not evicted
    assert pool.evict("only-gate_proj")
    assert not engine.step()  # nothing to decode until the copy lands
    deadline = time.time() + 30
    while pool.state("demo-r32") is not AdapterState.RESIDENT and time.time() < deadline:
        pool.poll()
        time.sleep(0.02)
    assert pool.state("demo-r32") is AdapterState.RESIDENT
    while engine.has_unfinished():
        engine.step()
    assert pool.load(other, avoid=larger) and pool.slot_of("only-gate_proj")[0] == pool.bucket_for(other.rank)


def test_a_segment_split_over_lanes_adds_each_slice_at_its_rows():
    """A long prompt's segment is cut into slices computed in parallel: each slice's delta lands on
    its own rows of the output."""
    g = torch.Generator().manual_seed(0)

    class Weights:
        a = {"q_proj": torch.randn(1, 16, 4, generator=g)}
        b = {"q_proj": torch.randn(1, 4, 8, generator=g)}
        scale = 0.5

    rows = 2 * DEFAULT_TOKENS_PER_THREAD
    h = Handoff(ThreadPlan(max_threads=2))
    try:
        x, y = torch.randn(rows, 16, generator=g), torch.zeros(rows, 8)
        pending = h.submit(x, 0, "q_proj", (HostSegment(0, rows, Weights()),))
        assert len(pending[0].parts) == 2
        h.add(y, pending)
    finally:
        h.close()
    want = 0.5 * (x @ Weights.a["q_proj"][0]) @ Weights.b["q_proj"][0]
    assert torch.allclose(y, want, atol=1e-5)


@pytest.mark.parametrize("native", [True, False])
def test_cpu_delta_of_bf16_weights_either_way(monkeypatch, native):
    """A bfloat16 adapter's CPU delta: in bfloat16 where the CPU has the instructions, in float32
    where it would emulate them (several times slower): there only the result is rounded."""
    from caraserve.cpu_assist import worker

    monkeypatch.setattr(worker, "native_bf16", lambda: native)
    g = torch.Generator().manual_seed(2)
    x, a, b = (torch.randn(*s, generator=g).bfloat16() for s in ((9, 64), (64, 8), (8, 48)))
    out = worker.lora_delta(x, a, b, 0.5)
    want = 0.5 * (x.double() @ a.double()) @ b.double()
    assert out.dtype == torch.bfloat16 and out.shape == (9, 48)
    assert (out.double() - want).norm() / want.norm() < 1e-2  # x @ A rounded to bfloat16 on the way
    if not native:  # float32 throughout: one rounding, at most half a bfloat16 unit (2^-8 relative)
        assert torch.allclose(out.double(), want, rtol=2 ** -8, atol=1e-3)


class CopyGate:
    """DevicePool.copy_gate for tests: group g of adapter `name` lands only once allow(name, n > g)."""

    def __init__(self, pool):
        self.pool = pool
        self.allowed: dict[str, int] = {}
        self.cv = threading.Condition()

    def __call__(self, name: str, group: int) -> None:
        with self.cv:
            self.cv.wait_for(lambda: self.allowed.get(name, 0) > group, timeout=60)

    def allow(self, name: str, groups: int, layers: int) -> None:
        """Lets the first `groups` groups land and waits until `layers` leading layers have."""
        with self.cv:
            self.allowed[name] = groups
            self.cv.notify_all()
        deadline = time.time() + 30
        while self.pool.layers_ready(name) < layers and time.time() < deadline:
            time.sleep(0.002)
        assert self.pool.layers_ready(name) == layers


def test_layers_that_landed_run_on_the_device_and_tokens_stay_exact(catalogue, cached):
    """Loading adapters with 0-3 of their 4 layers landed, one of them landing the rest while the
    prefill runs: each layer takes the device or the CPU path, and the tokens equal CACHED."""
    landed = {"demo-r8": 0, "demo-r16": 1, "only-down_proj": 2, "demo-r32": 3, "only-q_proj": 1}
    items = workload(list(landed) + ["demo-r64", None], [300, 37, 5, 120])
    want, _ = run(cached, items)
    engine = make(catalogue, mode="on", gbps=FAST_COPY_GBPS)
    pool, gate = engine.pool, CopyGate(engine.pool)
    pool.copy_gate = gate
    assert pool.num_layers == 4 and pool.layers_ready("demo-r8") == 0  # tiny model: one layer per group
    assert pool.load(engine.store.get("demo-r64"))
    gate.allow("demo-r64", 4, 4)
    pool.wait_loaded("demo-r64")
    for name, k in landed.items():
        assert pool.load(engine.store.get(name))
        gate.allow(name, k, k)
        assert pool.state(name) is AdapterState.LOADING

    def land_the_rest(module, args):  # right before layer 2 runs, demo-r16 lands completely
        gate.allow("demo-r16", 4, 4)

    hook = engine.model.model.layers[2].register_forward_pre_hook(land_the_rest)
    try:
        ids = [engine.add_request(p, GREEDY, a) for p, a in items]
        reqs = {engine.request(i).adapter: engine.request(i) for i in ids}
        engine.step()  # every request prefills in this one step
    finally:
        hook.remove()
    assert all(r.output_ids for r in reqs.values())
    on_device = {name: (reqs[name].assist_device_layers, reqs[name].assist_cpu_layers) for name in landed}
    assert on_device == {"demo-r8": (0, 4), "demo-r16": (3, 1), "only-down_proj": (2, 2), "demo-r32": (3, 1),
                         "only-q_proj": (1, 3)}
    assert (reqs["demo-r64"].assist_device_layers, reqs["demo-r64"].assist_cpu_layers) == (0, 0)
    assert not reqs["demo-r64"].cpu_assisted and reqs["demo-r32"].cpu_assisted
    for name in landed:
        gate.allow(name, 4, 4)
    while engine.has_unfinished():
        engine.step()
    assert [reqs[a].output_ids for _, a in items] == want


def test_chunked_prefill_moves_to_the_device_as_layers_land(catalogue, cached):
    items = workload(["demo-r32", "only-up_proj"], [600, 330])
    want, _ = run(cached, items)
    engine = make(catalogue, mode="on", gbps=FAST_COPY_GBPS, max_tokens_per_step=128)
    gate = CopyGate(engine.pool)
    engine.pool.copy_gate = gate
    reqs = [engine.request(engine.add_request(p, GREEDY, a)) for p, a in items]
    landed = {a: 0 for _, a in items}
    while engine.has_unfinished():
        engine.step()
        for a in landed:  # one more layer of each copy in flight lands after every step
            if engine.pool.state(a) is AdapterState.LOADING:
                landed[a] = min(landed[a] + 1, 4)
                gate.allow(a, landed[a], landed[a])
    assert [r.output_ids for r in reqs] == want
    # demo-r32 prefills in 5 chunks with 0, 1, 2, 3 layers landed, then resident (not assisted);
    # only-up_proj starts in the 5th step's leftover budget and goes the same way
    assert (reqs[0].assist_device_layers, reqs[0].assist_cpu_layers) == (0 + 1 + 2 + 3, 4 + 3 + 2 + 1)
    assert reqs[1].assist_device_layers > 0 and reqs[1].assist_cpu_layers > 0


def test_simultaneous_cold_requests_get_disjoint_workers(monkeypatch, caplog):
    ran = []  # (segment start, worker thread) per CPU slice
    delta = handoff_mod.lora_delta

    def recording(x, a, b, scale, ready=None):
        ran.append((x.data_ptr(), threading.current_thread().name))
        return delta(x, a, b, scale, ready)

    monkeypatch.setattr(handoff_mod, "lora_delta", recording)
    g = torch.Generator().manual_seed(0)

    class W:  # a host LoraWeights of one layer and module
        def __init__(self, r):
            self.a = {"q_proj": torch.randn(1, 16, r, generator=g)}
            self.b = {"q_proj": torch.randn(1, r, 8, generator=g)}
            self.scale = 0.5

    handoff = Handoff(ThreadPlan(max_threads=2))
    try:
        x = torch.randn(12, 16, generator=g)
        segs = (HostSegment(0, 5, W(4)), HostSegment(5, 7, W(8)))
        y = torch.zeros(12, 8)
        handoff.add(y, handoff.submit(x, 0, "q_proj", segs))
        want = torch.cat([s.weights.scale * (x[s.start:s.start + s.count] @ s.weights.a["q_proj"][0])
                          @ s.weights.b["q_proj"][0] for s in segs])
        torch.testing.assert_close(y, want)
        assert len({name for _, name in ran}) == 2  # one worker each, not queued behind each other
        ran.clear()
        with caplog.at_level(logging.INFO, logger=handoff_mod.__name__):
            three = segs + (HostSegment(0, 3, W(4)),)
            for _ in range(2):
                handoff.add(torch.zeros(12, 8), handoff.submit(x, 0, "q_proj", three))
        assert sum("share workers" in r.getMessage() for r in caplog.records) == 1  # logged once
        assert len(ran) == 6 and len({name for _, name in ran}) == 2
    finally:
        handoff.close()


def test_pipeline_layers_setting_reaches_the_pool(catalogue):
    from caraserve.config import ConfigError, CpuAssistConfig

    assert make(catalogue, mode="on", pipeline_layers=3).pool._groups == [(0, 3), (3, 4)]
    assert make(catalogue, mode="on").pool._groups == [(0, 1), (1, 2), (2, 3), (3, 4)]  # 4 layers: one each
    with pytest.raises(ConfigError, match="pipeline_layers"):
        CpuAssistConfig(pipeline_layers=-1)


def test_cold_prefill_inside_a_mixed_step_and_after_a_prefix_hit(catalogue, cached):
    """A cold request arriving while another decodes is prefilled in a mixed step on the CPU path;
    a second cold request of the same adapter and prefix computes only what the cache lacks."""
    g = torch.Generator().manual_seed(8)
    prefix = torch.randint(10, 7000, (64,), generator=g).tolist()
    items = [(torch.randint(10, 7000, (20,), generator=g).tolist(), None),
             (prefix + [11, 12, 13], "only-v_proj"), (prefix + [21, 22], "only-v_proj")]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    want = [r.output_ids for r in cached.generate([p for p, _ in items], params, [a for _, a in items])]
    engine = make(catalogue, mode="on", gbps=FAST_COPY_GBPS)
    gate = CopyGate(engine.pool)  # the copy lands when allowed, not when a slow machine's steps let it
    engine.pool.copy_gate = gate
    steps = []
    run_batch = engine.runner.run

    def recorded(batch, **kw):
        steps.append((batch.is_decode, [r.state for r in batch.requests], [r.cpu_assisted for r in batch.requests]))
        return run_batch(batch, **kw)

    engine.runner.run = recorded
    warm = engine.request(engine.add_request(items[0][0], params, None))
    while warm.state is not RequestState.DECODE:
        engine.step()
    first = engine.request(engine.add_request(items[1][0], params, "only-v_proj"))
    engine.step()
    is_decode, states, assisted = steps[-1]  # the decoding request's token beside the cold prompt
    assert not is_decode and sorted(s.value for s in states) == ["decode", "prefill"] and any(assisted)
    second = engine.request(engine.add_request(items[2][0], params, "only-v_proj"))
    for _ in range(100):  # both cold prompts prefilled while the copy is held
        if second.state is RequestState.DECODE:
            break
        engine.step()
    gate.allow("only-v_proj", 4, 4)
    while engine.has_unfinished():
        engine.step()
    assert [warm.output_ids, first.output_ids, second.output_ids] == want
    assert first.cpu_assisted and second.cpu_assisted and second.cached_tokens == 64


def test_preload_all_needs_a_free_slot_for_every_adapter(catalogue, cached):
    """The CACHED baseline: every adapter resident, or a refusal naming the slots; an adapter is
    never evicted for another (it was, leaving most of them off the device without a word)."""
    assert all(cached.pool.state(n) is AdapterState.RESIDENT for n in cached.store.names())
    with pytest.raises(ConfigError, match=r"adapters.preload=all: not enough device slots .* 1 of rank 8"):
        make(catalogue, preload="all", slots=1)
