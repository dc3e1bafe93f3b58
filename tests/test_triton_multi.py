"""Triton multi-bucket BGMV kernels (the compiled GPU step's LoRA) against float64 and the
plain-torch backend, and the decode step's Triton LoRA form against the eager engine
(interpreter on CPU, compiled on CUDA)."""

from __future__ import annotations

import sys

import pytest
import torch
from triton_interpret import DEVICE, kernel_modules

(triton_multi,) = kernel_modules("caraserve.lora.triton_multi")


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
    with pytest.raises(ValueError, match="meta must be int32"):
        triton_multi.bgmv_multi(y, x, a, b, meta.long(), scale)
    with pytest.raises(ValueError, match="unit column stride"):
        triton_multi.bgmv_multi(y, x, a, b, meta.t().contiguous().t(), scale)
    with pytest.raises(ValueError, match="scale float32"):
        triton_multi.bgmv_multi(y, x, a, b, meta, scale.double())
    with pytest.raises(ValueError, match="share a device"):
        triton_multi.bgmv_multi(y, x, a, b, meta.to("meta"), scale)


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
