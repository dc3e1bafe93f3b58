"""Triton SGMV and multi-bucket BGMV kernels against the plain-torch reference and float64
(interpreter on CPU, compiled on CUDA).

Every case builds one rank bucket inside a larger batch: base-only rows before and after it
(plus the requests without adapter in the "partial" mix) must stay bit-identical, and so must the
columns of the wider buffers that x and y are column slices of. Ranks, in and out sizes are kept
small and odd where possible: the interpreter costs several milliseconds per grid cell.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from triton_interpret import DEVICE, kernel_modules

triton_ops, triton_multi = kernel_modules("caraserve.lora.triton_ops", "caraserve.lora.triton_multi")
from caraserve.lora import ops  # noqa: E402
from caraserve.lora.batch import LoraBatch, LoraGroup, LoraIndex, fill_row_table  # noqa: E402

BATCH_SIZES = (1, 3, 17, 64, 65)
POPULARITY = ("distinct", "uniform", "zipf", "identical", "partial")
RANKS = (4, 5, 17, 64, 128)
DIMS = ((48, 100), (32, 64), (96, 40), (64, 33))  # (in, out)
N_LAYERS = 2
PAD_BEFORE, PAD_AFTER = 2, 1  # base-only rows around the bucket in every case


def _slots_for(gen: torch.Generator, n_req: int, popularity: str) -> tuple[list[int | None], int]:
    """Adapter slot of each request (None: base model only) and the number of slots S."""
    if popularity == "distinct":
        return list(range(n_req)), max(n_req, 2)
    n_slots = 8
    if popularity == "uniform":
        return torch.randint(0, n_slots, (n_req,), generator=gen).tolist(), n_slots
    if popularity == "zipf":
        p = 1.0 / torch.arange(1, n_slots + 1, dtype=torch.float64) ** 1.5
        return torch.multinomial(p, n_req, replacement=True, generator=gen).tolist(), n_slots
    if popularity == "identical":
        return [n_slots - 1] * n_req, n_slots
    if popularity == "partial":
        slots: list[int | None] = torch.randint(0, n_slots, (n_req,), generator=gen).tolist()
        without = torch.rand(n_req, generator=gen) < 0.5
        without[torch.randint(0, n_req, (1,), generator=gen)] = False  # keep at least one adapter row
        return [None if w else s for s, w in zip(slots, without.tolist(), strict=True)], n_slots
    raise ValueError(popularity)


def _make_case(
    seed: int,
    n_req: int,
    popularity: str,
    rank: int,
    dims: tuple[int, int],
    max_tokens: int,
    dtype: torch.dtype = torch.float32,
    sort_by_slot: bool = True,
):
    """Builds y, x, a, b, scale, index for one bucket, plus the wide buffers and the bucket's rows."""
    gen = torch.Generator().manual_seed(seed)
    n_in, n_out = dims
    slots, n_slots = _slots_for(gen, n_req, popularity)
    counts = torch.randint(1, max_tokens + 1, (n_req,), generator=gen).tolist()
    with_adapter = [(s, c) for s, c in zip(slots, counts, strict=True) if s is not None]
    without = [c for s, c in zip(slots, counts, strict=True) if s is None]
    if sort_by_slot:  # the runner's order; unsorted keeps repeated non-adjacent slots
        with_adapter.sort(key=lambda sc: sc[0])
    before = PAD_BEFORE + sum(without[: len(without) // 2])
    after = PAD_AFTER + sum(without[len(without) // 2 :])

    segments, row = [], before
    for slot, count in with_adapter:
        segments.append((row, count, slot))
        row += count
    n_rows = row + after
    index = LoraIndex.from_segments(segments, device=DEVICE)

    # x and y are column slices of wider buffers (row stride != row length); a, b are layer slices.
    x_wide = torch.randn(n_rows, n_in + 7, generator=gen).to(dtype)
    y_wide = torch.randn(n_rows, n_out + 5, generator=gen).to(dtype)
    a_all = (torch.randn(N_LAYERS, n_slots, n_in, rank, generator=gen) / n_in**0.5).to(dtype)
    b_all = (torch.randn(N_LAYERS, n_slots, rank, n_out, generator=gen) / rank**0.5).to(dtype)
    scale = torch.rand(n_slots, generator=gen, dtype=torch.float32) * 2 + 0.25
    y_wide, x_wide, a_all, b_all, scale = (t.to(DEVICE) for t in (y_wide, x_wide, a_all, b_all, scale))
    x = x_wide[:, 3 : 3 + n_in]
    y = y_wide[:, 2 : 2 + n_out]
    return y_wide, y, x, a_all[1], b_all[1], scale, index


def _check(kernel, reference, case, rtol=1e-4, atol=1e-4, **kwargs) -> None:
    y_wide, y, x, a, b, scale, index = case
    y_wide0 = y_wide.clone()
    if y.dtype == torch.float32:
        expected = y.clone()
        reference(expected, x, a, b, scale, index)
    else:  # reference in fp32 from the same low-precision inputs, then compared loosely
        expected = y.float()
        reference(expected, x.float(), a.float(), b.float(), scale, index)

    kernel(y, x, a, b, scale, index, **kwargs)

    rows = slice(index.row_start, index.row_end)
    torch.testing.assert_close(y[rows].float(), expected[rows].float(), rtol=rtol, atol=atol)
    # everything outside the bucket's rows and y's columns is bit-identical
    mask = torch.ones_like(y_wide, dtype=torch.bool)
    mask[rows, 2 : 2 + y.shape[1]] = False
    assert torch.equal(y_wide[mask], y_wide0[mask]), "rows/columns outside the bucket were modified"


def _case_params(n_req: int, popularity: str) -> dict:
    i, j = BATCH_SIZES.index(n_req), POPULARITY.index(popularity)
    return dict(
        seed=100 * i + j,
        rank=RANKS[(i + j) % len(RANKS)],
        dims=DIMS[(i + 2 * j) % len(DIMS)],
        sort_by_slot=popularity != "uniform",
    )


@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("n_req", BATCH_SIZES)
def test_sgmv_matches_reference(n_req: int, popularity: str) -> None:
    case = _make_case(n_req=n_req, popularity=popularity, max_tokens=40, **_case_params(n_req, popularity))
    _check(triton_ops.sgmv, ops.sgmv_reference, case)


def row_form(y, x, a, b, scale, index, split_k=None) -> None:
    """One bucket's delta through the decode step's kernels: the row table `fill_row_table`
    makes of the bucket's segments, then the multi-bucket BGMV over it."""
    group = LoraGroup(a.shape[2], {}, scale, index, host_scale=tuple(scale.tolist()))
    meta, row_scale = np.empty((3, x.shape[0]), np.int32), np.empty(x.shape[0], np.float32)
    fill_row_table(LoraBatch((group,), True), (a.shape[2],), meta, row_scale)
    triton_multi.bgmv_multi(y, x, [a], [b], torch.from_numpy(meta).to(DEVICE), torch.from_numpy(row_scale).to(DEVICE),
                            split_k=split_k)


@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("n_req", BATCH_SIZES)
def test_row_form_matches_reference(n_req: int, popularity: str) -> None:
    case = _make_case(n_req=n_req, popularity=popularity, max_tokens=1, **_case_params(n_req, popularity))
    _check(row_form, ops.sgmv_reference, case)


@pytest.mark.parametrize("rank", RANKS + (1, 33))
@pytest.mark.parametrize("op", ("sgmv", "sgmv-decode", "rows"))
def test_rank_sweep(op: str, rank: int) -> None:
    max_tokens = 40 if op == "sgmv" else 1
    case = _make_case(seed=rank, n_req=9, popularity="zipf", rank=rank, dims=(80, 72), max_tokens=max_tokens)
    _check(row_form if op == "rows" else triton_ops.sgmv, ops.sgmv_reference, case)


@pytest.mark.parametrize("split_k", (2, 3, 5))
def test_row_form_split_k(split_k: int) -> None:
    """Input features split over several programs per row (chosen automatically for a large `in`)."""
    case = _make_case(seed=split_k, n_req=5, popularity="uniform", rank=17, dims=(100, 48), max_tokens=1)
    _check(row_form, ops.sgmv_reference, case, split_k=split_k)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=("fp16", "bf16"))
@pytest.mark.parametrize("op", ("sgmv", "rows"))
def test_low_precision(op: str, dtype: torch.dtype) -> None:
    max_tokens = 40 if op == "sgmv" else 1
    case = _make_case(
        seed=7, n_req=17, popularity="zipf", rank=17, dims=(48, 100), max_tokens=max_tokens, dtype=dtype
    )
    tol = 2e-2 if dtype == torch.float16 else 8e-2  # y itself is stored in the low precision
    _check(triton_ops.sgmv if op == "sgmv" else row_form, ops.sgmv_reference, case, rtol=tol, atol=tol)


def test_rejects_mismatched_shapes() -> None:
    y_wide, y, x, a, b, scale, index = _make_case(
        seed=0, n_req=3, popularity="uniform", rank=4, dims=(32, 64), max_tokens=2
    )
    with pytest.raises(ValueError, match="shape mismatch"):
        triton_ops.sgmv(y, x[:, :16], a, b, scale, index)
    with pytest.raises(ValueError, match="scale must be"):
        triton_ops.sgmv(y, x, a, b, scale[:1], index)
    meta = torch.zeros(3, x.shape[0], dtype=torch.int32, device=DEVICE)
    row_scale = torch.ones(x.shape[0], device=DEVICE)
    with pytest.raises(ValueError, match="bucket shapes"):
        triton_multi.bgmv_multi(y, x, [a], [b[:, :3]], meta, row_scale)
    with pytest.raises(ValueError, match="rows"):
        triton_multi.bgmv_multi(y, x, [a], [b], meta, row_scale[:1])


def _multi_case(seed: int, ranks: tuple[int, ...], n_rows: int, dims: tuple[int, int], dtype=torch.float32):
    """Rows spread over rank buckets (some rows without an adapter) for the multi-bucket BGMV."""
    gen = torch.Generator().manual_seed(seed)
    n_in, n_out, n_slots = *dims, 3
    a = [torch.randn(n_slots, n_in, r, generator=gen).to(dtype).to(DEVICE) for r in ranks]
    b = [torch.randn(n_slots, r, n_out, generator=gen).to(dtype).to(DEVICE) for r in ranks]
    bucket = torch.randint(-1, len(ranks), (n_rows,), generator=gen)
    slot = torch.randint(0, n_slots, (n_rows,), generator=gen)
    rank = torch.tensor([ranks[k] if k >= 0 else 0 for k in bucket.tolist()])
    meta = torch.stack([bucket, slot, rank]).to(torch.int32).to(DEVICE)
    scale = (torch.rand(n_rows, generator=gen) + 0.5).to(DEVICE)
    x = torch.randn(n_rows, n_in, generator=gen).to(dtype).to(DEVICE)
    y = torch.randn(n_rows, n_out, generator=gen).to(dtype).to(DEVICE)
    want = y.double().clone()
    for i, (k, s) in enumerate(zip(bucket.tolist(), slot.tolist())):
        if k >= 0:
            want[i] += scale[i].double() * (x[i].double() @ a[k][s].double()) @ b[k][s].double()
    return y, x, a, b, meta, scale, want


@pytest.mark.parametrize("split_k", (1, 3, None))
@pytest.mark.parametrize("ranks", ((8, 16, 32, 64), (1, 5, 33), tuple(range(1, 11))), ids=("4b", "odd", "10b"))
def test_bgmv_multi_matches_reference(ranks: tuple[int, ...], split_k: int | None) -> None:
    """Multi-bucket BGMV (the compiled decode step's LoRA on CUDA): every row against float64,
    rows without an adapter untouched, any number of buckets (10) in one launch pair."""
    y, x, a, b, meta, scale, want = _multi_case(len(ranks) * 7 + (split_k or 0), ranks, 13, (80, 36))
    untouched = (meta[0] < 0).cpu()
    before = y.clone()
    triton_multi.bgmv_multi(y, x, a, b, meta, scale, split_k=split_k)
    torch.testing.assert_close(y.double().cpu(), want.cpu(), rtol=1e-4, atol=1e-4)
    assert torch.equal(y.cpu()[untouched], before.cpu()[untouched])


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=("fp16", "bf16"))
def test_bgmv_multi_low_precision(dtype: torch.dtype) -> None:
    y, x, a, b, meta, scale, want = _multi_case(3, (8, 16, 32, 64), 9, (64, 48), dtype=dtype)
    triton_multi.bgmv_multi(y, x, a, b, meta, scale)
    tol = 2e-2 if dtype == torch.float16 else 8e-2
    torch.testing.assert_close(y.double().cpu(), want.cpu(), rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("split_k", (1, 3))
def test_bgmv_multi_parts_fill_their_own_columns(split_k: int) -> None:
    """The parts of a fused projection (here q, k, v of widths 36, 20, 20, the k part left out as
    an unadapted module would be) in one launch pair: each part's columns get its own delta,
    the columns of no part and the rows without an adapter stay bit for bit."""
    ranks, n_rows, n_in = (8, 16, 32), 11, 48
    cases = [_multi_case(40 + k, ranks, n_rows, (n_in, out)) for k, out in enumerate((36, 20, 20))]
    x, meta, scale = cases[0][1], cases[0][4], cases[0][5]
    gen = torch.Generator().manual_seed(9)
    y = torch.randn(n_rows, 76, generator=gen).to(DEVICE)
    want = y.double().clone()
    parts = []
    for (_, _, a, b, *_), col in ((cases[0], 0), (cases[2], 56)):
        parts.append((a, b, col))
        for i, (k, s) in enumerate(zip(meta[0].tolist(), meta[1].tolist())):
            if k >= 0:
                d = scale[i].double() * (x[i].double() @ a[k][s].double()) @ b[k][s].double()
                want[i, col : col + b[0].shape[2]] += d.to(want.device)
    before = y.clone()
    triton_multi.bgmv_multi_parts(y, x, parts, meta, scale, split_k=split_k)
    torch.testing.assert_close(y.double().cpu(), want.cpu(), rtol=1e-4, atol=1e-4)
    assert torch.equal(y[:, 36:56].cpu(), before[:, 36:56].cpu())  # the k part's columns
    assert torch.equal(y.cpu()[(meta[0] < 0).cpu()], before.cpu()[(meta[0] < 0).cpu()])
    with pytest.raises(ValueError, match="outside"):
        triton_multi.bgmv_multi_parts(y, x, [(parts[1][0], parts[1][1], 60)], meta, scale)


def test_fused_projection_row_form_equals_the_torch_semantics() -> None:
    """A fused q/k/v projection in the compiled GPU step's row form (one bgmv_multi_parts launch
    pair over the parts the pool adapts) against the plain-torch backend's groups: every part's
    delta lands in its own columns."""
    from types import SimpleNamespace

    from helpers import tiny_pool

    from caraserve.lora.backend import LORA_GROUPS, LORA_ROWS, TorchLoraBackend
    from caraserve.lora.triton_backend import TritonLoraBackend
    from caraserve.model.layers import LoraLinear

    args, store, pool = tiny_pool(device=DEVICE)
    names = ["demo-r8", "demo-r16"]  # q/v and q/k/v/o adapters
    for name in names:
        assert pool.load(store.get(name))
    pool.poll()
    h, q, kv = args.hidden_size, args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    g = torch.Generator().manual_seed(4)
    mod = LoraLinear(h, (q, kv, kv), False, 1, ("q_proj", "k_proj", "v_proj")).to(DEVICE)
    with torch.no_grad():
        mod.weight.copy_(torch.randn(mod.weight.shape, generator=g))
    rows = [(0, 2, None), (2, 3, "demo-r8"), (5, 2, "demo-r16")]
    lora = pool.make_batch([r for r in rows if r[2]], True, DEVICE)
    x = torch.randn(7, h, generator=g).to(DEVICE)
    ref = TorchLoraBackend(pool)
    ref.prepare(lora)
    mod.backend = ref
    want = mod(x, SimpleNamespace(lora_mode=LORA_GROUPS))
    meta, scale = torch.full((3, 7), -1, dtype=torch.int32), torch.zeros(7)
    for start, count, name in rows[1:]:
        bucket, slot = pool.slot_of(name)
        meta[:, start : start + count] = torch.tensor([bucket, slot, pool.buckets[bucket].rank])[:, None]
        scale[start : start + count] = pool.buckets[bucket].host_scale[slot]
    tri = TritonLoraBackend(pool)
    tri.attach(mod)
    mod.backend = tri
    got = mod(x, SimpleNamespace(lora_mode=LORA_ROWS, lora_rows=(meta.to(DEVICE), scale.to(DEVICE))))
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-4, atol=1e-4)
    # an eager decode step (the step's groups): the backend makes the same row table and runs the same kernels
    tri.prepare(lora)
    eager = mod(x, SimpleNamespace(lora_mode=LORA_GROUPS))
    assert torch.equal(eager.cpu(), got.cpu())
    made, adapted = tri._rows[0].cpu(), meta[0] >= 0  # (a base row's slot and rank are not read)
    assert torch.equal(made[0], meta[0]) and torch.equal(made[:, adapted], meta[:, adapted])
    assert torch.equal(tri._rows[1].cpu(), scale)
    base = torch.nn.functional.linear(x, mod.weight)
    for cols in (slice(0, q), slice(q, q + kv), slice(q + kv, None)):  # demo-r16's rows: every part's delta
        assert not torch.allclose(got[5:, cols].cpu(), base[5:, cols].cpu(), atol=1e-3)
    assert torch.equal(got[2:5, q : q + kv].cpu(), base[2:5, q : q + kv].cpu())  # demo-r8 leaves k alone
    assert torch.equal(got[:2].cpu(), base[:2].cpu())  # base rows


def test_fused_projections_with_one_or_no_adapted_part_in_the_row_form() -> None:
    """A pool adapting q and o only: the fused q/k/v projection has one adapted part (its
    module's own launch pair, into q's columns) and gate/up none (base only), as the torch
    backend computes them."""
    from types import SimpleNamespace

    from helpers import tiny_pool

    from caraserve.lora.backend import LORA_GROUPS, LORA_ROWS, TorchLoraBackend
    from caraserve.lora.triton_backend import TritonLoraBackend
    from caraserve.model.layers import LoraLinear

    args, store, pool = tiny_pool((8, 16), device=DEVICE, targets=("q_proj", "o_proj"))
    w = store.get("demo-r8")
    w.a.pop("v_proj"), w.b.pop("v_proj")  # as an adapter of q alone
    assert pool.load(w)
    pool.poll()
    h, q, kv, i = (args.hidden_size, args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim,
                   args.intermediate_size)
    g = torch.Generator().manual_seed(6)
    mods = [LoraLinear(h, (q, kv, kv), False, 0, ("q_proj", "k_proj", "v_proj")).to(DEVICE),
            LoraLinear(h, (i, i), False, 0, ("gate_proj", "up_proj")).to(DEVICE)]
    for mod in mods:
        with torch.no_grad():
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=g))
    lora = pool.make_batch([(1, 2, "demo-r8")], True, DEVICE)
    x = torch.randn(3, h, generator=g).to(DEVICE)
    bucket, slot = pool.slot_of("demo-r8")
    meta = torch.tensor([[-1, bucket, bucket], [0, slot, slot], [0, 8, 8]], dtype=torch.int32).to(DEVICE)
    scale = torch.tensor([0.0, w.scale, w.scale]).to(DEVICE)
    ref, tri = TorchLoraBackend(pool), TritonLoraBackend(pool)
    ref.prepare(lora)
    for mod in mods:
        mod.backend = ref
        want = mod(x, SimpleNamespace(lora_mode=LORA_GROUPS))
        tri.attach(mod)
        mod.backend = tri
        got = mod(x, SimpleNamespace(lora_mode=LORA_ROWS, lora_rows=(meta, scale)))
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-4, atol=1e-4)
        tri.prepare(lora)  # an eager decode step: the same kernels over the table the backend makes
        assert torch.equal(mod(x, SimpleNamespace(lora_mode=LORA_GROUPS)).cpu(), got.cpu())
    base = torch.nn.functional.linear(x, mods[0].weight)
    assert not torch.allclose(got.cpu(), want.cpu() * 0) and not torch.allclose(want[1:, :q], base[1:, :q])


