"""The report of scripts/bench_cold_start.py: per-policy medians over the repeats, their ratios to
CACHED and between on-demand and CPU-assisted loading, and the table it prints."""

from __future__ import annotations

import statistics

import torch

RANKS = (8, 16, 32, 64)
METRICS = ("ttft", "tpot", "e2e")


def summarize(runs, outputs, n_items):
    """(systems: per-policy medians and runs, ratios to CACHED, on-demand / assisted pairs)."""
    systems = {}
    for policy, rs in runs.items():
        systems[policy] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        systems[policy]["runs"] = rs
        same = sum(a == b for a, b in zip(outputs[policy], outputs["CACHED"]))
        systems[policy]["outputs_equal_to_cached"] = f"{same}/{n_items}"
    base = systems["CACHED"]
    ratios = {}
    for policy, s in systems.items():
        ratios[policy] = {
            "ttft_mean_vs_cached": s["ttft_mean_ms"] / base["ttft_mean_ms"],
            "ttft_p50_vs_cached": s["ttft_p50_ms"] / base["ttft_p50_ms"],
            "e2e_mean_vs_cached": s["e2e_mean_ms"] / base["e2e_mean_ms"],
        }
    pairs = {}
    for assisted in ("CPU-assisted", "auto"):
        if "on-demand" in systems and assisted in systems:
            od, cs = systems["on-demand"], systems[assisted]
            pairs[f"on-demand / {assisted} mean latency"] = od["e2e_mean_ms"] / cs["e2e_mean_ms"]
            pairs[f"on-demand / {assisted} mean TTFT"] = od["ttft_mean_ms"] / cs["ttft_mean_ms"]
    return systems, ratios, pairs


def print_report(args, result: dict) -> None:
    header, em, workload = result["header"], result["emulation"], result["workload"]
    systems, ratios, pairs = result["systems"], result["ratios"], result["pairs"]
    print(f"\n{header['cpu']} ({header['cores']} cores), tiny model fp32, torch {torch.__version__}, "
          f"cpu_assist.threads={args.threads}, plan: {header['cpu_assist_plan'] or 'n/a'}")
    w = workload
    print(f"workload: {args.requests} requests, Poisson {args.rate:g} req/s over {w['arrival_span_s']:.1f} s, "
          f"{args.adapters} adapters ({w['adapters_used']} used, ranks {w['rank_counts']}), {args.popularity}, "
          f"targets {args.targets}, prompt {args.prompt_min}-{args.prompt_max} (mean "
          f"{w['mean_prompt_tokens']:.0f}), output {args.output_min}-{args.output_max}; "
          f"slots/bucket {args.slots} (CACHED {w['cached_slots_per_bucket']}); repeats {args.repeats} (medians); "
          f"load average {header['loadavg_1_5_15_start'][0]:.2f} at start, "
          f"{header['loadavg_1_5_15_end'][0]:.2f} at end")
    if all(em["copy_ms"][r] is None for r in RANKS):
        print("real copies (CUDA): " + ", ".join(f"r{r} {em['adapter_bytes'][r] / 2**20:.2f} MiB" for r in RANKS))
    else:
        print(f"emulated copy at {args.copy_gbps:g} GB/s: " + ", ".join(
            f"r{r} {em['adapter_bytes'][r] / 2**20:.2f} MiB -> {em['copy_ms'][r]:.1f} ms" for r in RANKS))
    print("prefill here (rank-64 adapter resident): "
          + ", ".join(f"{n} tok {ms:.1f} ms" for n, ms in em['prefill_ms_rank64_resident'].items()))
    cols = "".join(f" {m.upper() + ' ' + q:>10s}" for m in METRICS for q in ("mean", "p50", "p99"))
    print(f"\n{'policy':13s}{cols} {'cold':>5s} {'assist':>6s} {'loads':>5s} {'late':>6s} {'x TTFT':>7s} "
          f"{'x TTFT50':>8s} {'x e2e':>6s}")
    for policy, s in systems.items():
        vals = "".join(f" {s[f'{m}_{q}_ms']:10.1f}" for m in METRICS for q in ("mean", "p50", "p99"))
        r = ratios[policy]
        print(f"{policy:13s}{vals} {s['cold_starts']:5.0f} {s['cpu_assisted']:6.0f} {s['loads']:5.0f} "
              f"{s['late_mean_ms']:6.1f} {r['ttft_mean_vs_cached']:6.2f}x {r['ttft_p50_vs_cached']:7.2f}x "
              f"{r['e2e_mean_vs_cached']:5.2f}x")
    print("(ms; x = ratio to CACHED; late = mean ms a request waited for a step to end before its add, "
          "not in TTFT)")
    for policy, s in systems.items():
        print(f"{policy}: cold-start TTFT mean {s['ttft_cold_mean_ms']:.1f} ms, TTFT from the due time (late "
              f"included) mean {s['ttft_from_due_mean_ms']:.1f} p99 {s['ttft_from_due_p99_ms']:.1f} ms, "
              f"greedy outputs equal to CACHED {s['outputs_equal_to_cached']}, wall {s['wall_s']:.1f} s")
    for k, v in pairs.items():
        print(f"{k}: {v:.2f}x")
    busy = {p: max(r["other_processes_cpu_s"] for r in s["runs"]) for p, s in systems.items()}
    if any(v > 0.05 * systems[p]["wall_s"] for p, v in busy.items()):
        print("WARNING: other processes used the CPU during the runs (max CPU-seconds per run: "
              + ", ".join(f"{p} {v:.1f}" for p, v in busy.items()) + "): the numbers are contaminated")
