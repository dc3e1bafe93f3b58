"""DevicePool's slots on CPU: rank buckets, states, LRU eviction, holding, zero padding, batch
metadata and memory size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pool_cases import DIMS, L

from caraserve.lora.batch import fill_row_table
from caraserve.lora.checkpoint import TARGETS, AdapterError
from caraserve.lora.device_pool import AdapterState, DevicePool


@pytest.fixture
def pool(pool_env):
    _, args, _ = pool_env
    return DevicePool(args, (8, 16, 32), 2, torch.float32, [torch.device("cpu")] * L)


def _expected_pool_bytes(buckets, slots, targets, elem):
    return sum(L * slots * (DIMS[m][0] * R + R * DIMS[m][1]) * elem for R in buckets for m in targets)


def test_pool_nbytes(pool_env):
    _, args, _ = pool_env
    cpu = [torch.device("cpu")] * L
    p = DevicePool(args, (8, 16, 32), 2, torch.float32, cpu)
    assert p.nbytes == _expected_pool_bytes((8, 16, 32), 2, TARGETS, 4) == 2 * 2 * 56 * 976 * 4
    p16 = DevicePool(args, (4, 64), 3, torch.float16, cpu, targets=("q_proj", "down_proj"))
    assert p16.nbytes == _expected_pool_bytes((4, 64), 3, ("q_proj", "down_proj"), 2)
    a, b = p16.buckets[1].weights["down_proj"]
    assert a.shape == (L, 3, 112, 64) and b.shape == (L, 3, 64, 64) and a.dtype == torch.float16


@pytest.mark.parametrize("name,bucket", [("r5", 0), ("r8", 0), ("r9-qv", 1), ("r16-all", 1), ("r17", 2), ("r32", 2)])
def test_rank_bucket_and_state(pool_env, pool, name, bucket):
    _, _, store = pool_env
    w = store.get(name)
    assert pool.state(name) is AdapterState.HOST
    assert pool.load(w) is True
    assert pool.state(name) is AdapterState.RESIDENT  # CPU copies are immediate
    assert pool.poll() == []
    b, s = pool.slot_of(name)
    assert b == bucket and s in (0, 1)
    assert pool.used_slots() == 1 and pool.loads == 1
    bk = pool.buckets[b]
    for m in TARGETS:
        a, bb = bk.weights[m]
        if m in w.a:
            r = w.a[m].shape[-1]
            assert torch.equal(a[:, s, :, :r], w.a[m]) and torch.equal(bb[:, s, :r, :], w.b[m])
            assert not a[:, s, :, r:].any() and not bb[:, s, r:, :].any()
        else:
            assert not a[:, s].any() and not bb[:, s].any()
    assert bk.scale[s].item() == pytest.approx(w.scale)
    # loading again is a no-op
    assert pool.load(w) is True and pool.slot_of(name) == (b, s) and pool.loads == 1


def test_rank_over_largest_bucket_refused(pool_env, pool):
    _, _, store = pool_env
    with pytest.raises(AdapterError, match=r"rank 40 exceeds the largest rank bucket 32"):
        pool.load(store.get("r40"))
    assert pool.state("r40") is AdapterState.HOST and pool.used_slots() == 0 and pool.loads == 0
    with pytest.raises(AdapterError):
        pool.bucket_for(33)
    assert [pool.bucket_for(r) for r in (1, 8, 9, 16, 17, 32)] == [0, 0, 1, 1, 2, 2]


def test_rank_refusal_names_adapter(pool_env, pool):
    _, _, store = pool_env
    with pytest.raises(AdapterError, match=r"'r40'"):
        pool.load(store.get("r40"))


def test_targets_outside_pool_refused(pool_env):
    _, args, store = pool_env
    p = DevicePool(args, (8, 16, 32), 2, torch.float32, [torch.device("cpu")] * L, targets=("q_proj", "v_proj"))
    assert p.load(store.get("r8"))
    with pytest.raises(AdapterError, match=r"adapter 'r16-all' targets \['k_proj', 'o_proj'"):
        p.load(store.get("r16-all"))
    assert p.state("r16-all") is AdapterState.HOST and p.used_slots() == 1


def test_lru_eviction_picks_least_recently_used_idle_slot(pool_env, pool):
    _, _, store = pool_env
    assert pool.load(store.get("r5")) and pool.load(store.get("r5b"))
    s5, s5b = pool.slot_of("r5")[1], pool.slot_of("r5b")[1]
    assert s5 != s5b
    pool.acquire("r5")  # r5 used after r5b: r5b is the least recently used
    pool.release("r5")
    assert pool.load(store.get("r8"))
    assert pool.evictions == 1
    assert pool.state("r5b") is AdapterState.HOST and pool.state("r5") is AdapterState.RESIDENT
    assert pool.slot_of("r8") == (0, s5b)
    # now r5 is least recently used: it goes next
    assert pool.load(store.get("r5b"))
    assert pool.state("r5") is AdapterState.HOST and pool.slot_of("r5b") == (0, s5)
    assert pool.evictions == 2 and pool.used_slots() == 2
    # other buckets are untouched by bucket 0's pressure
    assert pool.load(store.get("r17")) and pool.slot_of("r17")[0] == 2 and pool.evictions == 2


def test_batch_layouts_outlive_loads_of_other_adapters_but_not_an_eviction(pool_env, pool):
    """make_batch's cached layouts (and what kernels keep per layout) stay while other adapters
    load; an evicted adapter's layouts go, so its next slot is the one a new layout names."""
    _, _, store = pool_env

    def touch(name):
        pool.acquire(name)
        pool.release(name)

    def layout(name):
        return pool.make_batch([(0, 1, name)], True, "cpu")

    assert pool.load(store.get("r5")) and pool.load(store.get("r5b"))  # bucket 0's two slots
    first, old_slot = layout("r5b"), pool.slot_of("r5b")[1]
    assert pool.load(store.get("r17")) and layout("r5b") is first  # another bucket's load
    touch("r5b")
    assert pool.load(store.get("r8")) and pool.state("r5") is AdapterState.HOST  # r5 evicted
    assert layout("r5b") is first
    touch("r8")
    assert pool.load(store.get("r5")) and pool.state("r5b") is AdapterState.HOST  # r5b evicted: r5 in its slot
    touch("r5")
    assert pool.load(store.get("r5b")) and pool.state("r8") is AdapterState.HOST  # back, in r8's slot
    again = layout("r5b")
    assert again is not first and again.groups[0].index.segments[0][2] == pool.slot_of("r5b")[1] != old_slot
    assert pool.evict("r5b") and pool.load(store.get("r5b"))  # unloaded and back (e.g. new weights, same name)
    assert layout("r5b") is not again


