"""What machine a measurement ran on, for the provenance headers of profiles and benchmarks."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (platform.processor() is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def source_commit() -> str:
    """The git commit of the source tree this package runs from ("unknown" outside a checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parents[2]).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def cpu_header(**fields) -> dict:
    """A CPU benchmark's provenance header: when, from which commit, on which CPU, plus `fields`."""
    from datetime import datetime, timezone

    return {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": source_commit(),
            "device": "cpu", "cpu": cpu_name(), **fields}


def write_json(path: str | Path, result: dict) -> None:
    """Writes a benchmark's result (its folder made as needed) and says where."""
    import json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