def test_bgmv_multi_rejects_bad_arguments() -> None:
    y, x, a, b, meta, scale, _ = _multi_case(0, (4, 8), 5, (32, 16))
    with pytest.raises(ValueError, match="one A and one B"):
        triton_multi.bgmv_multi(y, x, a, b[:1], meta, scale)
    with pytest.raises(ValueError, match="rows"):
        triton_multi.bgmv_multi(y, x, a, b, meta[:, :2], scale)
    with pytest.raises(ValueError, match="bucket shapes"):
        triton_multi.bgmv_multi(y, x, [t[:, :16] for t in a], b, meta, scale)
    with pytest.raises(ValueError, match="contiguous"):
        triton_multi.bgmv_multi(y, x, [t.transpose(1, 2).contiguous().transpose(1, 2) for t in a], b, meta, scale)


def test_decode_step_triton_lora_form_matches_eager_engine(tmp_path) -> None:
    """The compiled CUDA step's LoRA form (bgmv_multi over every rank bucket) inside the decode
    step function itself, run uncompiled here (the interpreter on CPU), gives the eager tokens."""
    from helpers import save_peft_adapter, save_random_hf_model

    from caraserve.config import AdapterConfig, EngineConfig, ModelConfig
    from caraserve.engine import Engine
    from caraserve.request import SamplingParams

    save_random_hf_model(tmp_path / "base", "llama", num_hidden_layers=2)
    save_peft_adapter(tmp_path / "base", tmp_path / "adapters" / "r8", seed=1, r=8,
                      target_modules=["q_proj", "v_proj", "down_proj"])
    save_peft_adapter(tmp_path / "base", tmp_path / "adapters" / "r20", seed=2, r=20, lora_alpha=10,
                      target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"])

    def engine(compile_mode):
        return Engine(EngineConfig(model=ModelConfig(path=str(tmp_path / "base")),
                                   adapters=AdapterConfig(dir=str(tmp_path / "adapters"), rank_buckets=(8, 16, 32)),
                                   max_batch_size=4, max_seq_len=64, compile=compile_mode, compile_cache_dir="",
                                   device=DEVICE))

    greedy = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    prompts, adapters = [[5, 6, 7], [9, 10], [20, 21, 22, 23]], ["r8", "r20", None]
    want = [r.output_ids for r in engine("false").generate(prompts, greedy, adapters)]
    from caraserve.lora.triton_backend import TritonLoraBackend

    e = engine("auto")  # compiles nothing by itself on CPU: the variants below are the plain step
    graphs = e.graphs
    graphs.host_runs = False  # the GPU form: LoRA rows as a BGMV row table
    e.model.use_lora(e.pool, lambda device, pool: TritonLoraBackend(pool))
    calls = []
    live = sys.modules["caraserve.lora.triton_multi"]  # the module the step imports
    real = {"bgmv_multi_parts": live.bgmv_multi_parts}

    def counted(name):
        def call(y, x, parts, *args, **kw):
            calls.append(len(parts))
            return real[name](y, x, parts, *args, **kw)
        return call

    for name in real:
        setattr(live, name, counted(name))
    try:
        for n in range(1, 5):  # every variant as the plain step function: no compile
            for lora in (None, object()):
                graphs._fns[graphs.variant_key(n, lora)] = graphs.step_fn()
        got = [r.output_ids for r in e.generate(prompts, greedy, adapters)]
    finally:
        for name, fn in real.items():
            setattr(live, name, fn)
    assert got == want
    # the LoRA rows went through the Triton form: o and down alone, q/k/v and gate/up fused
    assert set(calls) == {1, 2, 3}
