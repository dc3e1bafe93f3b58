"""The Triton paged attention kernels (GPUs) against the plain-torch statement of the semantics,
`caraserve.attention.paged_attention_reference` (interpreter on CPU, compiled on CUDA)."""

from __future__ import annotations

import pytest
import torch
from triton_interpret import DEVICE, kernel_modules

from caraserve.attention import paged_attention_reference

(attention_triton,) = kernel_modules("caraserve.attention_triton")


@pytest.mark.parametrize("heads,kv,d,bs,window", [(4, 2, 16, 4, None), (6, 2, 20, 3, 5), (2, 2, 8, 8, None)])
@pytest.mark.parametrize("splits", (1, 3, None))
def test_paged_attention_kernel_matches_the_reference(heads, kv, d, bs, window, splits) -> None:
    """The Triton paged attention (GPUs) against the plain-torch statement of the semantics:
    scattered blocks, rows of one sequence at several lengths, GQA, a sliding window; contexts
    walked in one pass or in splits combined after (rows shorter than a split included)."""
    g = torch.Generator().manual_seed(heads * 10 + d)
    width = -(-11 // bs)
    k = torch.randn(3 * width + 2, bs, kv, d, generator=g)
    v = torch.randn(3 * width + 2, bs, kv, d, generator=g)
    tables = (torch.randperm(3 * width + 1, generator=g)[: 3 * width] + 1).view(3, width)
    row_seq = torch.tensor([0, 1, 2, 1, 0])
    lens = torch.tensor([11, 1, 7, bs, 3])
    q = torch.randn(5, heads, d, generator=g)
    want = paged_attention_reference(q, k, v, tables, row_seq, lens, window)
    args = [t.to(DEVICE) for t in (q, k, v, tables, row_seq, lens)]
    got = attention_triton.paged_attention(*args, window, splits=splits and min(splits, width))
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="splits"):
        attention_triton.paged_attention(*args, window, splits=width + 1)
    with pytest.raises(ValueError, match="int64"):
        attention_triton.paged_attention(*args[:4], args[4].int(), args[5], window)
    with pytest.raises(ValueError, match="do not fit"):  # a 2-D q: refused, not unpacked
        attention_triton.paged_attention(args[0][:, 0], *args[1:], window)
    with pytest.raises(ValueError, match="one device"):
        attention_triton.paged_attention(*args[:3], args[3].to("meta"), *args[4:], window)
    with pytest.raises(ValueError, match="q's device"):
        attention_triton.paged_attention(*args[:5], args[5].to("meta"), window)
    with pytest.raises(ValueError, match="dtype"):
        attention_triton.paged_attention(args[0], args[1].double(), args[2].double(), *args[3:], window)


@pytest.mark.parametrize("splits", (1, 3))
def test_soft_capped_kernels_match_the_reference(splits) -> None:
    """Gemma 2's soft cap in the decode kernel (in one pass and in splits) and the prefill one,
    queries large enough that the cap bites."""
    g = torch.Generator().manual_seed(5)
    heads, kv, d, bs, window = 4, 2, 16, 4, 6
    q, k, v, tables, row_seq, lens = prefill_case(g, heads, kv, d, bs, (9, 1, 3), (9, 14, 20))
    q = 8 * q
    want = paged_attention_reference(q, k, v, tables, row_seq, lens, window, softcap=2.5)
    assert (want - paged_attention_reference(q, k, v, tables, row_seq, lens, window)).abs().max() > 0.1
    args = [t.to(DEVICE) for t in (q, k, v, tables)]
    got = attention_triton.paged_attention(*args, row_seq.to(DEVICE), lens.to(DEVICE), window, splits=splits,
                                           softcap=2.5)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
    got = attention_triton.prefill_attention(*args, (9, 1, 3), (9, 14, 20), window, softcap=2.5)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


