"""The C LoRA kernels of the CPU path (caraserve/lora/kernel_runs.py; built by
caraserve/kernel_library.py) against float64 references, and what the wrappers and kernels
refuse: calls whose runs or tensors fall outside their buffers. The build cache's checks:
tests/test_kernel_library.py."""


import ctypes
import os
import shutil
import subprocess

import pytest
import torch
from helpers import RunsGroup, assert_lora_runs_exact, make_runs
from helpers import lora_reference as reference

from caraserve import kernel_library
from caraserve.lora import kernel_runs
from caraserve.lora.ops import add_lora_runs


@pytest.mark.parametrize("layout,ranks,in_f,out_f", [
    ([8, 8, 8, 8], (8, 16, 32, 64), 256, 256),  # a decode step: four adapters of eight rows
    ([1, 2, 3, 4, 5, 7, 9, 13, 16], (16,), 64, 48),  # every block shape and row tail
    ([3, 0, 6], (12, 5, 24), 100, 77),  # ranks and widths that are not multiples of the vector
    ([8], (128,), 688, 256),
    ([4, 4], (1, 3), 9, 3),  # smaller than one vector everywhere
    ([37, 130, 3], (8, 64, 16), 256, 688),  # a prefill step's prompt segments
])
def test_kernel_matches_float64(fn, layout, ranks, in_f, out_f, threads):
    g = torch.Generator().manual_seed(len(layout) * 31 + in_f)
    runs, rows = make_runs(layout, in_f, out_f, ranks, g)
    wide = torch.randn(rows, in_f + 5, generator=g)
    x = wide[:, 2 : 2 + in_f]  # a row stride that is not the width
    y = torch.randn(rows, out_f, generator=g)
    want = reference(y, x, runs)
    table = kernel_runs.RunTable(runs)
    assert table.fits
    table.apply(fn, y, x)
    assert torch.allclose(y.double(), want, rtol=1e-5, atol=1e-5), (y.double() - want).abs().max()


def _lora_kernel_built_for(march: str, tmp_path):
    """The LoRA kernel of csrc/lora_cpu.c compiled for another target (`-march=...`), bound as
    the library binds it; None without a compiler or when this CPU cannot run that target."""
    cc = shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc")
    flags = kernel_library.cpu_flags().split()
    if cc is None or not {"avx2", "fma"} <= set(flags):
        return None
    out = tmp_path / f"lora-{march}.so"
    subprocess.run([cc, "-O3", f"-march={march}", "-fPIC", "-shared", "-fno-math-errno", "-fopenmp",
                    str(kernel_library.SOURCES[0]), "-o", str(out)], check=True, capture_output=True, timeout=120)
    lib = ctypes.CDLL(str(out))
    restype, argtypes = kernel_library.SYMBOLS["lora_runs"]
    lib.lora_runs.restype, lib.lora_runs.argtypes = restype, argtypes
    return lib.lora_runs


def test_every_panel_width_gives_the_same_bits(fn, tmp_path):
    """This machine's build (16-float panels where the CPU has AVX-512) against the AVX2 one
    (8-float vectors): each output sums over the same k in the same order, so every bit agrees."""
    if "avx512f" not in kernel_library.cpu_flags().split():
        pytest.skip("needs an AVX-512 CPU (else this machine's build is the AVX2 one)")
    avx2 = _lora_kernel_built_for("x86-64-v3", tmp_path)
    if avx2 is None:
        pytest.skip("needs a C compiler")
    g = torch.Generator().manual_seed(11)
    for layout, ranks, in_f, out_f in [([8, 8, 8, 8], (8, 16, 32, 64), 256, 688),
                                        ([1, 4, 5, 9, 15, 16], (16, 24), 64, 48),
                                        ([3, 6], (12, 5), 100, 77), ([37, 130], (64, 128), 688, 256)]:
        runs, rows = make_runs(layout, in_f, out_f, ranks, g)
        x, y = torch.randn(rows, in_f, generator=g), torch.randn(rows, out_f, generator=g)
        ours, theirs = y.clone(), y.clone()
        table = kernel_runs.RunTable(runs)
        table.apply(fn, ours, x)
        table.apply(avx2, theirs, x)
        assert torch.equal(ours, theirs), (layout, (ours - theirs).abs().max())
        assert not torch.equal(ours, y)


