"""The Python API as the README shows it: its example runs as written, and `import caraserve`
gives the engine's names without loading torch until one is used."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_readmes_python_example_runs_as_written():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### From Python"):]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)[:1]
    assert "from caraserve import Engine, EngineConfig, SamplingParams" in code
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {})
    assert printed.getvalue().strip()  # the first completion's text


def test_import_caraserve_loads_no_torch_until_a_name_is_used():
    probe = ("import sys, caraserve; assert 'torch' not in sys.modules; "
             "from caraserve import Engine, EngineConfig, SamplingParams; "
             "from caraserve.engine import Engine as E; assert Engine is E and 'torch' in sys.modules; "
             "print(sorted(caraserve.__all__))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "['Engine', 'EngineConfig', 'SamplingParams']"
