"""The host tier is lazy and bounded: registration reads only the config and the safetensors
header, the weights are read on first use (on the caller with `get`, on the store's I/O threads
with `fetch`, one read in flight per adapter), and the budget holds under churn without ever
dropping a held adapter. (Bad weights found on a read: test_host_tier_reads.py.)"""

from __future__ import annotations

import random
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from host_tier_cases import BIN, ST, poison, same_weights
from safetensors.torch import load_file

from caraserve.lora import host_store as host_store_module
from caraserve.lora.checkpoint import AdapterError, load_adapter
from caraserve.lora.host_store import HostStoreStats, UnknownAdapterError


def _bytes_read() -> int | None:
    """Bytes this process has read through read-like syscalls (Linux), page-cache hits included."""
    try:
        text = Path("/proc/self/io").read_text()
    except OSError:
        return None
    return int(re.search(r"^rchar: (\d+)", text, re.M)[1])


@pytest.fixture
def slow_reads(monkeypatch):
    """Weight reads that wait for `gate` and count themselves."""
    calls = []
    gate = threading.Event()
    real = host_store_module.load_adapter

    def slow(*a, **k):
        calls.append(a[2] if len(a) > 2 else k.get("name"))
        assert gate.wait(10), "the test never opened the gate"
        return real(*a, **k)

    monkeypatch.setattr(host_store_module, "load_adapter", slow)
    yield calls, gate
    gate.set()



# ---------------------------------------------------------------- registration is header-only


def test_registration_reads_no_weight_bytes(tier_env, tier_stores, monkeypatch):
    root, args = tier_env
    import safetensors
    import safetensors.torch

    def refuse(*a, **k):
        raise AssertionError("registration read the weights")

    store = tier_stores(args)
    with monkeypatch.context() as m:
        for owner, attr in ((safetensors.torch, "load_file"), (safetensors, "safe_open"), (torch, "load")):
            m.setattr(owner, attr, refuse)
        before = _bytes_read()
        info = store.register("big", root / "big")
        after = _bytes_read()
    weights_bytes = (root / "big" / ST).stat().st_size
    assert weights_bytes > 400_000
    if before is not None:  # the config and the header only: a few KB of a 0.5 MB file
        assert after - before < weights_bytes // 20, after - before
    ref = load_adapter(root / "big", args, "big")
    assert (info.rank, info.scale, info.targets, info.nbytes) == (ref.rank, ref.scale, ref.targets, ref.nbytes)
    s = store.stats()
    assert (s.registered, s.cached, s.cached_bytes, s.disk_reads) == (1, 0, 0, 0)
    assert not store.ready("big")
    assert same_weights(store.get("big"), ref)  # the first use reads them
    assert store.ready("big") and store.stats().disk_reads == 1


def test_truncated_weights_refused_at_registration(tier_env, tier_stores, tmp_path):
    root, args = tier_env
    d = shutil.copytree(root / "many" / "a00", tmp_path / "cut")
    data = (d / ST).read_bytes()
    (d / ST).write_bytes(data[:-10])
    with pytest.raises(AdapterError, match=r"adapter 'cut': cannot read .*adapter_model\.safetensors .*truncated"):
        tier_stores(args).register("cut", d)



# ---------------------------------------------------------------- reads off the caller's thread


def test_fetch_twice_while_a_slow_read_is_in_flight_starts_one_read(tier_env, tier_stores, slow_reads):
    root, args = tier_env
    calls, gate = slow_reads
    store = tier_stores(args)
    for name in ("a00", "a01"):
        store.register(name, root / "many" / name)
    gate.set()
    other = store.get("a01")  # in memory before the slow read starts
    gate.clear()
    calls.clear()

    t0 = time.monotonic()
    f1 = store.fetch("a00")
    f2 = store.fetch("a00")
    assert time.monotonic() - t0 < 1.0  # fetch returns while the read waits
    joined = []
    waiter = threading.Thread(target=lambda: joined.append(store.get("a00")))  # a blocking get joins it too
    waiter.start()
    time.sleep(0.1)
    assert not f1.done() and not store.ready("a00") and not f1.cancel()
    # the lock is not held during the read: everything else answers at once
    t0 = time.monotonic()
    assert store.get("a01") is other and store.names() == ["a00", "a01"] and store.stats().registered == 2
    assert store.names_page(None, 1) == (["a00"], True) and store.broken("a00") is None
    assert time.monotonic() - t0 < 1.0
    gate.set()
    w1, w2 = f1.result(timeout=30), f2.result(timeout=30)
    waiter.join(30)
    assert calls == ["a00"]  # one read for the two fetches and the get
    assert w1 is w2 is joined[0] is store.get("a00")
    assert store.fetch("a00").done() and store.stats().disk_reads == 2


