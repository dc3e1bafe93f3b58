"""What the HostStore budget and DevicePool tests share (a pytest plugin: tests/conftest.py): a
small base model and adapters of many ranks and targets, registered in a HostStore (`pool_env`),
and helpers that snapshot and compare an adapter's weights."""

from __future__ import annotations

import pytest
import torch
from helpers import save_random_hf_model

from caraserve.lora.checkpoint import TARGETS
from caraserve.lora.host_store import HostStore
from caraserve.model.loader import load_model
from caraserve.model.tiny import write_random_adapter

SHAPE = dict(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
L = 2
# (in, out) of each module for hidden 64, 4 heads of 16, 2 kv heads, intermediate 112
DIMS = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
        "gate_proj": (64, 112), "up_proj": (64, 112), "down_proj": (112, 64)}
QV = ["q_proj", "v_proj"]
ALL = list(TARGETS)
# name -> (rank, alpha, targets)
ADAPTERS = {
    "r5": (5, 10, QV),
    "r5b": (5, 5, ["q_proj", "k_proj"]),
    "r8": (8, 16, QV),
    "r9-qv": (9, 18, QV),
    "r12-all": (12, 12, ALL),
    "r16-all": (16, 8, ALL),
    "r17": (17, 17, ["o_proj", "down_proj"]),
    "r32": (32, 64, ALL),
    "r40": (40, 40, QV),
}


@pytest.fixture(scope="module")
def pool_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    save_random_hf_model(root / "base", "llama")
    for i, (name, (r, alpha, targets)) in enumerate(ADAPTERS.items()):
        write_random_adapter(root / "adapters" / name, r, alpha, targets, seed=100 + i, shape=SHAPE)
    for i in range(5):  # same size each: r=8 on q_proj, v_proj
        write_random_adapter(root / "budget" / f"b{i}", 8, 16, QV, seed=200 + i, shape=SHAPE)
    args = load_model(root / "base", "float32").args
    assert {m: args.module_shape(m) for m in TARGETS} == DIMS
    store = HostStore(args)
    ok, bad = store.register_dir(root / "adapters")
    assert sorted(ok) == sorted(ADAPTERS) and not bad
    return root, args, store


def clone(w):
    return {("a", m): t.clone() for m, t in w.a.items()} | {("b", m): t.clone() for m, t in w.b.items()}


def equal(w, snap):
    now = clone(w)
    return now.keys() == snap.keys() and all(torch.equal(now[k], snap[k]) for k in snap)


def qv8_bytes() -> int:
    # a: [L, in, 8], b: [L, 8, out] for q_proj (64 -> 64) and v_proj (64 -> 32), float32
    return 4 * L * 8 * ((64 + 64) + (64 + 32))