def test_rows_outside_runs_untouched(fn):
    g = torch.Generator().manual_seed(3)
    runs, rows = make_runs([0, 5, 0, 3], 32, 40, (8,), g)
    x = torch.randn(rows, 32, generator=g)
    y = torch.randn(rows, 40, generator=g)
    before = y.clone()
    kernel_runs.RunTable(runs).apply(fn, y, x)
    covered = torch.zeros(rows, dtype=torch.bool)
    for start, end, *_ in runs:
        covered[start:end] = True
    assert torch.equal(y[~covered], before[~covered])
    assert not torch.allclose(y[covered], before[covered])


def test_table_declines_what_the_kernel_does_not_take():
    a, b = torch.randn(16, 8), torch.randn(8, 16)
    assert kernel_runs.RunTable([(0, 4, a, b, 1.0), (4, 900, a, b, 1.0)]).fits  # a prompt segment too
    assert not kernel_runs.RunTable([(0, 4, a, b, 1.0), (3, 6, a, b, 1.0)]).fits  # runs that share a row
    assert not kernel_runs.RunTable([(0, 4, a.double(), b.double(), 1.0)]).fits
    assert not kernel_runs.RunTable([(0, 4, a.t().contiguous().t(), b, 1.0)]).fits
    big = torch.randn(16, kernel_runs.MAX_RANK + 8)
    assert not kernel_runs.RunTable([(0, 4, big, torch.randn(kernel_runs.MAX_RANK + 8, 16), 1.0)]).fits
    assert not kernel_runs.usable(torch.zeros(4, 8, dtype=torch.bfloat16), torch.zeros(4, 8, dtype=torch.bfloat16))
    assert not kernel_runs.usable(torch.zeros(8, 4).t(), torch.zeros(4, 8))


@pytest.mark.parametrize("rows_per_run,kernel", [(4, True), (100, True), (4, False), (100, False)])
def test_add_lora_runs_both_paths_agree(rows_per_run, kernel):
    g = torch.Generator().manual_seed(rows_per_run)
    runs, rows = make_runs([rows_per_run, rows_per_run], 64, 32, (8, 16), g)
    if not kernel:  # an A the kernel cannot read (not contiguous): torch's GEMMs
        start, end, a, b, scale = runs[0]
        runs[0] = (start, end, a.t().contiguous().t(), b, scale)
    x = torch.randn(rows, 64, generator=g)
    y = torch.randn(rows, 32, generator=g)
    want = reference(y, x, runs)
    tables = {}
    # the last group adapts another module
    groups = (RunsGroup(runs[:1]), RunsGroup(runs[1:]), RunsGroup(runs, modules=("v_proj",)))
    add_lora_runs(y, x, groups, 0, "q_proj", tables)
    assert torch.allclose(y.double(), want, rtol=1e-5, atol=1e-5)
    assert list(tables) == [(0, "q_proj")] and tables[(0, "q_proj")].n == 2
    assert tables[(0, "q_proj")].fits == kernel


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("CARASERVE_CPU_KERNELS", "0")
    monkeypatch.setattr(kernel_library, "_lib", False)
    assert kernel_library.kernel() is None
    assert_lora_runs_exact()  # through torch


