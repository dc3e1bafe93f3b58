"""Broken adapters are refused with an AdapterError naming the adapter and the reason; a refused
adapter leaves nothing behind in the HostStore and the adapters already registered keep working.
What the config and the safetensors header show is refused at registration; bad values (NaN/Inf)
only on the first read of the weights, which marks the adapter broken."""

from __future__ import annotations

import re

import pytest
import torch
from adapter_cases import ALL, CASES, ST, VALUE_CASES, P, build_env, keep_store, msg, same, snapshot
from safetensors.torch import load_file

from caraserve.lora.checkpoint import AdapterError, inspect_adapter, load_adapter
from caraserve.lora.host_store import UnknownAdapterError


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return build_env(tmp_path_factory.mktemp("validation"))


@pytest.fixture
def store(env):
    return keep_store(env)

# ---------------------------------------------------------------- tests


def test_good_adapter_is_valid(env, store):
    """The sources the broken copies start from load, so each refusal below is caused by the break."""
    root, src, args = env
    info = store.info("keep")
    assert (info.rank, info.scale, info.targets) == (8, 2.0, ("q_proj", "v_proj"))
    w = store.get("keep")
    t = load_file(str(src / "good" / ST))
    assert torch.equal(w.a["q_proj"][1], t[f"{P}.1.self_attn.q_proj.lora_A.weight"].t())
    assert torch.equal(w.b["v_proj"][0], t[f"{P}.0.self_attn.v_proj.lora_B.weight"].t())
    good2 = load_adapter(src / "good2", args)
    assert good2.rank == 4 and good2.targets == tuple(ALL)


@pytest.mark.parametrize("case", list(CASES))
def test_broken_adapter_refused_and_nothing_left(env, store, tmp_path, case):
    root, src, args = env
    build, reason = CASES[case]
    folder = build(src, tmp_path / case)
    keep = store.get("keep")
    snap = snapshot(keep)
    names, cached = store.names(), store.stats().cached_bytes

    with pytest.raises(AdapterError, match=msg(case, reason)):
        store.register(case, folder)
    # inspect_adapter and load_adapter alone give the same refusal
    with pytest.raises(AdapterError, match=msg(case, reason)):
        inspect_adapter(folder, args, case)
    with pytest.raises(AdapterError, match=msg(case, reason)):
        load_adapter(folder, args, case)

    assert store.names() == names == ["keep"]
    assert case not in store
    with pytest.raises(UnknownAdapterError):
        store.info(case)
    with pytest.raises(UnknownAdapterError):
        store.get(case)
    assert store.stats().cached_bytes == cached
    reads = store.stats().disk_reads
    again = store.get("keep")
    assert store.stats().disk_reads == reads
    assert same(again, snap)
    assert same(load_adapter(src / "good", args, "keep"), snap)
    # no leftover blocks the name: a good adapter can take it afterwards
    info = store.register(case, src / "good2")
    assert info.rank == 4 and store.names() == sorted(["keep", case])


@pytest.mark.parametrize("case", list(VALUE_CASES))
def test_bad_values_refused_on_first_read_and_adapter_marked_broken(env, store, tmp_path, case):
    _, src, args = env
    build, reason = VALUE_CASES[case]
    folder = build(src, tmp_path / case)
    info = store.register(case, folder)  # the header is fine
    assert info.rank == 8 and store.broken(case) is None
    with pytest.raises(AdapterError, match=msg(case, reason)):
        store.get(case)
    assert re.search(msg(case, reason), store.broken(case))
    assert case in store and not store.ready(case)  # stays registered so requests get a clear error
    reads = store.stats().disk_reads
    with pytest.raises(AdapterError, match=msg(case, reason)):  # refused again without a re-read
        store.get(case)
    assert store.stats().disk_reads == reads
    with pytest.raises(AdapterError, match=msg(case, reason)):
        load_adapter(folder, args, case)
    assert same(store.get("keep"), snapshot(load_adapter(src / "good", args)))
    store.unregister(case)  # the name is free again
    assert store.register(case, src / "good2").rank == 4 and store.broken(case) is None
