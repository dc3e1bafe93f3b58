"""Broken adapters are refused with an AdapterError naming the adapter and the reason; a refused
adapter leaves nothing behind in the HostStore and the adapters already registered keep working.
What the config and the safetensors header show is refused at registration; bad values (NaN/Inf)
only on the first read of the weights, which marks the adapter broken."""

from __future__ import annotations

import re

import pytest
import torch
from adapter_cases import ALL, CASES, ST, VALUE_CASES, P, msg, same, snapshot
from safetensors.torch import load_file

from caraserve.lora.checkpoint import AdapterError, inspect_adapter, load_adapter
from caraserve.lora.host_store import UnknownAdapterError

# ---------------------------------------------------------------- tests


def test_good_adapter_is_valid(adapter_env, adapter_store):
    """The sources the broken copies start from load, so each refusal below is caused by the break."""
    root, src, args = adapter_env
    info = adapter_store.info("keep")
    assert (info.rank, info.scale, info.targets) == (8, 2.0, ("q_proj", "v_proj"))
    w = adapter_store.get("keep")
    t = load_file(str(src / "good" / ST))
    assert torch.equal(w.a["q_proj"][1], t[f"{P}.1.self_attn.q_proj.lora_A.weight"].t())
    assert torch.equal(w.b["v_proj"][0], t[f"{P}.0.self_attn.v_proj.lora_B.weight"].t())
    good2 = load_adapter(src / "good2", args)
    assert good2.rank == 4 and good2.targets == tuple(ALL)


@pytest.mark.parametrize("case", list(CASES))
def test_broken_adapter_refused_and_nothing_left(adapter_env, adapter_store, tmp_path, case):
    root, src, args = adapter_env
    build, reason = CASES[case]
    folder = build(src, tmp_path / case)
    keep = adapter_store.get("keep")
    snap = snapshot(keep)
    names, cached = adapter_store.names(), adapter_store.stats().cached_bytes

    with pytest.raises(AdapterError, match=msg(case, reason)):
        adapter_store.register(case, folder)
    # inspect_adapter and load_adapter alone give the same refusal
    with pytest.raises(AdapterError, match=msg(case, reason)):
        inspect_adapter(folder, args, case)
    with pytest.raises(AdapterError, match=msg(case, reason)):
        load_adapter(folder, args, case)

    assert adapter_store.names() == names == ["keep"]
    assert case not in adapter_store
    with pytest.raises(UnknownAdapterError):
        adapter_store.info(case)
    with pytest.raises(UnknownAdapterError):
        adapter_store.get(case)
    assert adapter_store.stats().cached_bytes == cached
    reads = adapter_store.stats().disk_reads
    again = adapter_store.get("keep")
    assert adapter_store.stats().disk_reads == reads
    assert same(again, snap)
    assert same(load_adapter(src / "good", args, "keep"), snap)
    # no leftover blocks the name: a good adapter can take it afterwards
    info = adapter_store.register(case, src / "good2")
    assert info.rank == 4 and adapter_store.names() == sorted(["keep", case])


@pytest.mark.parametrize("case", list(VALUE_CASES))
def test_bad_values_refused_on_first_read_and_adapter_marked_broken(adapter_env, adapter_store, tmp_path, case):
    _, src, args = adapter_env
    build, reason = VALUE_CASES[case]
    folder = build(src, tmp_path / case)
    info = adapter_store.register(case, folder)  # the header is fine
    assert info.rank == 8 and adapter_store.broken(case) is None
    with pytest.raises(AdapterError, match=msg(case, reason)):
        adapter_store.get(case)
    assert re.search(msg(case, reason), adapter_store.broken(case))
    assert case in adapter_store and not adapter_store.ready(case)  # stays registered so requests get a clear error
    reads = adapter_store.stats().disk_reads
    with pytest.raises(AdapterError, match=msg(case, reason)):  # refused again without a re-read
        adapter_store.get(case)
    assert adapter_store.stats().disk_reads == reads
    with pytest.raises(AdapterError, match=msg(case, reason)):
        load_adapter(folder, args, case)
    assert same(adapter_store.get("keep"), snapshot(load_adapter(src / "good", args)))
    adapter_store.unregister(case)  # the name is free again
    assert adapter_store.register(case, src / "good2").rank == 4 and adapter_store.broken(case) is None
