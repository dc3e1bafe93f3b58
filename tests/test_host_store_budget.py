"""HostStore's memory budget on CPU: at most the budget kept, LRU drops re-read from disk, the
resident dtype's size, and unregistering."""

from __future__ import annotations

import pytest
import torch
from pool_cases import clone, equal, qv8_bytes

from caraserve.lora.host_store import HostStore, UnknownAdapterError


def _reads(store) -> int:
    return store.stats().disk_reads


def _cached_bytes(store) -> int:
    return store.stats().cached_bytes


def test_budget_keeps_at_most_budget_and_rereads_dropped(pool_env):
    root, args, _ = pool_env
    nb = qv8_bytes()
    budget = nb * 5 // 2  # room for two
    store = HostStore(args, budget_bytes=budget)
    first = {}
    for i in range(5):
        name = f"b{i}"
        info = store.register(name, root / "budget" / name)
        assert info.nbytes == nb
        assert _reads(store) == i and _cached_bytes(store) <= budget  # registration reads no weights
        first[name] = clone(store.get(name))  # the first use reads them
        assert _reads(store) == i + 1
        store.get(name)  # now in memory
        assert _reads(store) == i + 1 and _cached_bytes(store) <= budget
    assert store.names() == [f"b{i}" for i in range(5)]
    assert _cached_bytes(store) == 2 * nb  # b3, b4
    assert _reads(store) == 5

    for name in ("b4", "b3"):
        w = store.get(name)
        assert _reads(store) == 5 and equal(w, first[name])
    w0 = store.get("b0")  # dropped: read again
    assert _reads(store) == 6
    assert equal(w0, first["b0"])
    assert _cached_bytes(store) == 2 * nb  # b0 in, b4 (least recently used) out
    assert store.get("b0") is w0 and _reads(store) == 6
    store.get("b3")
    assert _reads(store) == 6
    w4 = store.get("b4")
    assert _reads(store) == 7 and equal(w4, first["b4"])
    for i in range(5):
        assert equal(store.get(f"b{i}"), first[f"b{i}"])
        assert _cached_bytes(store) <= budget
    # differently seeded adapters differ, so the equality checks above mean something
    assert not torch.equal(first["b0"][("a", "q_proj")], first["b1"][("a", "q_proj")])


