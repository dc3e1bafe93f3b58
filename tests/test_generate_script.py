"""scripts/generate.py as a user runs it: one output line per input line whatever the line holds,
and input/output paths checked before the model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def generate(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "progress=false",
                           "engine.compile=false", *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)


def test_every_input_line_is_one_output_line(tmp_path):
    """U+2028 (and the other characters str.splitlines breaks at) inside a JSON string, a line
    that is not UTF-8, CRLF endings: each line is one request or one error, in order."""
    good = {"prompt": "import os", "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [json.dumps({"id": "sep", **good, "prompt": "a\u2028b\u2029c\x85d\x0ce"}, ensure_ascii=False).encode(),
             b'{"id": "latin1", "prompt": "caf\xe9", "max_tokens": 3}',
             json.dumps({"id": "crlf", **good}).encode() + b"\r",
             json.dumps({"id": "last", **good}).encode(),
             json.dumps({"id": "stop", **good, "max_tokens": 8, "stop": ["\x00", "\x01"]}).encode()]
    src.write_bytes(b"\n".join(lines) + b"\n")
    proc = generate(tmp_path, f"input={src}", f"output={dst}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(x) for x in dst.read_text().split("\n") if x]
    assert [r["id"] for r in rows] == ["sep", "latin1", "crlf", "last", "stop"]
    assert len(rows[0]["token_ids"]) == 3 and "error" not in rows[0]
    assert "line 2: is not UTF-8 (byte 0xe9" in rows[1]["error"]
    assert rows[2]["token_ids"] == rows[3]["token_ids"]
    assert rows[3]["finish_reason"] == "length" and rows[3]["stop_reason"] is None
    # the stop string that ended a line is its stop_reason
    text = rows[4]["text"]
    stop = text[2:4]
    src.write_text(json.dumps({"id": "stop", **good, "max_tokens": 8, "stop": ["\x00", stop]}) + "\n")
    proc = generate(tmp_path, f"input={src}", f"output={dst}")
    (row,) = [json.loads(x) for x in dst.read_text().split("\n") if x]
    assert row["finish_reason"] == "stop" and row["stop_reason"] == stop and row["text"] == text[: text.index(stop)]


def test_bad_paths_are_one_line_before_the_model_loads(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "x"}) + "\n")
    for args, says in (((f"input={src}", f"output={tmp_path / 'nowhere' / 'out.jsonl'}"), "is not a folder"),
                       ((f"input={src}", f"output={tmp_path}"), "is a folder"),
                       ((f"input={tmp_path}",), "is a folder, not a file"),
                       ((f"input={tmp_path / 'missing.jsonl'}",), "no such file"),
                       ((f"input={src}", "output=/proc/out.jsonl"), "cannot write in /proc"),
                       (("input=true",), "expected a file path"),
                       ((f"input={src}", "progress=maybe"), "progress='maybe' must be true or false"),
                       ((f"input={src}", "scheduler.perf_model=/nonexistent.json"),
                        "scheduler.perf_model=/nonexistent.json: no such file"),
                       ((f"input={src}", "cpu_assist.mode=on", "cpu_assist.plan_file=/nonexistent.json"),
                        "cpu_assist.plan_file=/nonexistent.json: no such file")):
        proc = generate(tmp_path, *args, "model.path=/nonexistent")  # (loading it would fail otherwise)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert len(proc.stderr.splitlines()) == 1 and says in proc.stderr


def test_results_on_stdout_are_jsonl_alone_and_a_numeric_file_name_is_a_path(tmp_path):
    """Without output=, stdout carries the results only (the logs go to stderr); `input=123`
    (which Hydra reads as a number) names the file 123; an output file keeps no temporary beside it."""
    lines = [{"id": "a", "prompt": "import os", "max_tokens": 2}, {"id": 7, "prompt": "x", "max_tokens": 1},
             {"id": ["k", 1], "prompt": "y", "max_tokens": 1}]
    # (a byte order mark before the first line, as some editors write)
    (tmp_path / "123").write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(x) + "\n" for x in lines).encode())
    proc = generate(tmp_path, "input=123")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["id"] for r in rows] == ["a", 7, ["k", 1]] and not any("error" in r for r in rows)  # ids as given
    assert "loaded" in proc.stderr  # the model's log line
    assert generate(tmp_path, "input=123", "output=out.jsonl").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["123", "out.jsonl"]


def test_an_input_piped_in_is_read(tmp_path):
    """input=/dev/stdin (a pipe, as `cat lines.jsonl | generate.py input=/dev/stdin` makes it)
    is read to its end; it was refused as "no such file" (not a regular file)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    line = '{"id": "p", "prompt": "x", "max_tokens": 2}\n'
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "progress=false",
                           "engine.compile=false", "input=/dev/stdin"], input=line,
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = [json.loads(line) for line in proc.stdout.splitlines()]
    assert row["id"] == "p" and len(row["token_ids"]) == 2


