"""scripts/simulate.py as a user runs it: its own options checked in one line before anything
runs, and a sweep's results written where output= says, folders made."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = ("cluster.replicas=2", "workload.rps=4", "workload.duration_s=3", "progress=false")


def simulate(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "simulate.py"), *SMALL, *args],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


@pytest.mark.parametrize("args,says", [
    (("sweep_rps=5",), "sweep_rps=5: expected a list of loads > 0"),
    (("sweep_rps=[0,10]",), "expected a list of loads > 0"),
    (("sweep_rps=[abc]",), "expected a list of loads > 0"),
    (("workers=0",), "workers=0 must be an integer >= 1"),
    (("policies=[rank_aware,nope]",), "policies: unknown ['nope']"),
    (("progress=maybe",), "progress='maybe' must be true or false"),
    (("output=/proc/x.json",), "cannot write in /proc"),
    (("cluster.replica=4",), "did you mean cluster.replicas"),
])
def test_bad_options_are_one_line(tmp_path, args, says):
    proc = simulate(tmp_path, *args)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert says in proc.stderr


def test_one_policy_name_and_a_sweep_into_a_new_folder(tmp_path):
    proc = simulate(tmp_path, "policies=rank_aware", "sweep_rps=[2,4]", "output=new/sweep.json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "new" / "sweep.json").read_text())
    assert [row["rps"] for row in report["sweep"]] == [2, 4]
    assert list(report["sweep"][0]["results"]) == ["rank_aware"]
