"""What the host-tier tests share (a pytest plugin: tests/conftest.py): a small base model with
adapters of a few ranks (`tier_env`), stores closed after each test (`tier_stores`), and
helpers that compare or poison an adapter's weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import save_random_hf_model
from safetensors.torch import load_file, save_file

from caraserve.lora.checkpoint import TARGETS
from caraserve.lora.host_store import HostStore
from caraserve.model.loader import load_model
from caraserve.model.tiny import write_random_adapter

SHAPE = dict(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
QV = ["q_proj", "v_proj"]
ST, BIN = "adapter_model.safetensors", "adapter_model.bin"
RANKS = (4, 8, 16)


@pytest.fixture(scope="module")
def tier_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("tier")
    save_random_hf_model(root / "base", "llama", **SHAPE)
    write_random_adapter(root / "big", 64, 64, list(TARGETS), seed=1, shape=SHAPE)  # ~0.5 MB of weights
    for i in range(20):
        write_random_adapter(root / "many" / f"a{i:02d}", RANKS[i % 3], 16, QV, seed=10 + i, shape=SHAPE)
    return root, load_model(root / "base", "float32").args


@pytest.fixture
def tier_stores():
    """Closes every store a test makes, so no I/O thread outlives it."""
    made = []
    yield lambda *a, **k: made.append(HostStore(*a, **k)) or made[-1]
    for s in made:
        s.close()


def same_weights(w, ref) -> bool:
    return (w.a.keys() == ref.a.keys() and all(torch.equal(w.a[m], ref.a[m]) for m in w.a)
            and all(torch.equal(w.b[m], ref.b[m]) for m in w.b))


def poison(folder: Path) -> Path:
    t = load_file(str(folder / ST))
    key = next(k for k in sorted(t) if "lora_B" in k)
    t[key] = t[key].clone()
    t[key][0, 1] = float("nan")
    save_file(t, str(folder / ST))
    return folder

