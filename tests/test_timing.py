"""The benchmarks' timing helpers (caraserve.profiling.timing) and the attention and cold-start
benchmarks that use them, run on a small shape on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from caraserve.profiling.timing import CacheFlush, busy_cpu_s, last_level_cache_bytes, median_us, own_cpu_s, pct

ROOT = Path(__file__).resolve().parents[1]


def test_median_us_runs_before_ahead_of_every_timed_call():
    calls = []
    us = median_us(lambda: calls.append("fn"), 3, sync=lambda: calls.append("sync"),
                   before=lambda: calls.append("before"))
    # one untimed warm-up call, then (before, sync, fn, sync) per iteration
    assert calls == ["fn", "sync"] + ["before", "sync", "fn", "sync"] * 3
    assert us >= 0


def test_last_level_cache_bytes_reads_the_largest_sysfs_cache(tmp_path):
    for i, size in enumerate(("48K", "1024K", "32768K", "junk")):
        (tmp_path / f"index{i}").mkdir()
        (tmp_path / f"index{i}" / "size").write_text(size + "\n")
    assert last_level_cache_bytes(root=tmp_path) == 32 << 20
    assert last_level_cache_bytes(default=123, root=tmp_path / "missing") == 123


def test_cache_flush_reads_a_buffer_of_the_given_size():
    flush = CacheFlush(1 << 20)
    assert flush.buffer.numel() * flush.buffer.element_size() == 1 << 20
    flush()
    assert torch.equal(flush.buffer, torch.ones_like(flush.buffer))  # read, never written


def test_pct_is_the_nearest_rank_value():
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert [pct(xs, q) for q in (0, 25, 50, 99, 100)] == [1.0, 2.0, 3.0, 5.0, 5.0]
    assert pct([7], 50) == 7


def test_cpu_seconds_count_this_process_and_the_machine():
    busy0, own0 = busy_cpu_s(), own_cpu_s()
    sum(i * i for i in range(2_000_000))
    assert own_cpu_s() > own0
    assert busy0 is None or busy_cpu_s() >= busy0 + (own_cpu_s() - own0) * 0.5


def test_bench_cold_start_policies_give_cached_tokens(tmp_path):
    """Every loading policy, on a few cold adapters, emits the CACHED run's greedy tokens."""
    out = tmp_path / "cold.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_cold_start.py"), "--requests", "6",
                           "--adapters", "4", "--rate", "20", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report["systems"]) == {"CACHED", "on-demand", "CPU-assisted", "auto"}
    assert {s["outputs_equal_to_cached"] for s in report["systems"].values()} == {"6/6"}
    assert report["systems"]["on-demand"]["cold_starts"] > 0 and report["systems"]["CACHED"]["cold_starts"] == 0
    assert "on-demand / CPU-assisted mean latency" in report["pairs"]


@pytest.mark.slow
def test_bench_paged_attention_small_batch(tmp_path):
    """A batch under the mixed step's 8 sampled decode rows once indexed past the last row."""
    out = tmp_path / "attention.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_paged_attention.py"), "--shape", "small",
                           "--batches", "2", "--context", "40", "--iters", "2", "--prompts", "1",
                           "--prompt-len", "24", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    (row,), (mixed,) = report["rows"], report["mixed"]
    assert row["ours_max_err"] < 1e-4 and mixed["ours_max_err"] < 1e-4 and mixed["sdpa_max_err"] < 1e-4
    assert row["ours_cold_us"] > 0 and row["ours_cold_over_floor"] > 0  # CPU: the flushed-cache timing
