"""Batched LoRA operator timings, each against its peers measured in the same run.

    python scripts/bench_lora_ops.py [--hidden 4096] [--ranks 8,16,32,64] [--batches 1,8,32,64]
        [--prefill-tokens 512] [--repeats 20] [--threads 1] [--out profiles/bench_lora_ops_cpu.json]

For one q_proj-shaped projection (hidden -> hidden) and adapters of ranks 8-64 (one rank bucket
each, as in the device pool), per batch size and popularity (distinct / uniform / zipf / identical):
  batched : our batched operator as the engine runs it (CPU: the backend's runs over slot-ordered
            rows; CUDA: Triton SGMV for prompts, the multi-bucket BGMV over the row table for decode)
  loop    : a per-request loop, x_i @ A_i @ B_i * s_i one request at a time
  base    : the base projection x @ W^T the delta rides on
  floor   : (CUDA) bytes of the adapter weights the batch reads / measured copy bandwidth
Prints a table (median microseconds) with ratios and writes JSON with a provenance header.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from caraserve.lora.backend import backend_for
from caraserve.lora.batch import LoraBatch, LoraGroup, LoraIndex, fill_row_table
from caraserve.profiling.cli_args import positive_int, positive_ints
from caraserve.profiling.machine import cpu_name
from caraserve.profiling.timing import copy_bandwidth_gbs, median_us


def popularity(kind: str, n: int, slots: int, g: torch.Generator) -> list[int]:
    if kind == "distinct":
        return [i % slots for i in range(n)]
    if kind == "identical":
        return [0] * n
    if kind == "uniform":
        return torch.randint(0, slots, (n,), generator=g).tolist()
    w = 1.0 / torch.arange(1, slots + 1, dtype=torch.float64) ** 1.2  # zipf
    return torch.multinomial(w, n, replacement=True, generator=g).tolist()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=positive_int, default=4096)
    ap.add_argument("--ranks", type=positive_ints, default=[8, 16, 32, 64])
    ap.add_argument("--batches", type=positive_ints, default=[1, 8, 32, 64])
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    h, S = args.hidden, args.slots
    ranks = args.ranks
    nb = len(ranks)
    # As in the device pool: one tensor pair per rank bucket; global slot s = bucket s % nb.
    per_bucket = -(-S // nb)
    a = [(torch.randn(per_bucket, h, r, generator=g) / h**0.5).to(device=dev, dtype=dtype) for r in ranks]
    b = [(torch.randn(per_bucket, r, h, generator=g) * 0.05).to(device=dev, dtype=dtype) for r in ranks]
    scale = torch.full((per_bucket,), 2.0, device=dev)
    w = (torch.randn(h, h, generator=g) / h**0.5).to(device=dev, dtype=dtype)
    bw = copy_bandwidth_gbs(dev) if dev.type == "cuda" else None

    rows = []
    cases = [(bs, False) for bs in args.batches] + [(args.prefill_tokens, True)]
    for n, is_prefill in cases:
        for pop in ("distinct", "uniform", "zipf", "identical"):
            nreq = max(1, n // 64) if is_prefill else n
            req_slots = sorted(popularity(pop, nreq, S, g), key=lambda s: (s % nb, s // nb))
            lens = [n // nreq + (1 if i < n % nreq else 0) for i in range(nreq)] if is_prefill else [1] * nreq
            segs, start = [], 0
            by_bucket: dict[int, list] = {}
            for s, ln in zip(req_slots, lens):
                segs.append((start, ln, s % nb, s // nb))
                by_bucket.setdefault(s % nb, []).append((start, ln, s // nb))
                start += ln
            groups = tuple(LoraGroup(ranks[bk], {"q_proj": (a[bk][None], b[bk][None])}, scale,
                                     LoraIndex.from_segments(sg, dev), frozenset({"q_proj"}), tuple(scale.tolist()))
                           for bk, sg in by_bucket.items())
            # the device's LoRA backend, as the engine's layers use it (layer 0, module q_proj)
            backend = backend_for(torch.device(dev), SimpleNamespace(targets={"q_proj"}, buckets=[]))
            backend.prepare(LoraBatch(groups, not is_prefill))
            x = torch.randn(start, h, generator=g).to(device=dev, dtype=dtype)
            y = torch.zeros(start, h, device=dev, dtype=dtype)

            def batched():
                backend.add_groups(y, x, groups, 0, "q_proj")

            if dev.type == "cuda" and not is_prefill:  # decode rows: the row table, one launch pair
                from caraserve.lora.triton_multi import bgmv_multi

                meta, row_scale = np.empty((3, start), np.int32), np.empty(start, np.float32)
                fill_row_table(LoraBatch(groups, True), tuple(ranks), meta, row_scale)
                meta, row_scale = torch.from_numpy(meta).to(dev), torch.from_numpy(row_scale).to(dev)

                def batched():
                    bgmv_multi(y, x, a, b, meta, row_scale)

            def loop():
                for st, ln, bk, k in segs:
                    y[st : st + ln] += ((x[st : st + ln] @ a[bk][k]) @ b[bk][k]) * 2.0

            def base():
                torch.nn.functional.linear(x, w)

            t_b, t_l, t_base = (median_us(f, args.repeats, sync) for f in (batched, loop, base))
            row = {"tokens": start, "requests": nreq, "form": "sgmv" if is_prefill else "bgmv", "popularity": pop,
                   "batched_us": t_b, "loop_us": t_l, "base_us": t_base,
                   "loop_over_batched": t_l / t_b, "batched_over_base": t_b / t_base}
            if bw:
                weight_bytes = sum(2 * h * ranks[s % nb] * x.element_size() for s in set(req_slots))
                row["floor_us"] = weight_bytes / (bw * 1e9) * 1e6
                row["batched_over_floor"] = t_b / row["floor_us"]
            rows.append(row)

    print(f"\ndevice={dev} dtype={dtype} hidden={h} ranks (one bucket each)={ranks} threads={args.threads}")
    hdr = f"{'form':5s} {'tokens':>6s} {'reqs':>4s} {'popularity':10s} {'batched':>9s} {'loop':>9s} {'base':>9s} " \
          f"{'loop/batched':>12s} {'batched/base':>12s}"
    print(hdr + ("  floor  batched/floor" if bw else ""))
    for r in rows:
        line = (f"{r['form']:5s} {r['tokens']:6d} {r['requests']:4d} {r['popularity']:10s} {r['batched_us']:8.1f}u "
                f"{r['loop_us']:8.1f}u {r['base_us']:8.1f}u {r['loop_over_batched']:11.2f}x "
                f"{r['batched_over_base']:11.2f}x")
        if bw:
            line += f" {r['floor_us']:7.1f}u {r['batched_over_floor']:8.2f}x"
        print(line)
    out = args.out or f"profiles/bench_lora_ops_{dev.type}.json"
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name()
    result = {"header": {"device": name, "dtype": str(dtype), "torch": torch.__version__, "threads": args.threads,
                         "hidden": h, "ranks": ranks, "copy_bandwidth_gbs": bw,
                         "created": datetime.now(timezone.utc).isoformat(timespec="seconds")},
              "rows": rows}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
