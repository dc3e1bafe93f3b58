"""Cold vs warm start of a compiled engine: the same offline job run twice in fresh processes.

    python scripts/bench_warm_start.py [--rounds 1] [--out profiles/cpu/bench_warm_start.json]

Each round runs `scripts/generate.py` with `engine.compile=true` on the demo prompts (base and
adapter rows, so both the base and the LoRA decode variants compile) twice: first with an empty
compile cache folder, then again with the folder the first run filled. Prints the wall time of
each process (start to exit) and the ratio; the two runs' outputs must be equal.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_once(cache_dir: Path, out: Path) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)  # the engine keeps inductor's cache beside its own
    cmd = [sys.executable, str(ROOT / "scripts" / "generate.py"), "engine.compile=true",
           f"engine.compile_cache_dir={cache_dir}", "engine.max_batch_size=8", f"output={out}", "progress=false"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", default="profiles/cpu/bench_warm_start.json")
    args = ap.parse_args()
    from caraserve.profiling.machine import cpu_name

    cold, warm = [], []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="caraserve-warm-") as tmp:
            tmp = Path(tmp)
            cold.append(run_once(tmp / "compiled", tmp / "cold.jsonl"))
            warm.append(run_once(tmp / "compiled", tmp / "warm.jsonl"))
            if (tmp / "cold.jsonl").read_text() != (tmp / "warm.jsonl").read_text():
                raise SystemExit("the warm start's outputs differ from the cold start's")
        print(f"round {r + 1}: cold start {cold[-1]:.1f} s, warm start {warm[-1]:.1f} s")
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"\nmedian: cold {c:.1f} s, warm {w:.1f} s -> warm start {c / w:.1f}x faster")
    result = {"header": {"cpu": cpu_name(), "threads": int(os.environ.get("OMP_NUM_THREADS", "1")),
                         "created": datetime.now(timezone.utc).isoformat(timespec="seconds")},
              "cold_s": cold, "warm_s": warm, "ratio": c / w}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
