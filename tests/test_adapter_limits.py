"""What one adapter registration may cost is bounded: the number of registered adapters, the size
of each file read, the folders files may resolve into (symlinks), and the time PEFT's module
regexes may take; the host tier's default budget follows the memory the process may really use."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from helpers import copy_adapter, edit_config, save_random_hf_model
from safetensors.torch import load_file

from caraserve.config import AdapterConfig, EngineConfig, ModelConfig
from caraserve.lora.checkpoint import AdapterError, load_adapter
from caraserve.lora.host_store import HostStore, default_budget_bytes
from caraserve.model.loader import load_model
from caraserve.model.tiny import write_random_adapter

SHAPE = dict(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
QV = ["q_proj", "v_proj"]
ST, BIN, CFG = "adapter_model.safetensors", "adapter_model.bin", "adapter_config.json"
EVIL = r"([\w.]+)+!"  # exponential backtracking on any module name: hangs `re` for hours


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    save_random_hf_model(root / "base", "llama", **SHAPE)
    write_random_adapter(root / "src" / "good", 8, 16, QV, seed=1, shape=SHAPE)
    return root, load_model(root / "base", "float32").args


@pytest.fixture
def guard():
    """Fails a test that hangs inside `re` (sre checks for signals) instead of hanging the suite."""

    def stop(*_):
        raise TimeoutError("still running after 15 s")

    old = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, 15)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------- adapters.max_registered


def test_cap_on_registered_adapters_at_start_up_scan(env, tmp_path):
    root, args = env
    for i in range(4):
        copy_adapter(root / "src" / "good", tmp_path / f"a{i}")
    store = HostStore(args, max_registered=2)
    ok, bad = store.register_dir(tmp_path)
    assert ok == ["a0", "a1"] and sorted(bad) == ["a2", "a3"]
    for name in ("a2", "a3"):
        assert re.search(rf"adapter '{name}' refused: 2 adapters are registered, the cap "
                         r"adapters\.max_registered=2", bad[name]), bad[name]
    assert store.names() == ["a0", "a1"]


def test_cap_on_registered_adapters_at_run_time(env):
    root, args = env
    store = HostStore(args, max_registered=2)
    store.register("x", root / "src" / "good")
    store.add(load_adapter(root / "src" / "good", args, "y"))
    for register in (lambda: store.register("z", root / "src" / "good"),
                     lambda: store.add(load_adapter(root / "src" / "good", args, "z"))):
        with pytest.raises(AdapterError, match=r"adapter 'z' refused: .*adapters\.max_registered=2"):
            register()
    assert store.names() == ["x", "y"]
    store.unregister("x")  # room again
    assert store.register("z", root / "src" / "good").rank == 8


def test_engine_applies_the_adapter_limits(env, tmp_path):
    """The engine hands adapters.max_registered and its adapters dir (as the root of runtime
    loads) to the store."""
    from caraserve.engine import Engine

    root, _ = env
    adapters = tmp_path / "adapters"
    for i in range(3):
        copy_adapter(root / "src" / "good", adapters / f"a{i}")
    escape = copy_adapter(root / "src" / "good", adapters / "a-escape")  # sorts first
    (escape / ST).unlink()
    (escape / ST).symlink_to(root / "src" / "good" / ST)
    engine = Engine(EngineConfig(model=ModelConfig(path=str(root / "base")),
                                 adapters=AdapterConfig(dir=str(adapters), max_registered=2, rank_buckets=(8, 16)),
                                 device="cpu", compile="false", max_batch_size=2, max_seq_len=64))
    # the operator's own folder follows its symlinks; the cap still holds
    assert [a.name for a in engine.adapters()] == ["a-escape", "a0"]
    assert "adapters.max_registered=2" in engine.adapter_errors["a1"]
    assert "adapters.max_registered=2" in engine.adapter_errors["a2"]
    with pytest.raises(AdapterError, match=r"adapters\.max_registered=2"):
        engine.register_adapter("late", adapters / "a2")
    engine.unregister_adapter("a0")
    with pytest.raises(AdapterError, match="outside the allowed adapter roots"):  # runtime loads are confined
        engine.register_adapter("late", escape)


# ---------------------------------------------------------------- adapters.max_file_bytes


def _no_reads(monkeypatch):
    import safetensors.torch

    def read(*a, **k):
        raise AssertionError("an adapter file over the cap was read")

    monkeypatch.setattr(safetensors.torch, "load_file", read)
    monkeypatch.setattr(torch, "load", read)


@pytest.mark.parametrize("which", [CFG, ST, BIN])
def test_file_over_max_file_bytes_refused_without_reading_it(env, tmp_path, monkeypatch, which):
    from caraserve.lora.checkpoint import ReadLimits

    root, args = env
    d = copy_adapter(root / "src" / "good", tmp_path / "big")
    if which == BIN:
        torch.save(load_file(str(d / ST)), str(d / BIN))
        (d / ST).unlink()
    if which == CFG:
        (d / CFG).write_text((d / CFG).read_text() + " " * 5000)  # still valid JSON
    size = (d / which).stat().st_size
    assert size > 4096
    store = HostStore(args, max_file_bytes=4096)
    _no_reads(monkeypatch)
    msg = rf"adapter 'big': .*{re.escape(which)} is {size} bytes, more than adapters\.max_file_bytes=4096"
    with pytest.raises(AdapterError, match=msg):
        store.register("big", d)
    with pytest.raises(AdapterError, match=msg):
        load_adapter(d, args, "big", ReadLimits(max_file_bytes=4096))
    assert store.names() == []


# ---------------------------------------------------------------- symlinks and special files


@pytest.mark.parametrize("which", [CFG, ST, "folder"])
def test_symlink_leaving_the_root_refused_and_inside_accepted(env, tmp_path, which):
    root, args = env
    inside, outside = tmp_path / "adapters", tmp_path / "elsewhere"
    target = copy_adapter(root / "src" / "good", outside / "good")
    shared = copy_adapter(root / "src" / "good", inside / "shared")
    store = HostStore(args, roots=[inside])

    def linked(name: str, to: Path) -> Path:
        if which == "folder":
            (inside / name).symlink_to(to, target_is_directory=True)
            return inside / name
        d = copy_adapter(root / "src" / "good", inside / name)
        (d / which).unlink()
        (d / which).symlink_to(to / which)
        return d

    escape = linked("escape", target)
    with pytest.raises(AdapterError, match=rf"adapter 'escape': .*resolves to {re.escape(str(target.resolve()))}"
                                           r".*outside the allowed adapter roots"):
        store.register("escape", escape)
    ok, bad = HostStore(args, roots=[inside]).register_dir(inside)  # the operator's folder: links followed
    assert ok == ["escape", "shared"] and not bad
    assert store.register("fine", linked("fine", shared)).rank == 8  # a link inside the root is fine
    assert HostStore(args).register("free", escape).rank == 8  # no roots: no confinement (plain-Python use)


@pytest.mark.parametrize("which", [CFG, ST])
def test_fifo_refused_without_blocking(env, tmp_path, guard, which):
    root, args = env
    d = copy_adapter(root / "src" / "good", tmp_path / "fifo")
    (d / which).unlink()
    os.mkfifo(d / which)
    with pytest.raises(AdapterError, match=rf"adapter 'fifo': .*{re.escape(which)} is not a regular file"):
        HostStore(args).register("fifo", d)


# ---------------------------------------------------------------- PEFT's module regexes


@pytest.mark.parametrize("field", ["target_modules", "rank_pattern", "alpha_pattern"])
def test_pathological_regex_refused_quickly(env, tmp_path, guard, field):
    root, args = env
    d = copy_adapter(root / "src" / "good", tmp_path / "evil")
    edit_config(d, **({field: EVIL} if field == "target_modules" else {field: {EVIL: 8}}))
    store = HostStore(args)
    what = "target_modules regex" if field == "target_modules" else f"{field} key"
    t0 = time.monotonic()
    with pytest.raises(AdapterError, match=rf"adapter 'evil': {what} .* takes more than 1s to match"):
        store.register("evil", d)
    assert time.monotonic() - t0 < 5
    assert store.names() == []


def test_pattern_length_and_key_count_are_capped(env, tmp_path):
    root, args = env
    d = copy_adapter(root / "src" / "good", tmp_path / "long")
    edit_config(d, target_modules="q_proj|" * 100)
    with pytest.raises(AdapterError, match=r"adapter 'long': target_modules regex is 700 characters, more than 512"):
        load_adapter(d, args)
    edit_config(d, target_modules=QV, rank_pattern={f"k{i}": 8 for i in range(600)},
                 alpha_pattern={f"k{i}": 8 for i in range(600)})
    with pytest.raises(AdapterError, match=r"rank_pattern and alpha_pattern hold 1200 keys, more than 1024"):
        load_adapter(d, args)


TARGET_REGEXES = [r".*\.(q_proj|v_proj)", r"model\.layers\.1\..*", "q_proj", r".*q_proj", "(?i).*Q_PROJ",
                  "model.layers.0.self_attn.q_proj", r"^(?!.*mlp).*proj$", r"model\.layers\.\d+\.mlp\.(up|down)_proj"]
PATTERN_KEYS = {"layers.1.self_attn.q_proj": 4, "q_proj": 12, r"layers\.\d+\.mlp\..*": 6, "mlp.*": 5,
                "0.self_attn.v_proj|up_proj": 3, "(x+x+)+y": 2, "(a+)+$": 9, "k_pro": 7, "model": 1}


@pytest.mark.parametrize("where", ["default", "worker-only"])
def test_patterns_resolve_as_peft_resolves_them(env, tmp_path, monkeypatch, where):
    """Both ways of matching (in this process when statically bounded, else in the worker) give
    PEFT's answers, and an adapter with regexes loads as the same adapter with plain names."""
    from peft.utils.other import get_pattern_key, match_target_against_key

    from caraserve.lora import module_patterns
    from caraserve.lora.module_patterns import module_names, module_rules

    names = module_names(3)
    if where == "worker-only":
        monkeypatch.setattr(module_patterns, "INPROC_STEPS", 0)
    else:  # plain keys stay in this process, repeats go to the worker
        assert module_patterns._steps_bound("layers.1.self_attn.q_proj", False, names) is not None
        assert module_patterns._steps_bound(r".*\.(q_proj|v_proj)", True, names) is None
    for target in TARGET_REGEXES:
        rules = module_rules({"target_modules": target}, names)
        assert rules.targets == {n for n in names if match_target_against_key(target, n)}, target
    keys = list(PATTERN_KEYS)
    for order in (keys, keys[::-1]):  # the first matching key wins
        pattern = {k: PATTERN_KEYS[k] for k in order}
        rules = module_rules({"target_modules": QV, "rank_pattern": pattern, "alpha_pattern": pattern}, names)
        for n in names:
            assert rules.rank.get(n) == pattern.get(get_pattern_key(order, n)), n
        assert rules.alpha == rules.rank
    assert module_rules({"target_modules": ["q_proj", "mlp.up_proj"]}, names).targets == {
        n for n in names if n.endswith(".q_proj") or n.endswith(".up_proj")}

    root, args = env
    d = copy_adapter(root / "src" / "good", tmp_path / "regex")
    edit_config(d, target_modules=r".*\.(q_proj|v_proj)", rank_pattern={r"layers\.\d\.self_attn\.v.*": 8},
                 alpha_pattern={"v_proj": 32})
    got, ref = load_adapter(d, args), load_adapter(root / "src" / "good", args)
    assert got.targets == ref.targets == ("q_proj", "v_proj")
    assert torch.equal(got.a["q_proj"], ref.a["q_proj"]) and torch.equal(got.b["q_proj"], ref.b["q_proj"])
    assert torch.allclose(got.b["v_proj"], 2 * ref.b["v_proj"])  # alpha 32 vs 16 folded into b


