"""Paged attention as a Triton kernel (GPUs): the semantics of
`caraserve.attention.paged_attention_reference`, reading each row's KV blocks in place.

One program per (row, KV head, split): it walks its part of the row's blocks through the block
table, scores the GROUP query heads that share the KV head against each block's keys at once,
and keeps an online softmax (running maximum and sum) so the values are read once, in one pass.
Nothing is gathered or copied: a row reads only its own positions [lo, len), block by block.

With one split a program writes the output itself. Few rows and KV heads leave most of a GPU
idle while long contexts are walked block after block, so the block table's width is then cut
into splits walked in parallel (flash-decoding): split i takes the i-th share of each row's own
blocks and leaves its partial maximum, sum and weighted values, and a second kernel combines the
splits of each (row, KV head).

Prefill and mixed steps (`prefill_attention`) have runs of consecutive query tokens per
sequence: one program per (sequence, tile of BLOCK_Q of its tokens, KV head) scores the tile's
tokens x the GROUP heads sharing the KV head against BLOCK_N keys at a time as matrix products,
with the causal (and window) mask and the same online softmax. One launch for the whole step,
decode rows of a mixed step included, over the cache in place.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl


def _on(t: torch.Tensor):
    """The launch's device context: Triton launches on the current CUDA device and its stream,
    and a placed model's layers may live on another GPU than the current one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@triton.jit
def _cap(scores, softcap):
    """softcap * tanh(scores / softcap) (Gemma 2's soft cap), tanh as 2 sigmoid(2x) - 1"""
    return softcap * (2.0 * tl.sigmoid(2.0 * (scores / softcap)) - 1.0)


# Programs (rows x KV heads) from which a decode batch fills a GPU without splitting its contexts
SPLIT_BELOW_PROGRAMS = 256
MAX_SPLITS = 16
MIN_BLOCKS_PER_SPLIT = 8