def test_held_slot_never_evicted(pool_env, pool):
    _, _, store = pool_env
    assert pool.load(store.get("r5")) and pool.load(store.get("r5b"))
    pool.acquire("r5")  # held, and then made the least recently used
    pool.acquire("r5b")
    pool.release("r5b")
    assert pool.load(store.get("r8"))  # must take r5b's slot, not the older but held r5
    assert pool.state("r5") is AdapterState.RESIDENT and pool.state("r5b") is AdapterState.HOST
    pool.acquire("r8")  # both slots held now
    before = {n: pool.slot_of(n) for n in ("r5", "r8")}
    loads, evictions = pool.loads, pool.evictions
    larger = {1, 2}  # the rank-16 and rank-32 buckets, which could take it zero-padded
    assert pool.load(store.get("r5b"), avoid=larger) is False
    assert pool.state("r5b") is AdapterState.HOST
    assert {n: pool.slot_of(n) for n in ("r5", "r8")} == before
    assert (pool.loads, pool.evictions) == (loads, evictions)
    # a second hold on r5: one release is not enough
    pool.acquire("r5")
    pool.release("r5")
    assert pool.load(store.get("r5b"), avoid=larger) is False
    pool.release("r5")
    assert pool.load(store.get("r5b"), avoid=larger) is True
    assert pool.state("r5") is AdapterState.HOST and pool.slot_of("r5b") == before["r5"]
    assert pool.state("r8") is AdapterState.RESIDENT


def test_a_held_bucket_spills_into_a_larger_one(pool_env, pool):
    """Every slot of its own bucket held by running requests: the adapter takes a larger bucket's
    slot (zero-padded, the same delta) rather than wait; False only when those are held too."""
    _, _, store = pool_env
    for name in ("r5", "r5b"):
        assert pool.load(store.get(name))
        pool.acquire(name)
    assert pool.load(store.get("r8")) and pool.slot_of("r8")[0] == 1  # bucket 0 held: the rank-16 one
    w = store.get("r8")
    a = pool.buckets[1].weights["q_proj"][0][:, pool.slot_of("r8")[1]]  # [L, in, 16]
    assert torch.equal(a[..., : w.rank], w.a["q_proj"]) and not a[..., w.rank:].any()
    assert pool.evictions == 0 and pool.spills == 1


def test_evict_refuses_while_held(pool_env, pool):
    _, _, store = pool_env
    assert pool.load(store.get("r5")) and pool.load(store.get("r5b"))
    pool.acquire("r5")
    assert pool.evict("r5") is False
    assert pool.state("r5") is AdapterState.RESIDENT and pool.used_slots() == 2
    pool.release("r5")
    slot, evictions = pool.slot_of("r5"), pool.evictions
    assert pool.evict("r5") is True
    assert pool.state("r5") is AdapterState.HOST and pool.used_slots() == 1
    assert pool.evictions == evictions + 1  # loads - evictions = adapters resident, unloads included
    assert pool.evict("r5") is True  # not resident: nothing to do
    evictions = pool.evictions
    assert pool.load(store.get("r8"))  # takes the freed slot without evicting r5b
    assert pool.slot_of("r8") == slot and pool.evictions == evictions
    assert pool.state("r5b") is AdapterState.RESIDENT