def prefill_case(g, heads, kv, d, bs, query_lens, context_lens):
    """Sequences with scattered blocks; sequence i's last query_lens[i] positions of its
    context_lens[i] are the step's tokens, as rows of q in sequence order. Returns the kernel's
    arguments and the reference's per-token rows (row_seq, row_lens)."""
    width = -(-max(context_lens) // bs)
    n = len(query_lens)
    k = torch.randn(n * width + 2, bs, kv, d, generator=g)
    v = torch.randn(n * width + 2, bs, kv, d, generator=g)
    tables = (torch.randperm(n * width + 1, generator=g)[: n * width] + 1).view(n, width)
    q = torch.randn(sum(query_lens), heads, d, generator=g)
    row_seq = torch.tensor([i for i, m in enumerate(query_lens) for _ in range(m)])
    row_lens = torch.tensor([c - m + j + 1 for m, c in zip(query_lens, context_lens) for j in range(m)])
    return q, k, v, tables, row_seq, row_lens


@pytest.mark.parametrize("heads,kv,d,bs,window", [
    (4, 2, 16, 4, None), (6, 2, 20, 3, 5), (2, 2, 8, 8, None), (4, 1, 32, 16, 9), (3, 3, 16, 1, None),
    (2, 1, 16, 4, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_attention_kernel_matches_the_reference(heads, kv, d, bs, window, dtype) -> None:
    """Prefill and mixed steps in one launch: whole prompts, a prompt chunk after cached
    positions, decode rows, a prompt longer than a tile (70 tokens: two tiles of 64 rows with
    one head a group), GQA with a group padded to a power of two, head sizes below 16 and not a
    power of two, blocks of one token, sliding windows shorter and longer than a tile; float32
    (exact products) and float16 (the tensor-core form, bfloat16's too; the interpreter cannot
    multiply bfloat16 itself)."""
    g = torch.Generator().manual_seed(heads * 10 + d)
    query_lens, context_lens = (5, 1, 70, 3, 1), (5, 12, 70, 40, 1)
    q, k, v, tables, row_seq, row_lens = prefill_case(g, heads, kv, d, bs, query_lens, context_lens)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    want = paged_attention_reference(q.float(), k.float(), v.float(), tables, row_seq, row_lens, window)
    args = [t.to(DEVICE) for t in (q, k, v, tables)]
    got = attention_triton.prefill_attention(*args, query_lens, context_lens, window)
    assert got.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.float().cpu(), want, rtol=tol, atol=tol)


@pytest.mark.skipif(DEVICE != "cuda", reason="bfloat16 products: the interpreter cannot compute them")
def test_prefill_attention_kernel_in_bfloat16() -> None:
    g = torch.Generator().manual_seed(11)
    query_lens, context_lens = (70, 1, 3), (70, 40, 20)
    q, k, v, tables, row_seq, row_lens = prefill_case(g, 8, 2, 128, 16, query_lens, context_lens)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    want = paged_attention_reference(q.float(), k.float(), v.float(), tables, row_seq, row_lens, None)
    args = [t.to(DEVICE) for t in (q, k, v, tables)]
    got = attention_triton.prefill_attention(*args, query_lens, context_lens, None)
    torch.testing.assert_close(got.float().cpu(), want, rtol=2e-2, atol=2e-2)


def test_prefill_attention_refuses_what_does_not_fit() -> None:
    g = torch.Generator().manual_seed(3)
    q, k, v, tables, _, _ = prefill_case(g, 4, 2, 16, 4, (2, 3), (2, 7))
    with pytest.raises(ValueError, match="query_lens"):
        attention_triton.prefill_attention(q, k, v, tables, (2, 2), (2, 7), None)  # 4 rows named, q has 5
    with pytest.raises(ValueError, match="query_lens"):
        attention_triton.prefill_attention(q, k, v, tables, (2, 3), (2, 2), None)  # more new tokens than context
    with pytest.raises(ValueError, match="int64"):
        attention_triton.prefill_attention(q, k, v, tables.int(), (2, 3), (2, 7), None)
    with pytest.raises(ValueError, match="dtype"):
        attention_triton.prefill_attention(q, k.half(), v.half(), tables, (2, 3), (2, 7), None)
    with pytest.raises(ValueError, match="do not fit"):
        attention_triton.prefill_attention(q[:, :3], k, v, tables, (2, 3), (2, 7), None)
    with pytest.raises(ValueError, match="do not fit"):  # a 4-D q: refused, not unpacked
        attention_triton.prefill_attention(q[None], k, v, tables, (2, 3), (2, 7), None)


def test_prefill_tiles_go_longest_first() -> None:
    """One program per tile of new tokens (no idle programs for short sequences), the tiles that
    read the most keys first (under a window, a long context's decode row reads only the
    window), made once per step layout."""
    cpu = torch.device("cpu")
    tiles = attention_triton._tiles((3, 1, 70), (3, 40, 70), 64, 0, cpu)
    assert tiles.tolist() == [[2, 4, 70, 70, 64], [2, 4, 70, 70, 0], [1, 3, 1, 40, 0], [0, 0, 3, 3, 0]]
    assert attention_triton._tiles((3, 1, 70), (3, 40, 70), 64, 0, cpu) is tiles
    windowed = attention_triton._tiles((3, 1, 70), (3, 40, 70), 64, 8, cpu).tolist()
    # keys read: 64, then 13 (the second tile: its 6 tokens' windows of 8), 8, 3
    assert windowed == [[2, 4, 70, 70, 0], [2, 4, 70, 70, 64], [1, 3, 1, 40, 0], [0, 0, 3, 3, 0]]
