"""scripts/bench_peft_peer.py (the GPU check's transformers + peft peer) on a small shape on CPU:
the peer runs on the engine's own weight tensors and adapters, so greedy tokens agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_peer_shares_model_and_adapters_and_agrees_on_greedy_tokens(tmp_path):
    out = tmp_path / "peer.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_peft_peer.py"), "--shape", "small",
                           "--batch", "4", "--adapters", "4", "--prompt-tokens", "16", "--new-tokens", "8",
                           "--compile", "false", "--repeats", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["greedy_outputs_equal"] == "4/4"  # same weights, same adapters, float32: same tokens
    assert report["workload"]["targets"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"]
    assert report["ratio_caraserve_vs_peft"] > 0 and report["header"]["command"].startswith("python scripts/")
