"""Paged decode attention: our kernel vs FlexAttention's paged form, both against the memory floor;
and the attention of a mixed step: our one-launch kernel vs an SDPA call per sequence.

    python scripts/bench_paged_attention.py [--shape llama2-7b|small] [--batches 32,128] [--context 160]
        [--block-size 16] [--iters 50] [--prompts 4] [--prompt-len 512]
        [--out profiles/<gpu|cpu>/bench_paged_attention.json]

One decode row per sequence, every row at `--context` positions, over a paged KV cache of
`--block-size`-token blocks scattered at random (the engine's layout: [blocks, block_size, kv
heads, head dim]). Each batch runs:
  ours   caraserve.attention.paged_attention: the Triton kernel on CUDA (the C kernel on CPU)
  flex   torch's FlexAttention (compiled) over the same blocks as its PagedAttention lays them
         out (one physical sequence per KV head; the block table converted into a block mask)
  floor  the KV bytes a step reads (every row its own context, keys and values) / the device's
         copy bandwidth measured in the same run
On a CPU both kernels are timed twice: as they run back to back (the KV of a small batch stays
in the caches) and cold, with the caches flushed before each call (`CacheFlush`), as in an engine
step, where the other layers' weights and KV have evicted this layer's.
and checks both outputs against `caraserve.attention.paged_attention_reference`. FlexAttention's
block mask depends on the step's lengths, so a serving step would rebuild it: its build time is
reported beside the kernel time.

Mixed step (`--prompts` prompts of `--prompt-len` tokens beside each batch's decode rows, one
prefill-attention call for them all, as a mixed engine step makes):
  ours   the Triton prefill kernel on CUDA (`attention_triton.prefill_attention`; on CPU the C
         kernel with every token a row)
  sdpa   one F.scaled_dot_product_attention per sequence over its gathered blocks (causal for a
         whole prompt, a mask for a decode row), the form ours replaced
both checked against the reference. Writes JSON with a provenance header. `--shape small` on a
CPU checks the script (the C kernel against FlexAttention's CPU form).
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

import torch

from caraserve.model.synthetic import SHAPES
from caraserve.profiling.machine import source_commit
from caraserve.profiling.timing import CacheFlush, copy_bandwidth_gbs, median_us


def flex_setup(k_cache, v_cache, tables, lens, bs: int):
    """(build, run): build() makes the physical block mask of these tables and lengths; run(q, mask)
    is FlexAttention over the caches laid out as PagedAttention keeps them."""
    from torch.nn.attention.experimental._paged_attention import PagedAttention
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    batch, width = tables.shape
    blocks, _, kv, d = k_cache.shape
    dev = k_cache.device
    paged = PagedAttention(n_pages=blocks, page_size=bs, max_batch_size=batch, device=str(dev))
    paged.page_table[:, :width] = tables
    paged.physical_to_logical.scatter_(1, tables, torch.arange(width, device=dev).expand(batch, width).contiguous())
    k_phys = k_cache.permute(2, 0, 1, 3).reshape(1, kv, blocks * bs, d).expand(batch, -1, -1, -1)
    v_phys = v_cache.permute(2, 0, 1, 3).reshape(1, kv, blocks * bs, d).expand(batch, -1, -1, -1)
    flex = torch.compile(flex_attention, fullgraph=True)

    def build():
        def inside(b, h, q_idx, kv_idx):
            return kv_idx < lens[b]
        logical = create_block_mask(inside, batch, None, 1, width * bs, device=str(dev), BLOCK_SIZE=bs)
        return paged.convert_logical_block_mask(logical, kv_len=lens)

    def run(q, mask):
        return flex(q[:, :, None, :], k_phys, v_phys, block_mask=mask, enable_gqa=True, scale=d ** -0.5)[:, :, 0]

    return build, run


def measure(args, batch: int, device: torch.device, dtype: torch.dtype, bw_gbs: float,
            flush: CacheFlush | None) -> dict:
    from caraserve.attention import paged_attention, paged_attention_reference

    shape = SHAPES[args.shape]
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    d = shape["hidden_size"] // heads
    bs, width = args.block_size, -(-args.context // args.block_size)
    blocks = batch * width + 1  # block 0: the engine's scratch block, owned by no row
    g = torch.Generator().manual_seed(batch)
    k_cache = torch.randn(blocks, bs, kv, d, generator=g).to(dtype).to(device)
    v_cache = torch.randn(blocks, bs, kv, d, generator=g).to(dtype).to(device)
    tables = (torch.randperm(blocks - 1, generator=g)[: batch * width] + 1).view(batch, width).to(device)
    lens = torch.full((batch,), args.context, dtype=torch.int64, device=device)
    rows = torch.arange(batch, device=device)
    q = torch.randn(batch, heads, d, generator=g).to(dtype).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    want = paged_attention_reference(q.float(), k_cache.float(), v_cache.float(), tables, rows, lens, None)

    ours = paged_attention(q, k_cache, v_cache, tables, rows, lens, None)
    row = {"batch": batch, "context": args.context, "heads": heads, "kv_heads": kv, "head_dim": d,
           "ours_max_err": (ours.float() - want).abs().max().item()}
    def ours():
        return paged_attention(q, k_cache, v_cache, tables, rows, lens, None)

    row["ours_us"] = median_us(ours, args.iters, sync)
    if flush is not None:
        row["ours_cold_us"] = median_us(ours, args.iters, sync, before=flush)
    try:
        build, run = flex_setup(k_cache, v_cache, tables, lens, bs)
        mask = build()
        row["flex_max_err"] = (run(q, mask).float() - want).abs().max().item()
        row["flex_us"] = median_us(lambda: run(q, mask), args.iters, sync)
        if flush is not None:
            row["flex_cold_us"] = median_us(lambda: run(q, mask), args.iters, sync, before=flush)
        row["flex_mask_build_us"] = median_us(build, max(3, args.iters // 10), sync)
    except Exception as e:  # FlexAttention is experimental: a failure is a result, not the end of the run
        row["flex_error"] = f"{type(e).__name__}: {e}"
    kv_bytes = 2 * batch * args.context * kv * d * k_cache.element_size()
    row["kv_bytes"] = kv_bytes
    row["floor_us"] = kv_bytes / (bw_gbs * 1e9) * 1e6
    row["ours_over_floor"] = row["ours_us"] / row["floor_us"]
    if "flex_us" in row:
        row["flex_over_floor"] = row["flex_us"] / row["floor_us"]
        row["flex_over_ours"] = row["flex_us"] / row["ours_us"]
    for name in ("ours", "flex"):
        if f"{name}_cold_us" in row:
            row[f"{name}_cold_over_floor"] = row[f"{name}_cold_us"] / row["floor_us"]
    return row


def measure_mixed(args, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
    """A mixed step's attention: `args.prompts` whole prompts, then `batch` decode rows."""
    from caraserve import cpu_kernels
    from caraserve.attention import paged_attention_reference
    from caraserve.model.self_attention import _attention_mask, sdpa

    shape = SHAPES[args.shape]
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    d = shape["hidden_size"] // heads
    bs = args.block_size
    query_lens = (args.prompt_len,) * args.prompts + (1,) * batch
    ctx = (args.prompt_len,) * args.prompts + (args.context,) * batch
    width = -(-max(ctx) // bs)
    n = len(query_lens)
    blocks = n * width + 1
    g = torch.Generator().manual_seed(batch + 7)
    k_cache = torch.randn(blocks, bs, kv, d, generator=g).to(dtype).to(device)
    v_cache = torch.randn(blocks, bs, kv, d, generator=g).to(dtype).to(device)
    tables = (torch.randperm(blocks - 1, generator=g)[: n * width] + 1).view(n, width).to(device)
    q = torch.randn(sum(query_lens), heads, d, generator=g).to(dtype).to(device)
    row_seq = torch.tensor([i for i, m in enumerate(query_lens) for _ in range(m)], device=device)
    row_lens = torch.tensor([c - m + j + 1 for m, c in zip(query_lens, ctx) for j in range(m)], device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def ours():
        if device.type == "cuda":
            from caraserve import attention_triton

            return attention_triton.prefill_attention(q, k_cache, v_cache, tables, query_lens, ctx, None)
        return cpu_kernels.paged_attention(q, k_cache, v_cache, tables, row_seq, row_lens, None)

    def per_sequence():  # as Attention._prefill did it (and does where the kernel cannot be built)
        out, start = torch.empty_like(q), 0
        positions = row_lens - 1
        for i, (m, c) in enumerate(zip(query_lens, ctx)):
            blk = tables[i, : -(-c // bs)]
            keys = k_cache[blk].flatten(0, 1)[:c].transpose(0, 1)
            vals = v_cache[blk].flatten(0, 1)[:c].transpose(0, 1)
            qi = q[start : start + m].transpose(0, 1)
            if m == c:
                o = sdpa(qi, keys, vals, is_causal=True)
            else:
                o = sdpa(qi, keys, vals, attn_mask=_attention_mask(positions[start : start + m], c, None))
            out[start : start + m] = o.transpose(0, 1)
            start += m
        return out

    # the reference gathers each row's whole table: a sample of rows (every prompt's first and
    # last token, the first decode rows) keeps it small on the 7B shape
    firsts = [sum(query_lens[:i]) for i in range(args.prompts + 1)]
    sample = torch.tensor(sorted({*firsts, *(f - 1 for f in firsts[1:]),
                                 *range(firsts[-1], min(firsts[-1] + 8, len(row_seq)))}),
                          device=device)
    want = paged_attention_reference(q[sample].float(), k_cache.float(), v_cache.float(), tables, row_seq[sample],
                                     row_lens[sample], None)
    row = {"batch": batch, "prompts": args.prompts, "prompt_len": args.prompt_len, "context": args.context,
           "ours_max_err": (ours()[sample].float() - want).abs().max().item(),
           "sdpa_max_err": (per_sequence()[sample].float() - want).abs().max().item(),
           "ours_us": median_us(ours, args.iters, sync), "sdpa_us": median_us(per_sequence, args.iters, sync)}
    row["sdpa_over_ours"] = row["sdpa_us"] / row["ours_us"]
    return row


def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama2-7b" if cuda else "small", choices=sorted(SHAPES))
    ap.add_argument("--batches", default="32,128")
    ap.add_argument("--context", type=int, default=160, help="positions every row attends to")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--prompts", type=int, default=4, help="whole prompts in the mixed step")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--out", default=None, help="default: profiles/<gpu|cpu>/bench_paged_attention.json")
    args = ap.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    bw = copy_bandwidth_gbs(device)
    # a GPU step reads the KV from HBM anyway (it outgrows L2); a CPU's caches hold a small
    # batch's, which a step's other layers would have evicted: there both kernels are also timed
    # with the caches flushed before each call
    flush = CacheFlush() if device.type == "cpu" else None
    rows = [measure(args, int(b), device, dtype, bw, flush) for b in args.batches.split(",")]
    nan = float("nan")
    print(f"{'batch':>5} {'ours us':>9} {'flex us':>9} {'floor us':>9} {'ours/floor':>10} {'flex/floor':>10} "
          f"{'flex mask us':>12}" + ("  cold: ours us  flex us  ours/floor" if flush else "")
          + "  errors (ours, flex)")
    for r in rows:
        cold = (f"  {r['ours_cold_us']:>14.1f} {r.get('flex_cold_us', nan):>8.1f} {r['ours_cold_over_floor']:>10.2f}x"
                if flush else "")
        print(f"{r['batch']:>5} {r['ours_us']:>9.1f} {r.get('flex_us', nan):>9.1f} {r['floor_us']:>9.1f} "
              f"{r['ours_over_floor']:>9.2f}x {r.get('flex_over_floor', nan):>9.2f}x "
              f"{r.get('flex_mask_build_us', nan):>12.1f}{cold}  "
              f"{r['ours_max_err']:.2g}, {r.get('flex_max_err', r.get('flex_error'))}")
    mixed = [measure_mixed(args, int(b), device, dtype) for b in args.batches.split(",")]
    print(f"mixed step ({args.prompts} prompts of {args.prompt_len} tokens + the batch's decode rows):")
    print(f"{'batch':>5} {'ours us':>9} {'sdpa us':>9} {'sdpa/ours':>9}  errors (ours, sdpa)")
    for r in mixed:
        print(f"{r['batch']:>5} {r['ours_us']:>9.1f} {r['sdpa_us']:>9.1f} {r['sdpa_over_ours']:>8.2f}x  "
              f"{r['ours_max_err']:.2g}, {r['sdpa_max_err']:.2g}")
    name = torch.cuda.get_device_name() if cuda else "cpu"
    out = Path(args.out or f"profiles/{'gpu' if cuda else 'cpu'}/bench_paged_attention.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "header": {"device": name, "dtype": str(dtype), "torch": torch.__version__, "commit": source_commit(),
                   "copy_bandwidth_gbs": bw, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "command": "python scripts/bench_paged_attention.py "
                              + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())},
        "rows": rows, "mixed": mixed}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
