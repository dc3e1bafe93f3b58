"""The CPU LoRA sweep writes a plan that ThreadPlan reads back; the script runs end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from caraserve.config import ConfigError
from caraserve.cpu_assist import thread_plan
from caraserve.cpu_assist.thread_plan import ThreadPlan, assign_cores
from caraserve.profiling.cpu_lora import sweep

ROOT = Path(__file__).resolve().parents[1]


def test_sweep_plan_round_trip(tmp_path):
    result = sweep(64, [4, 32], [4, 16], [1, 2], repeats=1, budget_s=1e-9)
    assert len(result["measurements"]) == 2 * 2 * 2
    assert all(m["seconds"] > 0 and m["gflops"] > 0 for m in result["measurements"])
    # a budget nothing meets: the plan falls back to the most threads measured
    assert result["plan"]["threads"] == [[2, 2], [2, 2]]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(result))
    plan = ThreadPlan.load(str(path), threads=8)
    assert plan.source == str(path) and plan.gflops_per_thread > 0
    assert plan.threads_for(4, 4) == 2 and plan.threads_for(10_000, 500) == 2  # clamped to the grid
    assert ThreadPlan.load(str(path), threads=1).threads_for(32, 16) == 1  # capped by the workers


def test_a_sweep_without_one_thread_rates_a_thread_from_the_fewest_measured():
    result = sweep(64, [4, 16, 16], [4], [2], repeats=1, budget_s=None)
    assert result["plan"]["gflops_per_thread"] > 0 and result["header"]["dtype"] == "float32"


def test_missing_plan_file_is_an_error_and_default_otherwise(tmp_path):
    with pytest.raises(ConfigError, match="plan_file=.*nope.json: no such file"):
        ThreadPlan.load(str(tmp_path / "nope.json"), threads=1)
    for text in ("not json", "{}", '{"plan": {"tokens": [1]}}'):
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(ConfigError, match="plan_file=.*bad.json: not a thread plan"):
            ThreadPlan.load(str(tmp_path / "bad.json"), threads=1)


def test_default_plan_is_the_projects_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no profiles/ here
    shipped = ROOT / "profiles" / "cpu_lora_plan.json"
    assert ThreadPlan.load("", threads=2).source == str(shipped)
    monkeypatch.setattr(thread_plan, "DEFAULT_PLAN", tmp_path / "profiles" / "cpu_lora_plan.json")
    assert ThreadPlan.load("", threads=2).source == "default"


def test_more_threads_than_cores_is_warned(caplog):
    cores = len(os.sched_getaffinity(0))
    with caplog.at_level("WARNING", logger=thread_plan.__name__):
        ThreadPlan.load("", threads=cores)
    assert not caplog.records
    with caplog.at_level("WARNING", logger=thread_plan.__name__):
        plan = ThreadPlan.load("", threads=cores + 1)
    assert plan.max_threads == cores + 1
    assert f"cpu_assist.threads={cores + 1} is more than the {cores} cores" in caplog.text


def test_profile_script_writes_json_and_png(tmp_path):
    out = tmp_path / "plan.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "profile_cpu_lora.py"), "--hidden", "64", "--tokens", "4,16",
         "--ranks", "4", "--threads", "1,2", "--repeats", "1", "--out", str(out)],
        capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["header"]["hidden"] == 64 and data["plan"]["tokens"] == [4, 16]
    assert out.with_suffix(".png").stat().st_size > 1000


def test_assign_cores_disjoint_while_cores_last_then_shared():
    cores = [10, 11, 12, 13, 14, 15, 16, 17]
    assert assign_cores([2, 1, 3], cores) == [(10, 11), (12,), (13, 14, 15)]
    assert assign_cores([8], cores) == [tuple(cores)]
    # asked for more than there is: one each first, the rest round-robin, still disjoint
    assert assign_cores([4, 4], [0, 1, 2]) == [(0, 1), (2,)]
    assert assign_cores([5, 1, 5], cores) == [(10, 11, 12, 13), (14,), (15, 16, 17)]
    # more requests than cores: one core each, shared in turn
    assert assign_cores([1, 2, 1], [5, 7]) == [(5,), (7,), (5,)]
    assert assign_cores([], cores) == []
    with pytest.raises(ValueError, match="at least one core"):
        assign_cores([1], [])
    with pytest.raises(ValueError, match="at least one core"):
        assign_cores([0, 1], cores)