def weights(in_f, rank, out_f, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(in_f, rank, generator=g), torch.randn(rank, out_f, generator=g)


@pytest.mark.parametrize("case", ["ranks differ", "widths differ", "rows reversed", "negative row", "not tensors",
                                  "1-D weights"])
def test_run_table_refuses_malformed_runs(case):
    a, b = weights(16, 8, 12)
    runs = {
        "ranks differ": [(0, 2, a, b[:4], 1.0)],
        "widths differ": [(0, 2, a, b, 1.0), (2, 4, torch.randn(20, 8), b, 1.0)],
        "rows reversed": [(3, 1, a, b, 1.0)],
        "negative row": [(-2, 1, a, b, 1.0)],
        "not tensors": [(0, 2, a.tolist(), b, 1.0)],
        "1-D weights": [(0, 2, a.flatten(), b, 1.0)],
    }[case]
    with pytest.raises(ValueError, match=r"runs\[\d\]"):
        kernel_runs.RunTable(runs)


def test_run_table_with_shared_rows_goes_to_torch():
    """Two runs over the same rows: the kernel expands blocks in parallel, so torch takes them."""
    a, b = weights(16, 8, 16)
    assert not kernel_runs.RunTable([(0, 4, a, b, 1.0), (2, 6, a, b, 1.0)]).fits
    assert kernel_runs.RunTable([(0, 4, a, b, 1.0), (4, 6, a, b, 1.0)]).fits


@pytest.mark.parametrize("case", ["rows past y", "x narrower", "y narrower", "fewer x rows", "float64 y",
                                  "column-strided x", "overlapping y rows", "table that does not fit"])
def test_apply_refuses_what_falls_outside_the_buffers(fn, case):
    a, b = weights(16, 8, 12, seed=1)
    big_x, big_y = torch.randn(8, 16), torch.randn(8, 12)
    x, y, runs = big_x[:4], big_y[:4], [(0, 2, a, b, 1.0), (2, 4, a, b, 0.5)]
    name = {"rows past y": "runs", "x narrower": "x", "y narrower": "y", "fewer x rows": "x", "float64 y": "y",
            "column-strided x": "x", "overlapping y rows": "y", "table that does not fit": "runs"}[case]
    if case == "rows past y":
        runs[1] = (2, 6, a, b, 0.5)
    elif case == "x narrower":
        x = big_x[:4, :12]
    elif case == "y narrower":
        y = big_y[:4, :8]
    elif case == "fewer x rows":
        x = big_x[:3]
    elif case == "float64 y":
        y = torch.zeros(4, 12, dtype=torch.float64)
    elif case == "column-strided x":
        x = torch.randn(16, 4).t()
    elif case == "overlapping y rows":
        y = big_y.flatten()[:20].as_strided((4, 12), (2, 1))
    else:
        runs = [(0, 2, a.double(), b.double(), 1.0)]
    table = kernel_runs.RunTable(runs)
    before = big_y.clone(), y.clone()
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        table.apply(fn, y, x)
    assert torch.equal(big_y, before[0]) and torch.equal(y, before[1])  # nothing written


def direct_call(fn, y, x, runs, rows=None, ldx=None, ldy=None):
    array = (kernel_library.LoraRun * max(1, len(runs)))(*runs)
    return fn(y.data_ptr(), y.stride(0) if ldy is None else ldy, x.data_ptr(), x.stride(0) if ldx is None else ldx,
              y.shape[0] if rows is None else rows, x.shape[1], y.shape[1], array, len(runs))


@pytest.mark.parametrize("case", ["end past rows", "negative start", "A of another width", "B of another width",
                                  "A shorter than its shape", "B shorter than its shape", "rank 0",
                                  "rank beyond the buffer", "packed rank not a multiple of 8", "rows shared",
                                  "row stride under the width", "null weights"])
def test_kernel_refuses_inconsistent_calls(fn, case):
    """The C side, called directly, returns -1 and touches nothing for calls that do not add up."""
    a, b = weights(16, 8, 24, seed=2)
    big_x, big_y = torch.randn(8, 16), torch.randn(8, 24)
    x, y = big_x[:4], big_y[:4]

    def run(start=0, end=2, a_=a, b_=b, rank=8, a_in=16, b_out=24, a_len=None, b_len=None, packed=0):
        return kernel_library.LoraRun(start, end, a_.data_ptr() if a_ is not None else None,
                                      b_.data_ptr() if b_ is not None else None, rank, a_in, b_out,
                                      a.numel() if a_len is None else a_len, b.numel() if b_len is None else b_len,
                                      packed, 1.0)

    assert direct_call(fn, y.clone(), x, [run(), run(2, 4)]) == 0  # the same call, consistent
    runs, kw = [run(), run(2, 4)], {}
    if case == "end past rows":
        runs[1] = run(2, 6)
    elif case == "negative start":
        runs[0] = run(-1, 2)
    elif case == "A of another width":
        runs[0] = run(a_in=12)
    elif case == "B of another width":
        runs[0] = run(b_out=32)
    elif case == "A shorter than its shape":
        runs[0] = run(a_len=16 * 8 - 1)
    elif case == "B shorter than its shape":
        runs[0] = run(b_len=8 * 24 - 1)
    elif case == "rank 0":
        runs[0] = run(rank=0)
    elif case == "rank beyond the buffer":
        runs[0] = run(rank=kernel_runs.MAX_RANK + 8, a_len=1 << 40, b_len=1 << 40)
    elif case == "packed rank not a multiple of 8":
        runs[0] = run(rank=4, packed=1)
    elif case == "rows shared":
        runs[1] = run(1, 4)
    elif case == "row stride under the width":
        kw = {"ldx": 8}
    else:
        runs[0] = run(a_=None)
    before = big_y.clone()
    assert direct_call(fn, y, x, runs, **kw) == -1
    assert torch.equal(big_y, before)


def test_lora_torch_path_refuses_runs_past_the_rows():
    """The torch path (here: y with a column stride the kernel does not read) checks a run's rows
    as the kernel does, instead of slicing it short."""
    g = torch.Generator().manual_seed(5)
    a, b, x = torch.randn(16, 8, generator=g), torch.randn(8, 24, generator=g), torch.randn(4, 16, generator=g)
    y = torch.zeros(24, 4).t()  # [4, 24], column stride 4
    with pytest.raises(ValueError, match=r"rows 0..6 of module 'q_proj', but y and x have 4 and 4 rows"):
        add_lora_runs(y, x, [RunsGroup([(0, 6, a, b, 1.0)])], 0, "q_proj")
    add_lora_runs(y, x, [RunsGroup([(1, 3, a, b, 0.5)])], 0, "q_proj")
    want = torch.zeros(4, 24, dtype=torch.float64)
    want[1:3] = 0.5 * (x[1:3].double() @ a.double()) @ b.double()
    assert torch.allclose(y.double(), want, atol=1e-5)


def _parts(*parts):
    """A lora_part array of (first column, width, RunTable) entries, and what keeps them alive."""
    import ctypes

    from caraserve.kernel_library import LoraPart

    arr = (LoraPart * len(parts))(*(LoraPart(col, out, ctypes.addressof(t.array), t.n) for col, out, t in parts))
    return arr, parts


def test_lora_parts_adds_each_part_in_its_columns(fn):
    """One lora_parts call over a fused output [rows, 16 + 24]: each part's runs land in its own
    columns, as lora_runs over each part's column view would put them."""
    lib = kernel_library.library()
    g = torch.Generator().manual_seed(8)
    runs_q, rows = make_runs([3, 5], 32, 16, (8, 16), g)
    runs_v, _ = make_runs([3, 5], 32, 24, (16, 8), g)
    x, y = torch.randn(rows, 32, generator=g), torch.randn(rows, 40, generator=g)
    want = torch.cat([reference(y[:, :16], x, runs_q), reference(y[:, 16:], x, runs_v)], dim=1)
    arr, keep = _parts((0, 16, kernel_runs.RunTable(runs_q)), (16, 24, kernel_runs.RunTable(runs_v)))
    assert lib.lora_parts(y.data_ptr(), 40, 40, x.data_ptr(), 32, rows, 32, arr, 2) == 0
    assert torch.allclose(y.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cols", [
    ((0, 16), (8, 16)),  # two parts over the same columns
    ((0, 16), (32, 16)),  # a part past y's last column
    ((-8, 16), (16, 16)),  # a part before y's first
])
def test_lora_parts_refuses_parts_outside_or_over_each_other_and_writes_nothing(fn, cols):
    lib = kernel_library.library()
    g = torch.Generator().manual_seed(9)
    runs, rows = make_runs([3], 8, 16, (8,), g)
    table = kernel_runs.RunTable(runs)
    x, y = torch.randn(rows, 8, generator=g), torch.zeros(rows, 40)
    arr, keep = _parts(*((col, out, table) for col, out in cols))
    assert lib.lora_parts(y.data_ptr(), 40, 40, x.data_ptr(), 8, rows, 8, arr, 2) == -1
    assert not y.any()  # refused before anything was written, the valid part included


