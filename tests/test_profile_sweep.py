"""The latency sweep (scripts/profile_decode.py): decode, prefill and mixed-step rows from the real
engine, and a latency model fitted on them that prices a mixed step's prompt tokens."""

from __future__ import annotations

import json

import pytest

from caraserve.config import AdapterConfig, EngineConfig
from caraserve.engine import Engine
from caraserve.perf.model import DecodeFeatures, PerfModel, PrefillFeatures, make_header
from caraserve.profiling.decode import sweep

TOKENS = [8, 40]


def _engine(**kw) -> Engine:
    return Engine(EngineConfig(device="cpu", compile="false", adapters=AdapterConfig(dir="none", device_slots=4),
                               max_batch_size=5, max_seq_len=64, max_tokens_per_step=256, **kw))


def test_sweep_measures_mixed_steps_and_the_fit_prices_them():
    rows = sweep(_engine(prefix_caching=False), [1, 4], [8, 32], TOKENS, decode_steps=3)
    mixed = [r for r in rows if r["kind"] == "mixed"]
    decode = [r for r in rows if r["kind"] == "decode"]
    # one mixed step per prompt length for every (rank mix, batch size): r8, r32, mixed, base
    assert len(mixed) == 4 * 2 * len(TOKENS) and len(decode) == 4 * 2
    assert {r["prefill_tokens"] for r in mixed} == set(TOKENS)
    assert all(r["seconds"] > 0 for r in rows)
    assert {r["chunk_rank"] for r in mixed if r["mix"] == "r32"} == {32}
    assert {r["chunk_rank"] for r in mixed if r["mix"] == "base"} == {0}
    model = PerfModel.fit(
        [(DecodeFeatures.of(r["ranks"], [r.get("prefill_tokens", 0)], [r.get("chunk_rank", 0)]), r["seconds"])
         for r in mixed + decode],
        [(PrefillFeatures.of([r["tokens_per_request"]] * r["batch_size"], r["ranks"]), r["seconds"])
         for r in rows if r["kind"] == "prefill"],
        make_header("cpu", "tiny", "float32"))
    assert "tokens" in model.decode.terms  # the mixed samples' prompt tokens explain their time
    assert model.decode_s(4, 32, 128, 40, 40 * 32) > model.decode_s(4, 32, 128)


def test_sweep_refuses_an_engine_that_would_skip_prompt_tokens():
    with pytest.raises(ValueError, match="prefix_caching"):
        sweep(_engine(), [1], [8], TOKENS, decode_steps=1)


@pytest.mark.parametrize("script,args,says", [
    ("profile_decode.py", ["--batch-sizes", "4,abc"], "argument --batch-sizes: 'abc' is not an integer"),
    ("profile_decode.py", ["--prompt-tokens", "0"], "argument --prompt-tokens: 0 must be >= 1"),
    ("profile_decode.py", ["--decode-steps", "1"], "at least 2 timed steps"),
    ("profile_decode.py", ["--ranks", "8,200"], "200 is above the largest rank bucket"),
    ("profile_decode.py", ["--out", "/proc/latency.json"], "cannot write in /proc"),
    ("profile_decode.py", ["--device", "tpu", "--out", "x.json"], "engine.device='tpu'"),
    ("profile_decode.py", ["--ranks", "8"], "argument --ranks: give two values at least"),
    ("profile_decode.py", ["--prompt-tokens", "16,100000", "--out", "x.json"],
     "argument --prompt-tokens: 100000 tokens and the decode steps after them do not fit"),
    ("profile_decode.py", ["--refit", "/nonexistent.json"], "argument --refit: /nonexistent.json is not a profile"),
    ("profile_cpu_lora.py", ["--threads", "0"], "argument --threads: 0 must be >= 1"),
    ("profile_cpu_lora.py", ["--budget-ms", "inf"], "argument --budget-ms: inf must be a number of milliseconds"),
    ("profile_cpu_lora.py", ["--hidden", "10000000"], "argument --hidden: 10000000 needs"),
    ("profile_cpu_lora.py", ["--repeats", "0"], "argument --repeats: 0 must be >= 1"),
])
def test_profiling_scripts_refuse_bad_arguments_in_one_line(tmp_path, script, args, says):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "scripts" / script), *args], capture_output=True, text=True,
                          cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert proc.returncode == 2 and says in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_refit_fits_a_profiles_raw_timings_again(tmp_path):
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from caraserve.perf.model import PerfModel

    root = Path(__file__).resolve().parents[1]
    profile = shutil.copy(root / "profiles" / "cpu" / "tiny" / "latency.json", tmp_path / "latency.json")
    proc = subprocess.run([sys.executable, str(root / "scripts" / "profile_decode.py"), "--refit", str(profile),
                           "--out", str(tmp_path / "again.json")], capture_output=True, text=True, cwd=tmp_path,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = json.loads((tmp_path / "again.json").read_text())
    before = json.loads(Path(profile).read_text())
    assert again["raw"] == before["raw"] and "refit" in again["header"]
    shipped, refitted = PerfModel.load(profile), PerfModel.load(tmp_path / "again.json")
    assert refitted.decode_s(8, 32, 128) == pytest.approx(shipped.decode_s(8, 32, 128), rel=1e-9)