def test_fetch_reads_on_io_threads_and_reports_latency(tier_env, tier_stores):
    root, args = tier_env
    store = tier_stores(args, io_threads=2)
    seen = []
    store.on_read = lambda s: seen.append((s, threading.current_thread().name))
    names = [f"a{i:02d}" for i in range(6)]
    for n in names:
        store.register(n, root / "many" / n)
    futures = [store.fetch(n) for n in names]
    for n, f in zip(names, futures):
        assert same_weights(f.result(timeout=30), load_adapter(root / "many" / n, args))
    assert len(seen) == 6 and all(s > 0 and t.startswith("adapter-io") for s, t in seen)
    assert len({t for _, t in seen}) <= 2
    store.get("a00")
    s = store.stats()
    assert isinstance(s, HostStoreStats)
    assert (s.registered, s.cached, s.hits, s.misses, s.disk_reads) == (6, 6, 1, 6, 6)
    assert s.cached_bytes == sum(store.info(n).nbytes for n in names)
    assert s.read_seconds_total == pytest.approx(sum(x for x, _ in seen))
    store.close()
    assert store.fetch("a00").done()  # in memory: no thread needed
    store.unregister("a01")
    store.register("a01", root / "many" / "a01")
    with pytest.raises(RuntimeError, match="closed"):
        store.fetch("a01")
    assert same_weights(store.get("a01"), load_adapter(root / "many" / "a01", args))  # get still reads itself


def test_unknown_names(tier_env, tier_stores):
    _, args = tier_env
    store = tier_stores(args)
    for call in (store.get, store.fetch, store.hold, store.info):
        with pytest.raises(UnknownAdapterError, match="adapter 'ghost' is not registered"):
            call("ghost")
    assert not store.ready("ghost") and store.broken("ghost") is None
    store.release("ghost")  # a request ending after its adapter was unregistered


# ---------------------------------------------------------------- the budget under churn


def test_budget_respected_under_churn_and_held_never_dropped(tier_env, tier_stores):
    root, args = tier_env
    names = [f"a{i:02d}" for i in range(20)]
    probe = tier_stores(args)
    sizes = {n: probe.register(n, root / "many" / n).nbytes for n in names}
    budget = 3 * max(sizes.values())
    store = tier_stores(args, budget_bytes=budget, io_threads=2)
    for n in names:
        store.register(n, root / "many" / n)
    held: dict[str, int] = {}
    refs = {n: load_adapter(root / "many" / n, args) for n in names}
    violations = []

    def check(quiet: bool) -> None:
        """quiet: no read in flight, so the store's numbers must add up exactly."""
        s = store.stats()
        cached = [n for n in names if store.ready(n)]
        held_bytes = sum(sizes[n] for n in list(held) if store.ready(n))
        # over budget only when held adapters force it (plus the one just read, about to be used)
        if s.cached_bytes > max(budget, held_bytes + max(sizes.values())):
            violations.append((s.cached_bytes, sorted(held)))
        if quiet and s.cached_bytes != sum(sizes[n] for n in cached):
            violations.append(("bytes", s.cached_bytes, cached))

    store.on_read = lambda _: check(quiet=False)  # from the I/O threads, right after each read
    rng = random.Random(0)
    for step in range(300):
        n = rng.choice(names)
        op = rng.random()
        if op < 0.15 and len(held) < 3:
            store.hold(n)
            held[n] = held.get(n, 0) + 1
            assert same_weights(store.fetch(n).result(timeout=30), refs[n])
        elif op < 0.3 and held:
            h = rng.choice(sorted(held))
            store.release(h)
            held[h] -= 1
            if not held[h]:
                del held[h]
        elif op < 0.65:
            assert same_weights(store.fetch(n).result(timeout=30), refs[n])
        else:
            futures = [store.fetch(x) for x in rng.sample(names, 4)]  # several reads in flight
            for f in futures:
                f.result(timeout=30)
        check(quiet=True)
        for h in held:  # a held adapter, once read, is never dropped
            assert store.ready(h), (step, h)
        if not held:
            assert store.stats().cached_bytes <= budget
    assert not violations, violations[:3]
    for h, k in list(held.items()):
        for _ in range(k):
            store.release(h)
    assert store.stats().cached_bytes <= budget  # releasing lets the budget drop the excess
    s = store.stats()
    assert s.disk_reads > 20 and s.hits > 0 and s.misses >= s.disk_reads