# ---------------------------------------------------------------- the host tier's default budget


def test_default_budget_is_a_quarter_of_the_memory_the_process_may_use(env, tmp_path):
    _, args = env
    phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cg = tmp_path / "cgroup"
    proc = tmp_path / "proc_self_cgroup"

    proc.write_text("0::/kubepods/pod1\n")  # cgroup v2: the tightest of the cgroup and its ancestors
    (cg / "kubepods" / "pod1").mkdir(parents=True)
    (cg / "kubepods" / "pod1" / "memory.max").write_text("max\n")
    (cg / "kubepods" / "memory.max").write_text(f"{2**30}\n")
    assert default_budget_bytes(proc, cg) == min(phys, 2**30) // 4

    proc.write_text("5:memory:/docker/abc\n4:cpu:/docker/abc\n")  # cgroup v1
    (cg / "memory" / "docker" / "abc").mkdir(parents=True)
    (cg / "memory" / "docker" / "abc" / "memory.limit_in_bytes").write_text(f"{3 * 2**29}\n")
    assert default_budget_bytes(proc, cg) == min(phys, 3 * 2**29) // 4

    (cg / "memory" / "docker" / "abc" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # unlimited
    assert default_budget_bytes(proc, cg) == phys // 4
    assert default_budget_bytes(tmp_path / "missing", cg) == phys // 4

    store = HostStore(args, budget_bytes=-1)
    assert 0 < store.budget_bytes == default_budget_bytes() <= phys // 4


def test_rank_past_the_largest_bucket_refused_before_stacking(env, tmp_path, monkeypatch):
    """Stacking allocates layers x in x rank: a huge declared rank must be refused before it."""
    root, args = env
    big = tmp_path / "big"
    write_random_adapter(big, 32, 16, QV, seed=2, shape=SHAPE)
    stacked = []
    real_zeros = torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: stacked.append(a) or real_zeros(*a, **k))
    with pytest.raises(AdapterError, match=r"rank 32 is larger than the largest rank bucket 16"):
        HostStore(args, max_rank=16).register("big", big)
    assert not stacked
    assert HostStore(args, max_rank=32).register("big", big).rank == 32