def test_an_output_that_is_a_link_or_a_fifo_is_written_through_not_replaced(tmp_path):
    """As `> path`: a symlink's target gets the results (the link stays), and a FIFO is written
    into (it stays a FIFO); only a regular file is replaced by the finished results."""
    import stat
    import threading

    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "a", "prompt": "x", "max_tokens": 1}) + "\n")
    (tmp_path / "link.jsonl").symlink_to("target.jsonl")
    assert generate(tmp_path, f"input={src}", "output=link.jsonl").returncode == 0
    assert (tmp_path / "link.jsonl").is_symlink() and json.loads((tmp_path / "target.jsonl").read_text())["id"] == "a"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    assert generate(tmp_path, f"input={src}", f"output={fifo}").returncode == 0
    reader.join(timeout=60)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and json.loads(got[0])["id"] == "a"


def test_every_output_line_is_strict_json(tmp_path):
    """Ids come back as given, but NaN, Infinity and numbers beyond float range (which Python's
    json reads and would write back as no JSON parser reads them) are refused; a null id is no
    id; bytes that are not UTF-8 outside a string are named as such."""
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"id": 1e400, "prompt": "x", "max_tokens": 1}\n{"id": NaN, "prompt": "x", "max_tokens": 1}\n'
                    b'{"id": null, "prompt": "x", "max_tokens": 1}\n{"id": "u", "prompt": "x"}\xff\n')
    proc = generate(tmp_path, f"input={src}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in the output")) for line in
            proc.stdout.splitlines()]
    assert [r["id"] for r in rows] == ["1", "2", "3", "4"]
    assert "beyond float64" in rows[0]["error"] and "NaN is not a JSON value" in rows[1]["error"]
    assert "error" not in rows[2] and "line 4 is not UTF-8 (byte 0xff" in rows[3]["error"]


def test_models_and_settings_refused_at_start_are_one_line(tmp_path):
    """An architecture this engine does not run, a config.json transformers refuses, and too few
    device slots for adapters.preload=all: status 2 and one line naming it, not a traceback."""
    from caraserve.model.tiny import tiny_paths

    model, _ = tiny_paths()
    for name, edit in (("gpt2", {"architectures": ["GPT2LMHeadModel"]}), ("heads", {"num_attention_heads": 3})):
        folder = tmp_path / name
        folder.mkdir()
        for f in model.iterdir():
            (folder / f.name).symlink_to(f)
        cfg = json.loads((model / "config.json").read_text())
        (folder / "config.json").unlink()
        (folder / "config.json").write_text(json.dumps({**cfg, **edit}))
    for args, says in ((("model.path=gpt2", "adapters.dir=none"), "GPT2LMHeadModel"),
                       (("model.path=heads", "adapters.dir=none"), "config.json cannot be read"),
                       (("adapters.preload=all", "adapters.device_slots=1", "adapters.rank_buckets=[64]"),
                        "adapters.preload=all: not enough device slots")):
        proc = generate(tmp_path, *args)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and says in proc.stderr.splitlines()[-1], proc.stderr[-2000:]


def test_an_interrupted_job_whose_input_is_its_output_keeps_the_input(tmp_path):
    """input=output and SIGTERM mid-job: the input stays as it was (replacing it would lose the
    requests that did not run), and the results go beside it, one line per input line."""
    import signal
    import time

    src = tmp_path / "jobs.jsonl"
    text = "".join(json.dumps({"id": i, "prompt": f"line {i}", "max_tokens": 400, "ignore_eos": True}) + "\n"
                   for i in range(64))
    src.write_text(text)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "generate.py"), "progress=true",
                             "engine.compile=false", f"input={src}", f"output={src}"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, cwd=tmp_path)
    seen = b""
    while b"requests:" not in seen:  # the progress bar appears as the requests start
        chunk = proc.stderr.read1(4096)
        assert chunk, seen.decode(errors="replace")[-2000:]
        seen += chunk
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    err = (seen + proc.stderr.read()).decode(errors="replace")
    assert proc.wait(timeout=120) == 130, err[-2000:]
    assert src.read_text() == text
    rows = [json.loads(x) for x in (tmp_path / "jobs.jsonl.interrupted").read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(64))
    assert any(r.get("error") == "interrupted before it finished" for r in rows)
    assert f"input={src} is kept as it was" in err


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_results_that_cannot_be_written_are_one_line_not_a_traceback(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "x", "max_tokens": 2}) + "\n")
    proc = generate(tmp_path, f"input={src}", "output=/dev/full")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "the results could not be written to /dev/full (No space left on device); 1 requests ran" in proc.stderr
