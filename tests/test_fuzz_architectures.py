"""scripts/fuzz_architectures.py: random models of each architecture against transformers + peft
find no mismatch, and a wrong token is one."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import fuzz_architectures  # noqa: E402


def run(monkeypatch, tmp_path, *args) -> tuple[int, dict]:
    out = tmp_path / "fuzz.json"
    monkeypatch.setattr(sys, "argv", ["fuzz_architectures.py", *args, "--out", str(out)])
    return fuzz_architectures.main(), json.loads(out.read_text())


def test_random_models_match_transformers_peft(monkeypatch, tmp_path):
    rc, found = run(monkeypatch, tmp_path, "--seeds", "0:3", "--archs", "gemma2,phi3,qwen3")
    assert rc == 0
    assert [r["arch"] for r in found["results"]] == ["gemma2", "phi3", "qwen3"]
    assert all(len(r["settings"]) == 6 and not r["mismatches"] for r in found["results"])


def test_a_wrong_token_is_a_mismatch(monkeypatch, tmp_path):
    real = fuzz_architectures.engine_tokens

    def one_wrong(*args):
        tokens = real(*args)
        tokens[0][-1] = (tokens[0][-1] + 1) % 128
        return tokens

    monkeypatch.setattr(fuzz_architectures, "engine_tokens", one_wrong)
    rc, found = run(monkeypatch, tmp_path, "--seeds", "5:6")
    (result,) = found["results"]
    assert rc == 1 and result["mismatches"] and not any(m["tie"] for m in result["mismatches"])
    assert {m["request"] for m in result["mismatches"]} == {0}


def test_unknown_architectures_are_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["fuzz_architectures.py", "--archs", "gemma9"])
    with pytest.raises(SystemExit):
        fuzz_architectures.main()
