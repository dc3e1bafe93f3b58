"""A start-up folder of many adapters trained alike is scanned without repeating per-config work:
pattern resolution, the safetensors header's parse and the layout checks run once per distinct
config / header / shapes, while every per-file check and per-adapter log still happens each time."""

from __future__ import annotations

import json
import logging
import os
import uuid

import pytest
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

from caraserve.lora import adapter_files, checkpoint, module_patterns
from caraserve.lora.host_store import HostStore
from caraserve.model.llama import ModelArgs
from caraserve.model.tiny import write_random_adapter

SHAPE = dict(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
QV = ["q_proj", "v_proj"]
ST = "adapter_model.safetensors"
N = 12


@pytest.fixture(scope="module")
def args():
    return ModelArgs.from_hf(LlamaConfig(vocab_size=128, **SHAPE))


def _counting(monkeypatch, module, attr) -> list:
    calls = []
    real = getattr(module, attr)

    def wrapper(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(module, attr, wrapper)
    return calls


def _alike(root, n: int, **config) -> None:
    """n adapters of one recipe (same rank, targets and config; different weights), their headers
    alike but unlike any other test's (a metadata tag of their own)."""
    tag = uuid.uuid4().hex
    for i in range(n):
        folder = root / f"a{i:02d}"
        write_random_adapter(folder, 8, 16, QV, seed=i, shape=SHAPE)
        # one metadata key: safetensors writes several in no fixed order, and the headers would differ
        save_file(load_file(str(folder / ST)), str(folder / ST), metadata={"batch": tag})
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg.update(config)
        (folder / "adapter_config.json").write_text(json.dumps(cfg))


def test_per_config_work_runs_once_for_adapters_alike(tmp_path, args, monkeypatch):
    # a pattern no other test uses: nothing is memoized for this config yet
    fresh = f"nothing_{uuid.uuid4().hex}"
    _alike(tmp_path, N, target_modules=r".*\.(q_proj|v_proj)", rank_pattern={fresh: 4, r"layers\.1\.q_proj": 8})
    matched = _counting(monkeypatch, module_patterns, "_match")
    collected = _counting(monkeypatch, checkpoint, "_collect_pairs")
    validated = _counting(monkeypatch, adapter_files, "_ints")  # two per header entry parsed
    store = HostStore(args)
    try:
        ok, bad = store.register_dir(tmp_path)
    finally:
        store.close()
    assert bad == {} and len(ok) == N
    assert len(matched) == 1  # the patterns were resolved over the module names once, not N times
    assert len(collected) == 1  # the tensor names and shapes were walked once
    tensors = len(load_file(str(tmp_path / "a00" / ST)))
    assert len(validated) == 2 * tensors  # the byte-identical headers were parsed once
    assert {store.info(n).rank for n in ok} == {8} and {store.info(n).targets for n in ok} == {tuple(QV)}


def test_what_differs_per_adapter_is_still_checked_each_time(tmp_path, args, caplog):
    """Adapters that share a config and header with registered ones are still refused for what is
    their own: a truncated file, a mismatched tensor, a folder that cannot be resolved; and each
    gets its own warning for tensors outside target_modules."""
    _alike(tmp_path, 4, target_modules=["q_proj"])  # v_proj tensors are present but not targeted
    truncated = tmp_path / "a01"  # same header bytes as the others, fewer data bytes
    data = (truncated / ST).read_bytes()
    (truncated / ST).write_bytes(data[:-4])
    wrong = tmp_path / "a02"  # one tensor of another rank: the shapes differ, so it is checked anew
    t = load_file(str(wrong / ST))
    key = next(k for k in sorted(t) if "q_proj.lora_A" in k)
    t[key] = t[key][:4].clone()
    save_file(t, str(wrong / ST), metadata={"format": "pt"})
    os.symlink(tmp_path / "loop", tmp_path / "loop")  # a folder that is a symlink loop
    store = HostStore(args)
    try:
        with caplog.at_level(logging.WARNING, logger=checkpoint.__name__):
            ok, bad = store.register_dir(tmp_path)
        assert sorted(ok) == ["a00", "a03"]
        assert "truncated" in bad["a01"] and "data" in bad["a01"]
        assert "lora_A" in bad["a02"]
        # a loop is no folder for the scan (as before); registering it by name says why it fails
        assert "loop" not in bad
        with pytest.raises(checkpoint.AdapterError, match="cannot resolve folder"):
            store.register("loop", tmp_path / "loop")
        for name in ok:  # warned for each adapter, not once for the config
            assert any(f"adapter '{name}': ignoring" in r.getMessage() for r in caplog.records), name
    finally:
        store.close()


def test_a_changed_budget_matches_patterns_again(args, monkeypatch):
    """Where matching runs (INPROC_STEPS) is part of the memo's key, so lowering it sends the
    patterns to the worker rather than answering from what the process matched before."""
    names = module_patterns.module_names(args.num_layers)
    cfg = {"target_modules": QV, "rank_pattern": {f"x{uuid.uuid4().hex}|q_proj": 4}}
    first = module_patterns.module_rules(cfg, names)
    assert module_patterns.module_rules(cfg, names) is first
    workers = _counting(monkeypatch, module_patterns, "_match_in_worker")
    monkeypatch.setattr(module_patterns, "INPROC_STEPS", 0)
    again = module_patterns.module_rules(cfg, names)
    assert len(workers) == 1 and again.rank == first.rank