def test_budget_lru_follows_get(pool_env):
    root, args, _ = pool_env
    nb = qv8_bytes()
    store = HostStore(args, budget_bytes=nb * 5 // 2)
    store.register("b0", root / "budget" / "b0")
    store.register("b1", root / "budget" / "b1")
    store.get("b1")
    store.get("b0")  # b1 is now the least recently used
    store.register("b2", root / "budget" / "b2")
    store.get("b2")
    assert _reads(store) == 3
    store.get("b0")
    assert _reads(store) == 3
    store.get("b1")
    assert _reads(store) == 4


def test_no_budget_keeps_everything_and_tiny_budget_keeps_one(pool_env):
    root, args, _ = pool_env
    nb = qv8_bytes()
    unlimited = HostStore(args)
    tiny = HostStore(args, budget_bytes=nb // 2)
    for i in range(5):
        for store in (unlimited, tiny):
            store.register(f"b{i}", root / "budget" / f"b{i}")
            store.get(f"b{i}")
    assert _cached_bytes(unlimited) == 5 * nb
    assert _cached_bytes(tiny) == nb  # the newest stays even when alone it exceeds the budget
    for i in range(5):
        unlimited.get(f"b{i}")
    assert _reads(unlimited) == 5


def test_store_dtype_sets_resident_size(pool_env):
    root, args, _ = pool_env
    store = HostStore(args, dtype=torch.float16)
    info = store.register("b0", root / "budget" / "b0")
    assert info.nbytes == qv8_bytes() // 2
    assert all(t.dtype == torch.float16 for t in store.get("b0").a.values())
    assert _cached_bytes(store) == info.nbytes == store.get("b0").nbytes


def test_unregister_then_get_raises(pool_env):
    root, args, _ = pool_env
    nb = qv8_bytes()
    store = HostStore(args, budget_bytes=nb * 5 // 2)
    for i in range(3):
        store.register(f"b{i}", root / "budget" / f"b{i}")
        store.get(f"b{i}")
    store.unregister("b2")  # in memory
    store.unregister("b0")  # dropped by the budget
    assert store.names() == ["b1"] and "b2" not in store and "b0" not in store
    assert _cached_bytes(store) == nb
    for name in ("b0", "b2"):
        with pytest.raises(UnknownAdapterError, match=f"adapter '{name}' is not registered"):
            store.get(name)
        with pytest.raises(UnknownAdapterError):
            store.info(name)
        with pytest.raises(UnknownAdapterError):
            store.unregister(name)
    assert _reads(store) == 3
    store.register("b2", root / "budget" / "b3")  # the name is free again, now for other weights
    ref = HostStore(args)
    ref.register("b3", root / "budget" / "b3")
    assert equal(store.get("b2"), clone(ref.get("b3")))


def test_a_read_landing_after_a_hold_put_the_weights_back_counts_them_once(pool_env, monkeypatch):
    """A request admitted on weights read earlier puts them back (hold) while a later request's
    re-read of the same adapter is on its way; the read lands after: the adapter is in memory
    once, and once it is gone nothing is left counted (the budget would otherwise shrink for good)."""
    import threading

    import caraserve.lora.host_store as host_store

    root, args, _ = pool_env
    nb = qv8_bytes()
    gate = threading.Event()
    gate.set()
    load = host_store.load_adapter
    monkeypatch.setattr(host_store, "load_adapter", lambda *a, **k: gate.wait(30) and load(*a, **k))
    store = HostStore(args, budget_bytes=nb * 3 // 2)  # room for one
    for name in ("b0", "b1"):
        store.register(name, root / "budget" / name)
    early = store.fetch("b0").result()  # a request's read, done while b0 is in memory
    store.get("b1")  # the budget drops b0
    assert not store.ready("b0")
    gate.clear()
    reread = store.fetch("b0")  # another request's read, held up on its I/O thread
    store.hold("b0", early)  # the first request is admitted: its weights go back in
    gate.set()
    assert equal(reread.result(), clone(early))
    stats = store.stats()
    assert (stats.cached, stats.cached_bytes) == (1, nb)
    store.release("b0")
    store.unregister("b0")
    store.unregister("b1")
    stats = store.stats()
    assert (stats.cached, stats.cached_bytes) == (0, 0)


def test_listing_adapters_while_others_come_and_go_never_meets_a_missing_one(pool_env):
    """/v1/models and the engine's snapshot list every adapter's info while loads and unloads run
    on other threads: each listing is of one moment, never an UnknownAdapterError (a 500)."""
    import dataclasses
    import sys
    import threading
    import types

    from caraserve.adapter_catalog import AdapterCatalog
    from caraserve.lora.synthetic import random_lora

    _, args, _ = pool_env
    store = HostStore(args)
    w = random_lora("x", 8, args, ("q_proj",), 0)
    names = [f"a{i:04d}" for i in range(1500)]
    for name in names:
        store.add(dataclasses.replace(w, name=name))
    stop, errors = threading.Event(), []

    def churn():
        i = 0
        while not stop.is_set():
            name = names[i % len(names)]
            store.unregister(name)
            store.add(dataclasses.replace(w, name=name))
            i += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    worker = threading.Thread(target=churn)
    worker.start()
    try:
        for _ in range(150):
            try:
                infos = AdapterCatalog.infos(types.SimpleNamespace(store=store))
                assert [i.name for i in infos] == sorted(i.name for i in infos)
            except UnknownAdapterError as e:
                errors.append(e)
    finally:
        stop.set()
        worker.join()
        sys.setswitchinterval(interval)
    assert not errors, f"{len(errors)} of 150 listings met an adapter unregistered meanwhile: {errors[0]}"