@triton.jit
def _paged_attention_kernel(
    out_ptr,  # [T, H, D]
    part_ptr,  # [T, KV, SPLITS, BLOCK_G, BLOCK_D] float32: each split's weighted values (SPLITS > 1)
    ms_ptr,  # [T, KV, SPLITS, 2, BLOCK_G] float32: each split's running maximum and sum (SPLITS > 1)
    q_ptr,  # [T, H, D]
    k_ptr, v_ptr,  # [blocks, BS, KV, D] contiguous
    tables_ptr,  # [S, W] int64
    row_seq_ptr, lens_ptr,  # [T] int64
    scale,
    window,  # 0: none
    softcap,  # read with SOFTCAP only
    stride_qt, stride_qh,
    stride_ot, stride_oh,
    stride_tab,
    KV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, SPLITS: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    row = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(row_seq_ptr + row)
    length = tl.load(lens_ptr + row)
    lo = tl.where((window > 0) & (length > window), length - window, 0)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    d_mask = offs_d < D
    heads = kvh * GROUP + offs_g
    q = tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    m = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    offs_s = tl.arange(0, BLOCK_S)
    pos_stride = KV * D
    # split i of SPLITS walks the i-th share of the row's own blocks (shorter rows: some none)
    first = lo // BS
    end = (length + BS - 1) // BS
    per = (end - first + SPLITS - 1) // SPLITS
    b_begin = first + split * per
    b_end = tl.minimum(end, b_begin + per)
    for b in range(b_begin, b_end):
        block = tl.load(tables_ptr + seq * stride_tab + b).to(tl.int64)
        pos = b * BS + offs_s
        p_mask = (offs_s < BS) & (pos >= lo) & (pos < length)
        base = block * BS * pos_stride + kvh * D
        kb = tl.load(k_ptr + base + offs_s[:, None] * pos_stride + offs_d[None, :],
                     mask=p_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)  # [BLOCK_S, BLOCK_D]
        scores = tl.sum(q[:, None, :] * kb[None, :, :], axis=2) * scale  # [BLOCK_G, BLOCK_S]
        if SOFTCAP:
            scores = _cap(scores, softcap)
        scores = tl.where(p_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        vb = tl.load(v_ptr + base + offs_s[:, None] * pos_stride + offs_d[None, :],
                     mask=p_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vb[None, :, :], axis=1)
        s = s * alpha + tl.sum(p, axis=1)
        m = m_new
    if SPLITS == 1:
        o = acc / s[:, None]
        tl.store(out_ptr + row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
    else:  # a split with no blocks leaves m = -inf, s = 0, acc = 0: it weighs nothing below
        at = ((row * KV + kvh) * SPLITS + split).to(tl.int64)
        tl.store(part_ptr + at * BLOCK_G * BLOCK_D + offs_g[:, None] * BLOCK_D + offs_d[None, :], acc)
        tl.store(ms_ptr + at * 2 * BLOCK_G + offs_g, m)
        tl.store(ms_ptr + at * 2 * BLOCK_G + BLOCK_G + offs_g, s)


@triton.jit
def _combine_splits_kernel(
    out_ptr,  # [T, H, D]
    part_ptr, ms_ptr,  # the splits' partial results, as _paged_attention_kernel leaves them
    stride_ot, stride_oh,
    KV: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out = sum_i exp(m_i - M) acc_i / sum_i exp(m_i - M) s_i over the splits i of one (row, KV
    head), M the largest m_i (every row has a position, so some split has a finite m_i)."""
    row = tl.program_id(0)
    kvh = tl.program_id(1)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    first = ((row * KV + kvh) * SPLITS).to(tl.int64)
    top = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    for i in tl.static_range(SPLITS):
        top = tl.maximum(top, tl.load(ms_ptr + (first + i) * 2 * BLOCK_G + offs_g))
    total = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for i in tl.static_range(SPLITS):
        w = tl.exp(tl.load(ms_ptr + (first + i) * 2 * BLOCK_G + offs_g) - top)
        total += w * tl.load(ms_ptr + (first + i) * 2 * BLOCK_G + BLOCK_G + offs_g)
        acc += w[:, None] * tl.load(part_ptr + (first + i) * BLOCK_G * BLOCK_D + offs_g[:, None] * BLOCK_D
                                    + offs_d[None, :])
    heads = kvh * GROUP + offs_g
    tl.store(out_ptr + row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             (acc / total[:, None]).to(out_ptr.dtype.element_ty),
             mask=(offs_g < GROUP)[:, None] & (offs_d < D)[None, :])


def splits_for(rows: int, kv_heads: int, table_width: int) -> int:
    """Context splits of a decode batch: 1 when rows x KV heads fill a GPU, else enough to
    walk a full-width block table in parallel (at least MIN_BLOCKS_PER_SPLIT blocks each). It
    depends on shapes only, so a CUDA graph of a batch bucket keeps its choice."""
    if rows * kv_heads >= SPLIT_BELOW_PROGRAMS:
        return 1
    return max(1, min(MAX_SPLITS, table_width // MIN_BLOCKS_PER_SPLIT, -(-SPLIT_BELOW_PROGRAMS // (rows * kv_heads))))


def _check_common(kind: str, q, k_cache, v_cache, block_tables) -> tuple[int, int, int, int, int]:
    """The attention kernels' shared checks, before any shape is unpacked: q [T, H, D] and the
    caches [blocks, BS, KV, D] contiguous of one dtype, H a multiple of KV, block_tables [S, W]
    int64, all on one device. Returns (T, H, D, BS, KV)."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape or block_tables.dim() != 2 \
            or k_cache.shape[3] != q.shape[2] or k_cache.shape[2] == 0 or q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"{kind}: q {tuple(q.shape)}, caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)} and "
                         f"block_tables {tuple(block_tables.shape)} do not fit (q [T, H, D], caches [blocks, BS, KV, "
                         "D], H a multiple of KV, block_tables [S, W])")
    if not (q.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError(f"{kind}: q and the caches must be contiguous")
    if block_tables.dtype != torch.int64 or not q.dtype == k_cache.dtype == v_cache.dtype:
        raise ValueError(f"{kind}: block_tables must be int64 ({block_tables.dtype}) and the caches of q's dtype "
                         f"({k_cache.dtype}, {v_cache.dtype} for {q.dtype})")
    if not q.device == k_cache.device == v_cache.device == block_tables.device:
        raise ValueError(f"{kind}: q, the caches and block_tables must be on one device")
    t, heads, d = q.shape
    return t, heads, d, k_cache.shape[1], k_cache.shape[2]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    row_seq: torch.Tensor, lens: torch.Tensor, window: int | None,
                    splits: int | None = None, softcap: float = 0.0) -> torch.Tensor:
    """paged_attention_reference's result; q [T, H, D] contiguous, caches [blocks, BS, KV, D]
    contiguous of q's dtype, block_tables [S, W] int64, row_seq / lens [T] int64, on one device;
    splits: shares of each row's own blocks walked in parallel (None: `splits_for`); softcap > 0:
    the scores soft-capped (Gemma 2's). Shapes,
    dtypes and devices are checked here; the values of block ids and lengths stay on the device
    (reading them would synchronize every step), the caller's (the scheduler's) to keep in range."""
    t, heads, d, bs, kv = _check_common("paged attention", q, k_cache, v_cache, block_tables)
    if row_seq.shape != (t,) or lens.shape != (t,):
        raise ValueError(f"paged attention: block_tables {tuple(block_tables.shape)}, row_seq "
                         f"{tuple(row_seq.shape)}, lens {tuple(lens.shape)} for {t} rows")
    if any(x.dtype != torch.int64 or x.device != q.device for x in (row_seq, lens)):
        raise ValueError("paged attention: row_seq and lens must be int64 on q's device")
    width = block_tables.shape[1]
    splits = splits_for(t, kv, width) if splits is None else splits
    if not 1 <= splits <= max(1, width):
        raise ValueError(f"paged attention: splits={splits} must be in [1, {max(1, width)}] (the table's width)")
    tables = block_tables.contiguous()
    out = torch.empty_like(q)
    group = heads // kv
    block_g, block_d = max(2, triton.next_power_of_2(group)), triton.next_power_of_2(d)
    if splits > 1:
        part = torch.empty((t, kv, splits, block_g, block_d), dtype=torch.float32, device=q.device)
        ms = torch.empty((t, kv, splits, 2, block_g), dtype=torch.float32, device=q.device)
    else:  # the kernel neither reads nor writes them (a tensor of their own: no alias of `out`)
        part = ms = torch.empty(1, dtype=torch.float32, device=q.device)
    with _on(q):
        _paged_attention_kernel[(t, kv, splits)](
            out, part, ms, q, k_cache, v_cache, tables, row_seq, lens, d ** -0.5, window or 0, float(softcap or 1.0),
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), tables.stride(0),
            KV=kv, D=d, BS=bs, SPLITS=splits, GROUP=group, BLOCK_G=block_g, BLOCK_D=block_d,
            BLOCK_S=triton.next_power_of_2(bs), SOFTCAP=bool(softcap),
        )
        if splits > 1:
            _combine_splits_kernel[(t, kv)](
                out, part, ms, out.stride(0), out.stride(1),
                KV=kv, D=d, SPLITS=splits, GROUP=group, BLOCK_G=block_g, BLOCK_D=block_d,
            )
    return out