def test_held_adapters_kept_beyond_the_budget_until_released(tier_env, tier_stores):
    root, args = tier_env
    store = tier_stores(args, budget_bytes=1)  # nothing fits: only held and just-read weights stay
    for n in ("a01", "a04", "a07"):  # rank 8 each
        store.register(n, root / "many" / n)
    store.hold("a01")
    store.hold("a04")
    store.get("a01")
    store.get("a04")
    store.get("a07")
    assert store.ready("a01") and store.ready("a04") and store.ready("a07")  # a07: the newest
    store.get("a01")
    store.release("a01")  # a07 (unheld, least recently used) and a01 go; a04 is still held
    assert [store.ready(n) for n in ("a01", "a04", "a07")] == [False, True, False]
    store.release("a04")
    store.release("a04")  # once too often: ignored
    assert store.stats().cached == 0


# ---------------------------------------------------------------- listing thousands


def test_names_page_pages_in_order(tier_env, tier_stores):
    root, args = tier_env
    store = tier_stores(args)
    names = [f"t{i:03d}" for i in _shuffled(25)]
    for n in names:
        store.register(n, root / "many" / "a00")
    want = sorted(names)
    assert store.names() == want
    got, after, more = [], None, True
    while more:
        page, more = store.names_page(after, 7)
        assert len(page) <= 7
        got += page
        after = page[-1] if page else after
    assert got == want
    assert store.names_page(None, 100) == (want, False)
    assert store.names_page("t0125", 3) == (["t013", "t014", "t015"], True)  # after a name not registered
    assert store.names_page("t024", 5) == ([], False)
    assert store.names_page("zzz", 5) == ([], False)
    assert store.names_page(None, 0) == ([], True)
    store.unregister("t013")
    assert store.names_page("t012", 2) == (["t014", "t015"], True)
    with pytest.raises(ValueError):
        store.names_page(None, -1)


def _shuffled(n: int) -> list[int]:
    order = list(range(n))
    random.Random(1).shuffle(order)  # registration order must not matter
    return order


# ---------------------------------------------------------------- legacy .bin


def test_bin_adapter_is_read_at_registration_and_still_works(tier_env, tier_stores, tmp_path, monkeypatch):
    root, args = tier_env
    d = shutil.copytree(root / "many" / "a05", tmp_path / "legacy")
    torch.save(load_file(str(d / ST)), str(d / BIN))
    (d / ST).unlink()
    loads = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(1) or real(*a, **k))
    store = tier_stores(args)
    info = store.register("legacy", d)
    assert len(loads) == 1  # no header to read: the pickle is read whole
    ref = load_adapter(root / "many" / "a05", args)
    assert (info.rank, info.targets, info.nbytes) == (ref.rank, ref.targets, ref.nbytes)
    assert same_weights(store.fetch("legacy").result(timeout=30), ref)
    # its values are checked at registration too, since they were read
    nan = poison(shutil.copytree(root / "many" / "a00", tmp_path / "nan-bin"))
    torch.save(load_file(str(nan / ST)), str(nan / BIN))
    (nan / ST).unlink()
    with pytest.raises(AdapterError, match=r"adapter 'nan-bin': .* holds NaN or Inf"):
        store.register("nan-bin", nan)

