"""Pipelined adapter copies: an adapter lands in the device pool layer group by layer group,
turns resident only when the last group lands, and is never evicted while in flight or held."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from helpers import save_random_hf_model

from caraserve.lora.checkpoint import TARGETS
from caraserve.lora.device_pool import AdapterState, DevicePool
from caraserve.lora.host_store import HostStore
from caraserve.model.loader import load_model
from caraserve.model.tiny import write_random_adapter

ALL = list(TARGETS)
L5 = 5  # layers of the pipelining model: groups of 2 layers land as [0, 2), [2, 4), [4, 5)


class _Gate:
    """copy_gate: group g of an adapter lands only once open_to(name, n > g)."""

    def __init__(self):
        self.allowed: dict[str, int] = {}
        self.cv = threading.Condition()

    def __call__(self, name, group):
        with self.cv:
            self.cv.wait_for(lambda: self.allowed.get(name, 0) > group, timeout=60)

    def open_to(self, name, groups):
        with self.cv:
            self.allowed[name] = groups
            self.cv.notify_all()


def _wait_layers(pool, name, layers):
    deadline = time.time() + 30
    while pool.layers_ready(name) < layers and time.time() < deadline:
        time.sleep(0.002)
    assert pool.layers_ready(name) == layers


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    root = tmp_path_factory.mktemp("deep")
    shape = dict(hidden_size=64, intermediate_size=112, num_hidden_layers=L5, num_attention_heads=4,
                 num_key_value_heads=2)
    save_random_hf_model(root / "base", "llama", **shape)
    for i, name in enumerate(("x", "y", "z")):
        write_random_adapter(root / "adapters" / name, 8, 16, ALL, seed=300 + i, shape=shape)
    args = load_model(root / "base", "float32").args
    store = HostStore(args)
    assert sorted(store.register_dir(root / "adapters")[0]) == ["x", "y", "z"]
    return args, store


def _deep_pool(deep, gbps, gate=None, slots=2):
    return DevicePool(deep[0], (8,), slots, torch.float32, [torch.device("cpu")] * L5, emulate_copy_gbps=gbps,
                      pipeline_layers=2, copy_gate=gate)


def test_layers_land_group_by_group_and_resident_only_at_the_end(deep):
    gate = _Gate()
    pool = _deep_pool(deep, 1000.0, gate)
    w = deep[1].get("x")
    assert pool.layers_ready("x") == 0 and pool.load(w)
    s = pool.slot_of("x")[1]
    a, b = pool.buckets[0].weights["gate_proj"]
    for groups, layers in ((0, 0), (1, 2), (2, 4)):
        gate.open_to("x", groups)
        _wait_layers(pool, "x", layers)
        assert pool.poll() == [] and pool.state("x") is AdapterState.LOADING
        assert torch.equal(a[:layers, s], w.a["gate_proj"][:layers])
        assert torch.equal(b[:layers, s], w.b["gate_proj"][:layers])
        # a decision taken for a layer stays: the same step never mixes paths for one layer
        landing = pool.landing("x", 3, 4, "cpu")
        assert landing.group.index.segments == ((3, 4, s),) and landing.group.weights is pool.buckets[0].weights
        assert [landing.landed(layer) for layer in range(L5)] == [layer < layers for layer in range(L5)]
    gate.open_to("x", 3)
    _wait_layers(pool, "x", L5)
    assert landing.landed(4) is False  # asked before it landed
    assert pool.poll() == ["x"] and pool.state("x") is AdapterState.RESIDENT and pool.layers_ready("x") == L5
    assert torch.equal(a[:, s], w.a["gate_proj"]) and pool.buckets[0].scale[s].item() == pytest.approx(w.scale)


def test_paced_copy_lands_in_order_in_emulated_time(deep):
    gbps = 0.0005  # ~0.3 s for a rank-8 adapter on every module of 5 layers: ~0.1 s per group
    pool = _deep_pool(deep, gbps)
    w = deep[1].get("y")
    t0 = time.perf_counter()
    assert pool.load(w)
    seen = []
    while not pool.poll():
        seen.append(pool.layers_ready("y"))
        time.sleep(0.002)
    assert time.perf_counter() - t0 >= w.nbytes / (gbps * 1e9) * 0.99
    assert seen == sorted(seen) and set(seen) <= {0, 2, 4, 5} and {0, 2, 4} <= set(seen)
    assert pool.layers_ready("y") == L5
    assert DevicePool(deep[0], (8,), 1, torch.float32, [torch.device("cpu")] * L5).layers_ready("y") == 0
    with pytest.raises(ValueError, match="pipeline_layers"):
        DevicePool(deep[0], (8,), 1, torch.float32, [torch.device("cpu")] * L5, pipeline_layers=-1)


def test_slot_in_use_or_in_flight_is_never_evicted(deep):
    gate = _Gate()
    pool = _deep_pool(deep, 1000.0, gate, slots=1)
    store = deep[1]
    assert pool.load(store.get("x"))
    gate.open_to("x", 1)
    _wait_layers(pool, "x", 2)
    assert not pool.load(store.get("y"))  # x's copy is in flight (nobody holds it yet)
    pool.acquire("x")
    gate.open_to("x", 3)
    _wait_layers(pool, "x", L5)
    assert pool.poll() == ["x"]
    assert not pool.load(store.get("y"))  # resident and held
    pool.release("x")
    assert pool.load(store.get("y")) and pool.evictions == 1 and pool.state("x") is AdapterState.HOST
    assert pool.state("y") is AdapterState.LOADING and pool.layers_ready("y") == 0
    assert not pool.load(store.get("z"))  # y's copy is in flight
    gate.open_to("y", 3)
    pool.wait_loaded("y")
    assert pool.state("y") is AdapterState.RESIDENT and pool.load(store.get("z")) and pool.evictions == 2