@triton.jit(do_not_specialize=["window", "stride_tab"])  # both change between steps: no variant each
def _prefill_attention_kernel(
    out_ptr, q_ptr,  # [T, H, D]
    k_ptr, v_ptr,  # [blocks, BS, KV, D] contiguous
    tables_ptr,  # [S, W] int64
    tiles_ptr,  # [tiles, 5] int64: sequence, its first row in q, its new tokens, its context, the tile's first token
    scale,
    window,  # 0: none
    softcap,  # read with SOFTCAP only
    stride_qt, stride_qh,
    stride_ot, stride_oh,
    stride_tab,
    KV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    kvh = tl.program_id(0)  # the fastest axis: every head of a tile starts before the next tile
    tile = tl.program_id(1).to(tl.int64)
    seq = tl.load(tiles_ptr + tile * 5)
    row0 = tl.load(tiles_ptr + tile * 5 + 1)
    qlen = tl.load(tiles_ptr + tile * 5 + 2)
    ctx = tl.load(tiles_ptr + tile * 5 + 3)
    tok0 = tl.load(tiles_ptr + tile * 5 + 4)
    offs_m = tl.arange(0, BLOCK_Q * GROUP_PAD)  # tile token m // GROUP_PAD, head m % GROUP_PAD of the group
    tok = tok0 + offs_m // GROUP_PAD
    hg = offs_m % GROUP_PAD
    m_mask = (tok < qlen) & (hg < GROUP)
    heads = kvh * GROUP + hg
    pos = ctx - qlen + tok  # each query token's own position
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q = tl.load(q_ptr + (row0 + tok)[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    m = tl.full((BLOCK_Q * GROUP_PAD,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_Q * GROUP_PAD,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_Q * GROUP_PAD, BLOCK_D), dtype=tl.float32)
    # keys [lo, hi): up to the tile's last token, from the first one's window start
    first_pos = ctx - qlen + tok0
    hi = tl.minimum(first_pos + BLOCK_Q, ctx)
    lo = tl.where(window > 0, tl.maximum(first_pos - window + 1, 0), 0)
    offs_n = tl.arange(0, BLOCK_N)
    pos_stride = KV * D
    for n0 in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        n = n0 + offs_n
        n_mask = (n >= lo) & (n < hi)
        block = tl.load(tables_ptr + seq * stride_tab + n // BS, mask=n_mask, other=0)
        at = block * (BS * pos_stride) + (n % BS) * pos_stride + kvh * D
        kb = tl.load(k_ptr + at[:, None] + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        if IEEE:
            scores = tl.dot(q, tl.trans(kb), input_precision="ieee") * scale
        else:
            scores = tl.dot(q, tl.trans(kb)) * scale  # [BLOCK_Q * GROUP_PAD, BLOCK_N]
        if SOFTCAP:
            scores = _cap(scores, softcap)
        seen = n_mask[None, :] & (n[None, :] <= pos[:, None]) & \
            ((window == 0) | (n[None, :] > pos[:, None] - window))
        scores = tl.where(seen, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
        alpha = tl.exp(m - m_safe)
        p = tl.exp(scores - m_safe[:, None])
        vb = tl.load(v_ptr + at[:, None] + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        if IEEE:
            pv = tl.dot(p.to(vb.dtype), vb, input_precision="ieee")
        else:
            pv = tl.dot(p.to(vb.dtype), vb)
        acc = acc * alpha[:, None] + pv
        s = s * alpha + tl.sum(p, axis=1)
        m = m_new
    o = acc / tl.where(s > 0, s, 1.0)[:, None]
    tl.store(out_ptr + (row0 + tok)[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      query_lens: tuple[int, ...], context_lens: tuple[int, ...], window: int | None,
                      softcap: float = 0.0) -> torch.Tensor:
    """paged_attention_reference's result for a prefill or mixed step: sequence i's query_lens[i]
    new tokens are rows [sum(query_lens[:i]), ...) of q and the last positions of its
    context_lens[i] (their keys already in the cache), each attending causally (within the
    window) to its sequence's positions. q [T, H, D] contiguous, caches [blocks, BS, KV, D]
    contiguous of q's dtype, block_tables [S, W] int64, all on one CUDA device (or CPU tensors
    under the Triton interpreter); query_lens and context_lens on the host; softcap > 0: the
    scores soft-capped (Gemma 2's)."""
    t, heads, d, bs, kv = _check_common("prefill attention", q, k_cache, v_cache, block_tables)
    n = len(query_lens)
    if block_tables.shape[0] != n or len(context_lens) != n or sum(query_lens) != t \
            or any(not 1 <= m <= c for m, c in zip(query_lens, context_lens)):
        raise ValueError(f"prefill attention: block_tables {tuple(block_tables.shape)}, query_lens (sum "
                         f"{sum(query_lens)}) and context_lens for {n} sequences, {t} rows "
                         "(1 <= new tokens <= context)")
    if n == 0:
        return torch.empty_like(q)
    group = heads // kv
    group_pad = triton.next_power_of_2(group)
    block_q = max(1, 64 // group_pad, -(-16 // group_pad))  # 64 query rows a tile (tl.dot wants 16 or more)
    tiles = _tiles(tuple(query_lens), tuple(context_lens), block_q, window or 0, q.device)
    tables = block_tables.contiguous()
    out = torch.empty_like(q)
    with _on(q):
        _prefill_attention_kernel[(kv, tiles.shape[0])](
            out, q, k_cache, v_cache, tables, tiles, d ** -0.5, window or 0, float(softcap or 1.0),
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), tables.stride(0),
            KV=kv, D=d, BS=bs, GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_N=32,
            BLOCK_D=max(16, triton.next_power_of_2(d)), IEEE=q.dtype == torch.float32, SOFTCAP=bool(softcap),
        )
    return out


@functools.lru_cache(maxsize=16)
def _tiles(query_lens: tuple[int, ...], context_lens: tuple[int, ...], block_q: int, window: int,
           device: torch.device) -> torch.Tensor:
    """[tiles, 5] int64 on `device`: (sequence, its first row, its new tokens, its context, the
    tile's first token) for every tile of block_q new tokens, those that read the most keys first
    (the longest programs start first, so none is left running alone at the end). Made once per
    step layout: every layer's call of a step reuses it. Prefill steps run on the engine's one
    stream and are never captured in a CUDA graph: a table the cache drops is not in use."""
    rows, start = [], 0
    for s, (m, c) in enumerate(zip(query_lens, context_lens)):
        rows += [(s, start, m, c, tok) for tok in range(0, m, block_q)]
        start += m

    def keys_read(r):
        first = r[3] - r[2] + r[4]  # the tile's first position; it reads keys [lo, hi)
        hi = min(first + block_q, r[3])
        return hi - (max(first - window + 1, 0) if window else 0)

    rows.sort(key=keys_read, reverse=True)
    table = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":  # pinned: the copy does not wait for the device's queue to drain
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)
