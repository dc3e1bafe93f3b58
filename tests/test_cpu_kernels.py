"""The C kernel of the CPU LoRA delta (caraserve/lora/cpu_kernels.py) against a float64 reference."""

import pytest
import torch

from caraserve import cpu_kernels
from caraserve.lora.ops import add_lora_runs


@pytest.fixture(scope="module")
def fn():
    f = cpu_kernels.kernel()
    if f is None:
        pytest.fail("the CPU LoRA kernel did not build (is a C compiler installed?)")
    return f


@pytest.fixture(params=[1, 2])
def threads(request):
    """Intra-op threads: with 2 the kernels share a call's work out over an OpenMP team."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def reference(y, x, runs):
    out = y.double().clone()
    for start, end, a, b, scale in runs:
        out[start:end] += scale * (x[start:end].double() @ a.double()) @ b.double()
    return out


def make_runs(layout, in_f, out_f, ranks, g):
    """Runs over consecutive rows: layout = rows per run (0 = a gap of base rows)."""
    runs, row = [], 0
    for i, n in enumerate(layout):
        if n > 0:
            r = ranks[i % len(ranks)]
            a = torch.randn(in_f, r, generator=g) * 0.1
            b = torch.randn(r, out_f, generator=g) * 0.1
            runs.append((row, row + n, a, b, 0.25 + i))
        row += max(n, 2)
    return runs, row


@pytest.mark.parametrize("layout,ranks,in_f,out_f", [
    ([8, 8, 8, 8], (8, 16, 32, 64), 256, 256),  # a decode step: four adapters of eight rows
    ([1, 2, 3, 4, 5, 7, 9, 13, 16], (16,), 64, 48),  # every block shape and row tail
    ([3, 0, 6], (12, 5, 24), 100, 77),  # ranks and widths that are not multiples of the vector
    ([8], (128,), 688, 256),
    ([4, 4], (1, 3), 9, 3),  # smaller than one vector everywhere
])
def test_kernel_matches_float64(fn, layout, ranks, in_f, out_f, threads):
    g = torch.Generator().manual_seed(len(layout) * 31 + in_f)
    runs, rows = make_runs(layout, in_f, out_f, ranks, g)
    wide = torch.randn(rows, in_f + 5, generator=g)
    x = wide[:, 2 : 2 + in_f]  # a row stride that is not the width
    y = torch.randn(rows, out_f, generator=g)
    want = reference(y, x, runs)
    table = cpu_kernels.RunTable(runs)
    assert table.fits
    table.apply(fn, y, x)
    assert torch.allclose(y.double(), want, rtol=1e-5, atol=1e-5), (y.double() - want).abs().max()


def test_rows_outside_runs_untouched(fn):
    g = torch.Generator().manual_seed(3)
    runs, rows = make_runs([0, 5, 0, 3], 32, 40, (8,), g)
    x = torch.randn(rows, 32, generator=g)
    y = torch.randn(rows, 40, generator=g)
    before = y.clone()
    cpu_kernels.RunTable(runs).apply(fn, y, x)
    covered = torch.zeros(rows, dtype=torch.bool)
    for start, end, *_ in runs:
        covered[start:end] = True
    assert torch.equal(y[~covered], before[~covered])
    assert not torch.allclose(y[covered], before[covered])


def test_table_declines_what_the_kernel_does_not_take():
    a, b = torch.randn(16, 8), torch.randn(8, 16)
    assert cpu_kernels.RunTable([(0, cpu_kernels.MAX_ROWS, a, b, 1.0)]).fits
    assert not cpu_kernels.RunTable([(0, cpu_kernels.MAX_ROWS + 1, a, b, 1.0)]).fits  # a prefill segment
    assert not cpu_kernels.RunTable([(0, 4, a.double(), b.double(), 1.0)]).fits
    assert not cpu_kernels.RunTable([(0, 4, a.t().contiguous().t(), b, 1.0)]).fits
    big = torch.randn(16, cpu_kernels.MAX_RANK + 8)
    assert not cpu_kernels.RunTable([(0, 4, big, torch.randn(cpu_kernels.MAX_RANK + 8, 16), 1.0)]).fits
    assert not cpu_kernels.usable(torch.zeros(4, 8, dtype=torch.bfloat16), torch.zeros(4, 8, dtype=torch.bfloat16))
    assert not cpu_kernels.usable(torch.zeros(8, 4).t(), torch.zeros(4, 8))


class _Group:
    """The part of a LoraGroup that add_lora_runs reads."""

    def __init__(self, runs, modules=("q_proj",)):
        self._runs, self.modules = runs, frozenset(modules)

    def cpu_runs(self, layer, name):
        return self._runs


@pytest.mark.parametrize("rows_per_run", [4, cpu_kernels.MAX_ROWS + 4])  # kernel, then torch's GEMMs
def test_add_lora_runs_both_paths_agree(rows_per_run):
    g = torch.Generator().manual_seed(rows_per_run)
    runs, rows = make_runs([rows_per_run, rows_per_run], 64, 32, (8, 16), g)
    x = torch.randn(rows, 64, generator=g)
    y = torch.randn(rows, 32, generator=g)
    want = reference(y, x, runs)
    tables = {}
    groups = (_Group(runs[:1]), _Group(runs[1:]), _Group(runs, modules=("v_proj",)))  # the last: another module
    add_lora_runs(y, x, groups, 0, "q_proj", tables)
    assert torch.allclose(y.double(), want, rtol=1e-5, atol=1e-5)
    assert list(tables) == [(0, "q_proj")] and tables[(0, "q_proj")].n == 2
    assert tables[(0, "q_proj")].fits == (rows_per_run <= cpu_kernels.MAX_ROWS)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("CARASERVE_CPU_KERNELS", "0")
    monkeypatch.setattr(cpu_kernels, "_lib", False)
    assert cpu_kernels.kernel() is None
    g = torch.Generator().manual_seed(5)
    runs, rows = make_runs([3, 5], 16, 24, (8,), g)
    x, y = torch.randn(rows, 16, generator=g), torch.randn(rows, 24, generator=g)
    want = reference(y, x, runs)
    add_lora_runs(y, x, (_Group(runs),), 0, "q_proj", {})
    assert torch.allclose(y.double(), want, rtol=1e-5, atol=1e-5)


def attention_reference(q, k_cache, v_cache, slots, lens, window):
    """float64 softmax attention of each row's query over its own slot's visible positions."""
    n, heads, hd = q.shape
    group = heads // k_cache.shape[2]
    out = torch.empty(n, heads, hd, dtype=torch.float64)
    for i in range(n):
        length = int(lens[i])
        lo = max(0, length - window) if window else 0
        for h in range(heads):
            k = k_cache[slots[i], lo:length, h // group].double()
            v = v_cache[slots[i], lo:length, h // group].double()
            w = torch.softmax(k @ q[i, h].double() / hd ** 0.5, 0)
            out[i, h] = w @ v
    return out


@pytest.mark.parametrize("heads,kv_heads,hd,window", [(4, 2, 64, None), (8, 8, 32, None), (6, 2, 20, 5),
                                                      (4, 1, 128, 3)])
def test_slot_attention_matches_float64(fn, heads, kv_heads, hd, window, threads):
    g = torch.Generator().manual_seed(heads * 100 + hd)
    k_cache = torch.randn(12, 40, kv_heads, hd, generator=g)
    v_cache = torch.randn(12, 40, kv_heads, hd, generator=g)
    slots = torch.tensor([7, 0, 11, 3, 5])
    lens = torch.tensor([1, 40, 9, 17, 8])  # 8 and 17: the 8-key blocks and their tails
    q = torch.randn(5, heads, hd, generator=g)
    out = cpu_kernels.slot_attention(q, k_cache, v_cache, slots, lens, window)
    want = attention_reference(q, k_cache, v_cache, slots, lens, window)
    assert out is not None and out.shape == q.shape
    assert torch.allclose(out.double(), want, rtol=1e-5, atol=1e-5), (out.double() - want).abs().max()


def test_slot_attention_declines_what_it_does_not_take(fn):
    k_cache = torch.randn(4, 8, 2, 16)
    q = torch.randn(2, 4, 16)
    slots, lens = torch.tensor([0, 1]), torch.tensor([3, 8])
    assert cpu_kernels.slot_attention(q, k_cache, k_cache, slots, lens, None) is not None
    assert cpu_kernels.slot_attention(q.double(), k_cache.double(), k_cache.double(), slots, lens, None) is None
    assert cpu_kernels.slot_attention(torch.randn(2, 3, 16), k_cache, k_cache, slots, lens, None) is None  # 3 % 2
    assert cpu_kernels.slot_attention(q, k_cache, k_cache, slots, torch.tensor([3, 9]), None) is None  # > max_len
    assert cpu_kernels.slot_attention(q, k_cache, k_cache, slots, torch.tensor([0, 2]), None) is None  # empty
    assert cpu_kernels.slot_attention(q, k_cache, k_cache, slots.int(), lens, None) is None
    assert cpu_kernels.slot_attention(q, k_cache, k_cache, torch.tensor([0, 4]), lens, None) is None  # no slot 4


def test_packed_copies_follow_writes_into_the_pool(fn):
    """Runs of rank and width multiples of 8 read packed copies; a write into the pool tensor (a
    new adapter in a slot) makes the next table repack instead of reading stale weights."""
    g = torch.Generator().manual_seed(11)
    pool_a, pool_b = torch.randn(3, 32, 16, generator=g), torch.randn(3, 16, 24, generator=g)  # [slots, in, R]
    x, y0 = torch.randn(6, 32, generator=g), torch.randn(6, 24, generator=g)

    def run_once(pool_a, pool_b):
        runs = [(0, 3, pool_a[1], pool_b[1], 0.5), (3, 6, pool_a[2], pool_b[2], 2.0)]
        table = cpu_kernels.RunTable(runs)
        y = y0.clone()
        table.apply(fn, y, x)
        assert torch.allclose(y.double(), reference(y0, x, runs), rtol=1e-5, atol=1e-5)
        return table

    table = run_once(pool_a, pool_b)
    assert [table.array[i].packed for i in range(2)] == [1, 1]
    assert run_once(pool_a, pool_b).array[0].a == table.array[0].a  # the same packed copy, not a new one
    pool_a[2].copy_(torch.randn(32, 16, generator=g))  # another adapter lands in slot 2
    pool_b[2].zero_()
    run_once(pool_a, pool_b)
    odd = cpu_kernels.RunTable([(0, 2, torch.randn(8, 12), torch.randn(12, 16), 1.0)])  # rank 12: unpacked
    assert odd.fits and odd.array[0].packed == 0
    before = len(cpu_kernels._packs)
    del pool_a  # a freed pool tensor takes its packed copies along
    assert len(cpu_kernels._packs) == before - 1
