"""The CPU attention kernel (csrc/attention_cpu.c through caraserve/cpu_kernels.py) and the custom
ops (caraserve/ops.py) against float64 references and the torch reference, and what the wrappers,
the kernel and the ops refuse."""

import pytest
import torch

from caraserve import cpu_kernels


def attention_reference(q, k_cache, v_cache, tables, row_seq, lens, window, softcap=0.0):
    """float64 softmax attention of each row's query over its sequence's visible positions (the
    scores soft-capped with softcap > 0)."""
    n, heads, hd = q.shape
    group, bs = heads // k_cache.shape[2], k_cache.shape[1]
    out = torch.empty(n, heads, hd, dtype=torch.float64)
    for i in range(n):
        length = int(lens[i])
        lo = max(0, length - window) if window else 0
        blocks = tables[row_seq[i]]
        keys = torch.cat([k_cache[b] for b in blocks])  # [W * bs, kv, hd]: the sequence's positions in order
        vals = torch.cat([v_cache[b] for b in blocks])
        assert keys.shape[0] == len(blocks) * bs
        for h in range(heads):
            k = keys[lo:length, h // group].double()
            v = vals[lo:length, h // group].double()
            scores = k @ q[i, h].double() / hd ** 0.5
            w = torch.softmax(torch.tanh(scores / softcap) * softcap if softcap else scores, 0)
            out[i, h] = w @ v
    return out


def paged_case(heads, kv_heads, hd, block_size, seed=0):
    """Three sequences holding scattered blocks of a cache with two spare, and rows of each: decode
    rows and prompt tokens, lengths 1, block_size, 8, 17, 40 (the 8-key chunks and their tails)."""
    g = torch.Generator().manual_seed(seed)
    width = -(-40 // block_size)
    k_cache = torch.randn(3 * width + 3, block_size, kv_heads, hd, generator=g)
    v_cache = torch.randn(3 * width + 3, block_size, kv_heads, hd, generator=g)
    perm = torch.randperm(3 * width + 2, generator=g)[: 3 * width] + 1  # block 0 unused, as the scratch block is
    tables = perm.view(3, width).contiguous()
    row_seq = torch.tensor([0, 1, 2, 1, 0, 2, 2])
    lens = torch.tensor([1, 40, 9, 17, 8, block_size, 40])
    q = torch.randn(7, heads, hd, generator=g)
    return q, k_cache, v_cache, tables, row_seq, lens


@pytest.mark.parametrize("heads,kv_heads,hd,window,block_size", [
    (4, 2, 64, None, 16), (8, 8, 32, None, 5), (6, 2, 20, 5, 3), (4, 1, 128, 3, 16), (4, 2, 64, 11, 1)])
def test_paged_attention_matches_float64(fn, heads, kv_heads, hd, window, block_size, threads):
    from caraserve.attention import paged_attention_reference

    q, k_cache, v_cache, tables, row_seq, lens = paged_case(heads, kv_heads, hd, block_size, heads * 100 + hd)
    out = cpu_kernels.paged_attention(q, k_cache, v_cache, tables, row_seq, lens, window)
    want = attention_reference(q, k_cache, v_cache, tables.tolist(), row_seq, lens, window)
    assert out is not None and out.shape == q.shape
    assert torch.allclose(out.double(), want, rtol=1e-5, atol=1e-5), (out.double() - want).abs().max()
    # the plain-torch statement of the semantics agrees with the same float64 loop
    ref = paged_attention_reference(q, k_cache, v_cache, tables, row_seq, lens, window)
    assert torch.allclose(ref.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads,hd,window,block_size", [
    (4, 2, 64, None, 16), (6, 3, 20, 6, 3), (8, 1, 80, None, 1), (4, 4, 128, 13, 5)])
def test_paged_attention_prompt_runs_match_float64(fn, heads, kv_heads, hd, window, block_size, threads):
    """Consecutive tokens of one prompt, which the kernel attends to as tiles of several rows:
    runs of every length around the tile's (1-21 tokens), starting at position 0 or mid-sequence
    (a chunk after a cached prefix), beside decode rows, with windows that cut some of a tile's
    rows and not others."""
    g = torch.Generator().manual_seed(heads * 7 + hd)
    runs = [(0, 0, 21), (1, 5, 8), (2, 30, 17), (0, 21, 1), (3, 0, 9), (1, 13, 3), (2, 47, 1), (4, 2, 16)]
    longest = max(start + n for _, start, n in runs)
    width = -(-longest // block_size)
    k_cache = torch.randn(5 * width + 1, block_size, kv_heads, hd, generator=g)
    v_cache = torch.randn(5 * width + 1, block_size, kv_heads, hd, generator=g)
    tables = (torch.randperm(5 * width, generator=g) + 1).view(5, width).contiguous()
    row_seq = torch.tensor([s for s, _, n in runs for _ in range(n)])
    lens = torch.tensor([start + i + 1 for _, start, n in runs for i in range(n)])
    q = torch.randn(len(lens), heads, hd, generator=g)
    out = cpu_kernels.paged_attention(q, k_cache, v_cache, tables, row_seq, lens, window)
    want = attention_reference(q, k_cache, v_cache, tables.tolist(), row_seq, lens, window)
    assert out is not None
    assert torch.allclose(out.double(), want, rtol=1e-5, atol=1e-5), (out.double() - want).abs().max()
    # and to the bit what each row gives alone: a prompt's numbers do not depend on how it is
    # chunked or batched (chunked prefill, prompt logprobs, a prefix-cache hit give the same)
    alone = torch.cat([cpu_kernels.paged_attention(q[i : i + 1], k_cache, v_cache, tables, row_seq[i : i + 1],
                                                   lens[i : i + 1], window) for i in range(len(lens))])
    assert torch.equal(out, alone)


@pytest.mark.parametrize("heads,kv_heads,hd,window,block_size", [(4, 2, 64, None, 16), (6, 2, 20, 5, 3)])
def test_soft_capped_attention_matches_float64(fn, heads, kv_heads, hd, window, block_size, threads):
    """Gemma 2's soft cap (scores cap * tanh(score / cap)), queries large enough that it bites:
    decode rows and a prompt's tiles of consecutive tokens, the kernel and the torch reference."""
    from caraserve.attention import paged_attention_reference

    q, k_cache, v_cache, tables, row_seq, lens = paged_case(heads, kv_heads, hd, block_size, hd)
    tiles = torch.arange(1, 18)  # 17 consecutive tokens of sequence 1: tiles of the kernel
    row_seq, lens = torch.cat([row_seq, torch.ones_like(tiles)]), torch.cat([lens, tiles])
    q = 8 * torch.cat([q, torch.randn(len(tiles), heads, hd, generator=torch.Generator().manual_seed(1))])
    want = attention_reference(q, k_cache, v_cache, tables.tolist(), row_seq, lens, window, softcap=3.0)
    uncapped = attention_reference(q, k_cache, v_cache, tables.tolist(), row_seq, lens, window)
    assert (want - uncapped).abs().max() > 0.1  # the cap changes the answer
    out = cpu_kernels.paged_attention(q, k_cache, v_cache, tables, row_seq, lens, window, softcap=3.0)
    assert out is not None
    assert torch.allclose(out.double(), want, rtol=1e-5, atol=1e-5), (out.double() - want).abs().max()
    ref = paged_attention_reference(q, k_cache, v_cache, tables, row_seq, lens, window, softcap=3.0)
    assert torch.allclose(ref.double(), want, rtol=1e-5, atol=1e-5)
    op = torch.ops.caraserve.paged_attention(q, k_cache, v_cache, tables, row_seq, lens, window or 0, 3.0)
    assert torch.equal(op, out)
    with pytest.raises(ValueError, match="softcap must be >= 0"):
        cpu_kernels.paged_attention(q, k_cache, v_cache, tables, row_seq, lens, window, softcap=-1.0)


def test_paged_attention_peaked_softmax(fn):
    """Scores hundreds apart (most weights underflow to zero, e^x below float32's range) still
    give the float64 result: the vector exp's clamp and the maximum subtraction."""
    q, k_cache, v_cache, tables, row_seq, lens = paged_case(4, 2, 64, 16, 7)
    q = q * 60
    out = cpu_kernels.paged_attention(q, k_cache, v_cache, tables, row_seq, lens, None)
    want = attention_reference(q, k_cache, v_cache, tables.tolist(), row_seq, lens, None)
    assert out is not None and torch.allclose(out.double(), want, rtol=1e-5, atol=1e-5)


def test_paged_attention_declines_what_it_does_not_take(fn):
    k_cache = torch.randn(4, 8, 2, 16)
    q = torch.randn(2, 4, 16)
    tables, row_seq, lens = torch.tensor([[1], [3]]), torch.tensor([0, 1]), torch.tensor([3, 8])

    def call(q=q, k=k_cache, tables=tables, row_seq=row_seq, lens=lens):
        return cpu_kernels.paged_attention(q, k, k, tables, row_seq, lens, None)

    assert call() is not None
    assert call(q=q.double(), k=k_cache.double()) is None
    assert call(q=torch.randn(2, 3, 16)) is None  # 3 heads over 2 KV heads
    assert call(lens=torch.tensor([3, 9])) is None  # past the table's one block of 8
    assert call(lens=torch.tensor([0, 2])) is None  # a row with nothing to attend to
    assert call(row_seq=row_seq.int()) is None
    assert call(row_seq=torch.tensor([0, 2])) is None  # no sequence 2
    assert call(tables=torch.tensor([[1], [4]])) is None  # no block 4
    assert call(tables=torch.tensor([[1], [-1]])) is None


# --- what the LoRA wrapper and kernel refuse ------------------------------------------------------
# Tensors that the kernel must not reach past are views into bigger buffers, so that a kernel
# without the checks would only scribble inside the test's own memory.


def test_paged_attention_op_refuses_by_name_what_no_path_computes():
    """Where the C kernel declines a call, the op checks it before the torch reference runs it:
    out-of-range sequences, lengths and block ids, mismatched caches and mixed devices are
    refused by name (the reference's indexing would wrap negatives and mask the rest, and a meta
    input would hand back uninitialised memory); what the kernel only does not read (float64,
    int32 tables) still gives the kernel's numbers."""
    op = torch.ops.caraserve.paged_attention
    q, k_cache, v_cache = torch.randn(2, 4, 16), torch.randn(10, 4, 2, 16), torch.randn(10, 4, 2, 16)
    tables, row_seq, lens = torch.tensor([[3, 6, 2], [9, 4, 7]]), torch.tensor([0, 1]), torch.tensor([4, 7])
    cases = [
        ((q, k_cache, v_cache, torch.tensor([[3, 6, 2], [-1, 4, 7]]), row_seq, lens), "block id outside"),
        ((q, k_cache, v_cache, torch.tensor([[3, 6, 2], [-1, 4, 7]]).int(), row_seq, lens), "block id outside"),
        ((q, k_cache, v_cache, tables, torch.tensor([0, -1]), lens), "row_seq holds"),
        ((q, k_cache, v_cache, tables, row_seq, torch.tensor([4, 1000])), r"outside \[1, 12\]"),
        ((q, k_cache, v_cache, tables, row_seq, torch.tensor([0, 7])), "lens hold"),
        ((q, k_cache, v_cache, tables[:, :0], row_seq, lens), "block_tables"),
        ((q, k_cache, v_cache[:, :, :1].contiguous(), tables, row_seq, lens), "of one shape"),
        ((q, k_cache, v_cache, tables.to("meta"), row_seq, lens), "on meta"),
        ((q, k_cache, v_cache, tables, row_seq, lens.to("meta")), "on meta"),
        ((q[..., :0], k_cache[..., :0], v_cache[..., :0], tables, row_seq, lens), "head sizes"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            op(*args, 0)
    want = op(q, k_cache, v_cache, tables, row_seq, lens, 0)
    wide = op(q.double(), k_cache.double(), v_cache.double(), tables, row_seq, lens, 0)
    assert wide.dtype == torch.float64 and torch.allclose(wide.float(), want, atol=1e-5)
    assert torch.allclose(op(q, k_cache, v_cache, tables.int(), row_seq.int(), lens.int(), 0), want, atol=1e-5)
    # entries past what a row reads may hold anything (padding): the kernel ignores them, and so does the reference
    padded = torch.tensor([[3, 10**6, -1], [9, 4, 7]])  # row 0 reads its 4 positions from block 3 only
    assert torch.allclose(op(q, k_cache, v_cache, padded.int(), row_seq, lens, 0),
                          op(q, k_cache, v_cache, padded, row_seq, lens, 0), atol=1e-5)


def test_packed_linear_refuses_a_width_that_is_not_its_weights():
    """The op's fake gives [.., out_features]; the real one must agree or say so."""
    w = torch.randn(24, 16)
    packed = torch.ops.mkldnn._reorder_linear_weight(w, 5)
    x = torch.randn(5, 16)
    assert torch.allclose(torch.ops.caraserve.packed_linear(x, packed, None, 24), x @ w.T, atol=1e-5)
    with pytest.raises(ValueError, match="gives 24 features, not 7"):
        torch.ops.caraserve.packed_linear(x, packed, None, 7)
    with pytest.raises(ValueError, match="x must be float32 on the CPU, got torch.float64"):
        torch.ops.caraserve.packed_linear(x.double(), packed, None, 24)


def test_paged_attention_refuses_inconsistent_inputs(fn):
    k_cache = torch.randn(4, 8, 2, 16)
    q = torch.randn(2, 4, 16)
    tables, row_seq, lens = torch.tensor([[1], [3]]), torch.tensor([0, 1]), torch.tensor([3, 8])
    with pytest.raises(ValueError, match="row_seq"):
        cpu_kernels.paged_attention(q, k_cache, k_cache, tables, torch.tensor([0, 1, 1]), lens, None)
    with pytest.raises(ValueError, match="lens"):
        cpu_kernels.paged_attention(q, k_cache, k_cache, tables, row_seq, lens.view(2, 1), None)
    with pytest.raises(ValueError, match="lens"):
        cpu_kernels.paged_attention(q, k_cache, k_cache, tables, row_seq, [3, 8], None)
    with pytest.raises(ValueError, match="block_tables"):
        cpu_kernels.paged_attention(q, k_cache, k_cache, tables.view(-1), row_seq, lens, None)
    with pytest.raises(ValueError, match="window"):
        cpu_kernels.paged_attention(q, k_cache, k_cache, tables, row_seq, lens, -1)


def test_paged_attention_never_hands_c_a_bad_pointer(fn):
    """Tensors the kernel cannot read (another device) or shapes it would divide by: declined."""
    k_cache = torch.randn(4, 8, 2, 16)
    q = torch.randn(2, 4, 16)
    tables, row_seq, lens = torch.tensor([[1], [3]]), torch.tensor([0, 1]), torch.tensor([3, 8])
    assert cpu_kernels.paged_attention(q, k_cache, k_cache.to("meta"), tables, row_seq, lens, None) is None
    assert cpu_kernels.paged_attention(q, k_cache, k_cache, tables.to("meta"), row_seq, lens, None) is None
    assert cpu_kernels.paged_attention(q, k_cache, k_cache, tables, row_seq.to("meta"), lens, None) is None
    no_heads = torch.randn(4, 8, 0, 16)
    assert cpu_kernels.paged_attention(q, no_heads, no_heads, tables, row_seq, lens, None) is None


def test_custom_ops_fake_implementations_match_their_outputs():
    """Compiled steps trust each custom op's fake implementation for the shape, strides and dtype
    of its output (they do not re-assert them at run time): opcheck runs the op for real and
    under fake tensors and compares the two."""
    import caraserve.ops  # noqa: F401 (registers the ops)

    w = torch.randn(24, 16)
    packed = torch.ops.mkldnn._reorder_linear_weight(w, 5)
    for rows in (1, 5, 32):
        # (opcheck cannot take the packed weight, a oneDNN tensor without storage: the fake
        # implementation's promise, a contiguous [rows, out] float32 tensor, is checked here)
        x = torch.randn(rows, 16)
        out = torch.ops.caraserve.packed_linear(x, packed, None, 24)
        assert (out.shape, out.stride(), out.dtype) == ((rows, 24), (24, 1), torch.float32)
        torch.testing.assert_close(out, x @ w.T)
    q, k_cache, v_cache, tables, row_seq, lens = paged_case(4, 2, 64, 16)
    torch.library.opcheck(torch.ops.caraserve.paged_attention.default, (q, k_cache, v_cache, tables, row_seq, lens, 0),
                          test_utils=("test_schema", "test_faketensor"))
