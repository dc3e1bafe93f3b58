"""Bad weights found on a host-tier read: values refused on first use (the adapter marked
broken), files changed or gone since registration, a new checkpoint of the same shapes, and
read errors that may pass (only that read fails)."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from host_tier_cases import QV, SHAPE, ST, poison, same_weights
from safetensors.torch import load_file, save_file

from caraserve.lora.checkpoint import AdapterError, load_adapter
from caraserve.model.tiny import write_random_adapter

# ---------------------------------------------------------------- bad weights found on first read


@pytest.mark.parametrize("how", ["get", "fetch"])
def test_nan_adapter_registers_and_is_refused_on_first_use(tier_env, tier_stores, tmp_path, how):
    root, args = tier_env
    bad = poison(shutil.copytree(root / "many" / "a00", tmp_path / "nan"))
    store = tier_stores(args)
    store.register("good", root / "many" / "a01")
    assert store.register("nan", bad).rank == 4  # the header is fine
    assert store.broken("nan") is None
    reason = r"adapter 'nan': .* holds NaN or Inf values"
    with pytest.raises(AdapterError, match=reason):
        store.get("nan") if how == "get" else store.fetch("nan").result(timeout=30)
    assert re.search(reason, store.broken("nan"))
    assert "nan" in store and store.names() == ["good", "nan"] and not store.ready("nan")
    reads = store.stats().disk_reads
    with pytest.raises(AdapterError, match=reason):  # refused again at once, no re-read
        store.fetch("nan").result(timeout=0)
    with pytest.raises(AdapterError, match=reason):
        store.get("nan")
    assert store.stats().disk_reads == reads
    ref = load_adapter(root / "many" / "a01", args)
    assert same_weights(store.fetch("good").result(timeout=30), ref)  # the others go on
    store.unregister("nan")
    assert store.broken("nan") is None and "nan" not in store


def test_huge_finite_weights_are_not_taken_for_inf(tier_env, tier_stores, tmp_path):
    """The first read checks values through a sum per module; weights whose sum overflows to Inf
    while every value is finite are accepted (the exact check decides)."""
    root, args = tier_env
    folder = shutil.copytree(root / "many" / "a00", tmp_path / "huge")
    t = load_file(str(folder / ST))
    key = next(k for k in sorted(t) if "lora_B" in k)
    t[key] = t[key].clone()
    t[key][0, :2] = 3e38  # finite in float32; their sum is not
    save_file(t, str(folder / ST))
    store = tier_stores(args)
    store.register("huge", folder)
    w = store.get("huge")
    assert store.broken("huge") is None and torch.isfinite(torch.cat([b.flatten() for b in w.b.values()])).all()


def test_files_changed_or_vanished_after_registration_refused_on_read(tier_env, tier_stores, tmp_path):
    root, args = tier_env
    store = tier_stores(args)
    changed = shutil.copytree(root / "many" / "a00", tmp_path / "changed")  # rank 4
    gone = shutil.copytree(root / "many" / "a01", tmp_path / "gone")
    store.register("changed", changed)
    store.register("gone", gone)
    shutil.rmtree(changed)
    write_random_adapter(changed, 16, 16, QV, seed=99, shape=SHAPE)  # valid, but not what was registered
    (gone / ST).unlink()
    with pytest.raises(AdapterError, match=r"adapter 'changed': its files in .* changed since it was registered"):
        store.get("changed")
    with pytest.raises(AdapterError, match=r"adapter 'gone': no adapter_model\.safetensors"):
        store.fetch("gone").result(timeout=30)
    assert "changed since" in store.broken("changed") and "no adapter_model" in store.broken("gone")


def _room_for_one_of_two(tier_env, tier_stores, tmp_path):
    """(a store whose budget holds one of its adapters "kept" and "other", kept's folder): getting
    one drops the other's weights."""
    root, args = tier_env
    kept = shutil.copytree(root / "many" / "a00", tmp_path / "kept")
    other = shutil.copytree(root / "many" / "a01", tmp_path / "other")
    size = tier_stores(args).register("probe", kept).nbytes
    store = tier_stores(args, budget_bytes=size)
    store.register("kept", kept)
    store.register("other", other)
    return store, kept


def test_a_new_checkpoint_of_the_same_shapes_is_refused_when_read_again(tier_env, tier_stores, tmp_path):
    """A training job saving its next checkpoint into a served folder: the shapes, rank and
    scale stay, the weights do not. Re-read after the host tier dropped the old ones, they would
    be served beside the prefix-cache blocks the old weights computed; they are refused instead."""
    store, kept = _room_for_one_of_two(tier_env, tier_stores, tmp_path)
    first = store.get("kept")
    cfg = json.loads((kept / "adapter_config.json").read_text())
    write_random_adapter(kept, cfg["r"], cfg["lora_alpha"], tuple(cfg["target_modules"]), seed=123, shape=SHAPE)
    store.get("other")  # the budget drops "kept"
    with pytest.raises(AdapterError, match=r"adapter 'kept': its files in .* changed since it was registered"):
        store.get("kept")
    store.unregister("kept")
    store.register("kept", kept)
    again = store.get("kept")
    assert not all(torch.equal(again.a[m], first.a[m]) for m in first.a)
    # as `tar -x` writes it: the file unlinked, made anew (its inode number may be reused) and
    # given back its old modification time; the content tells
    st = (kept / ST).stat()
    data = bytearray((kept / ST).read_bytes())
    data[-4:] = bytes(4)  # another value in the last tensor, the same header
    (kept / ST).unlink()
    (kept / ST).write_bytes(bytes(data))
    os.utime(kept / ST, ns=(st.st_atime_ns, st.st_mtime_ns))
    store.get("other")
    with pytest.raises(AdapterError, match="changed since it was registered"):
        store.get("kept")


def test_the_same_bytes_copied_or_touched_are_served_when_read_again(tier_env, tier_stores, tmp_path):
    """A re-read after the host tier dropped the weights compares what it read with what the
    adapter served, not file times: a `touch`, or a copy of the same bytes over the file (a new
    inode, new times), changes nothing a request sees."""
    store, kept = _room_for_one_of_two(tier_env, tier_stores, tmp_path)
    first = {m: t.clone() for m, t in store.get("kept").a.items()}
    os.utime(kept / ST, ns=(1, 1))
    os.utime(kept / "adapter_config.json")
    store.get("other")  # the budget drops "kept"
    assert all(torch.equal(store.get("kept").a[m], first[m]) for m in first)
    data = (kept / ST).read_bytes()
    (kept / ST).unlink()
    (kept / ST).write_bytes(data)
    store.get("other")
    assert all(torch.equal(store.get("kept").a[m], first[m]) for m in first)
    assert store.broken("kept") is None and store.stats().disk_reads >= 4


def test_an_io_error_fails_that_read_only_and_the_next_use_reads_again(tier_env, tier_stores, monkeypatch):
    """EIO (or no file descriptors, no memory) is the machine's, not the adapter's: that read
    fails, the adapter is not marked broken, and the next use reads it again."""
    import errno

    from helpers import failing_weight_reads

    from caraserve.lora.adapter_files import AdapterReadError

    root, args = tier_env
    store = tier_stores(args)
    store.register("a", root / "many" / "a00")
    failures = failing_weight_reads(monkeypatch, OSError(errno.EIO, "Input/output error"))
    with pytest.raises(AdapterReadError, match=r"adapter 'a': cannot read .*Input/output error"):
        store.fetch("a").result(timeout=30)
    assert store.broken("a") is None
    assert same_weights(store.fetch("a").result(timeout=30), load_adapter(root / "many" / "a00", args))
    failures.append(PermissionError(errno.EACCES, "Permission denied"))  # says something about the files
    store.unregister("a")
    store.register("a", root / "many" / "a00")
    with pytest.raises(AdapterError, match="Permission denied") as refused:
        store.get("a")
    assert not isinstance(refused.value, AdapterReadError) and "Permission denied" in store.broken("a")