def test_reused_slot_is_zero_padded(pool_env, pool):
    _, _, store = pool_env
    y, z, x = store.get("r16-all"), store.get("r12-all"), store.get("r9-qv")
    assert pool.load(y) and pool.load(z)
    b, sy = pool.slot_of("r16-all")
    _, sz = pool.slot_of("r12-all")
    assert b == 1 and pool.slot_of("r12-all")[0] == 1 and sy != sz
    bk = pool.buckets[b]
    r = x.rank
    assert r == 9
    # Y filled the region that X will not cover
    assert bk.weights["q_proj"][0][:, sy, :, r:].abs().sum() > 0
    assert bk.weights["gate_proj"][1][:, sy].abs().sum() > 0
    z_before = {m: (a[:, sz].clone(), bb[:, sz].clone()) for m, (a, bb) in bk.weights.items()}
    pool.acquire("r12-all")
    pool.release("r12-all")  # Y is now the least recently used
    assert pool.load(x)
    assert pool.slot_of("r9-qv") == (b, sy) and pool.state("r16-all") is AdapterState.HOST
    for m in TARGETS:
        a, bb = bk.weights[m]
        if m in x.a:
            assert torch.equal(a[:, sy, :, :r], x.a[m]) and torch.equal(bb[:, sy, :r, :], x.b[m])
            assert not a[:, sy, :, r:].any(), f"{m} A padding"
            assert not bb[:, sy, r:, :].any(), f"{m} B padding"
        else:
            assert not a[:, sy].any() and not bb[:, sy].any(), f"untargeted {m}"
        # the neighbouring slot is untouched
        assert torch.equal(a[:, sz], z_before[m][0]) and torch.equal(bb[:, sz], z_before[m][1])
    assert bk.scale[sy].item() == pytest.approx(x.scale) and x.scale != pytest.approx(y.scale)
    assert bk.scale[sz].item() == pytest.approx(z.scale)


def test_make_batch_groups_by_bucket(pool_env, pool):
    _, _, store = pool_env
    for name in ("r5", "r8", "r17"):
        assert pool.load(store.get(name))
    sa, sb, sc = pool.slot_of("r5")[1], pool.slot_of("r8")[1], pool.slot_of("r17")[1]
    assert pool.slot_of("r17")[0] == 2 and sa != sb
    reqs = [("r17", 2), (None, 3), ("r5", 2), ("r8", 4), (None, 1), ("r5", 1)]
    reqs.sort(key=lambda q: pool.sort_key(q[0]))
    runs, start = [], 0
    for name, n in reqs:
        runs.append((start, n, name))
        start += n
    # base rows first, then bucket 0 ordered by slot, then bucket 2
    bucket0 = ["r5", "r5", "r8"] if sa < sb else ["r8", "r5", "r5"]
    assert [q[2] for q in runs] == [None, None] + bucket0 + ["r17"]
    batch = pool.make_batch(runs, False, "cpu")
    assert batch is not None and batch.is_decode is False
    assert [g.rank for g in batch.groups] == [8, 32]
    g0, g2 = batch.groups
    n_a, n_b = 3, 4  # the two r5 requests merge into one segment
    first, second = ((sa, n_a), (sb, n_b)) if sa < sb else ((sb, n_b), (sa, n_a))
    idx = g0.index
    assert idx.segments == ((4, first[1], first[0]), (4 + first[1], second[1], second[0]))
    assert (idx.row_start, idx.row_end, idx.max_seg_len) == (4, 11, 4)
    assert idx.seg_start.tolist() == [4, 4 + first[1]] and idx.seg_len.tolist() == [first[1], second[1]]
    assert idx.seg_slot.tolist() == [first[0], second[0]] and idx.seg_slot.dtype == torch.int32
    assert g0.weights is pool.buckets[0].weights and g0.scale is pool.buckets[0].scale
    assert g2.index.segments == ((11, 2, sc),)
    assert g2.weights is pool.buckets[2].weights

    dec = pool.make_batch([(0, 1, None), (1, 1, "r5"), (2, 1, "r5"), (3, 1, "r17")], True, "cpu")
    assert dec.is_decode is True and [g.rank for g in dec.groups] == [8, 32]
    assert dec.groups[0].index.segments == ((1, 2, sa),) and dec.groups[1].index.segments == ((3, 1, sc),)
    # its row form (what the GPU's decode kernels read): bucket, slot and rank per row, -1 for none
    meta, scale = np.full((3, 5), 7, np.int32), np.full(5, 7.0, np.float32)
    fill_row_table(dec, pool.rank_buckets, meta, scale)
    assert meta.tolist() == [[-1, 0, 0, 2, -1], [0, sa, sa, sc, 0], [0, 8, 8, 32, 0]]
    r5, r17 = pool.buckets[0].host_scale[sa], pool.buckets[2].host_scale[sc]
    assert scale.tolist() == [0.0, *np.float32([r5, r5, r17]).tolist(), 0.0] and r5 > 0 and r17 > 0

    assert pool.make_batch([(0, 5, None), (5, 2, None)], False, "cpu") is None
    assert pool.make_batch([], True, "cpu") is None
