"""The benchmarks' timing helpers (caraserve.profiling.timing) and the attention benchmark that
uses them, run on a small shape on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from caraserve.profiling.timing import CacheFlush, last_level_cache_bytes, median_us

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
