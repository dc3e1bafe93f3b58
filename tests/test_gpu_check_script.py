"""scripts/gpu_check.sh is run on a lent GPU machine within a few minutes of device time: every
command it runs must at least be one its script accepts, and every test file it names must exist.
Checked here on CPU: each script's own parser reads the exact arguments (nothing runs)."""

from __future__ import annotations

import argparse
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = (ROOT / "scripts" / "gpu_check.sh").read_text().replace("\\\n", " ")


def commands() -> list[tuple[str, list[str]]]:
    """(script, its arguments) of every `"$PY" scripts/X.py ...` line, defaults of ${VAR:-x} taken."""
    found = []
    for line in SCRIPT.splitlines():
        m = re.search(r'"\$PY" (scripts/\S+\.py)(.*)$', line)
        if m:
            args = re.sub(r'"\$\{\w+:-([^}]*)\}"', r"\1", m.group(2))
            found.append((m.group(1), shlex.split(args)))
    return found


class _Parsed(Exception):
    pass


@pytest.mark.parametrize("script,args", commands(), ids=lambda x: x if isinstance(x, str) else " ".join(x)[:40])
def test_every_command_is_one_its_script_accepts(monkeypatch, script, args):
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, *a, **kw):
        raise _Parsed(parse(self, *a, **kw))  # an argument it refuses exits (SystemExit) instead

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [script, *args])
    monkeypatch.syspath_prepend(str((ROOT / script).parent))  # as `python scripts/x.py` puts its folder first
    with pytest.raises(_Parsed):
        runpy.run_path(str(ROOT / script), run_name="__main__")


def test_it_runs_the_benchmarks_the_issues_name_and_its_test_files_exist():
    scripts = {s for s, _ in commands()}
    assert {"scripts/bench_decode_floor.py", "scripts/bench_peft_peer.py", "scripts/bench_cold_start.py",
            "scripts/bench_warm_start.py"} <= scripts
    tests = re.findall(r"tests/\S+\.py", SCRIPT)
    assert tests and all((ROOT / t).is_file() for t in tests)
