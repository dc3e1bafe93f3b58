"""OpenAI's batch file format offline (`scripts/generate.py format=openai`, as `vllm run-batch`):
every line is answered as the server answers the same call, in input order, and no line is
lost to the queue limit or to an interrupt."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from caraserve.config import EngineConfig, ServerConfig
from caraserve.engine import Engine
from caraserve.serve.api import build_app
from caraserve.serve.async_engine import AsyncEngine
from caraserve.serve.openai_batch import is_batch_file, run_openai_batch

ROOT = Path(__file__).resolve().parents[1]
CHAT = {"model": "demo-r16", "messages": [{"role": "system", "content": "be brief"},
                                          {"role": "user", "content": "hello there"}],
        "max_tokens": 6, "temperature": 0, "ignore_eos": True}
COMPLETION = {"model": "demo-r8", "prompt": "def main():", "max_tokens": 6, "temperature": 0, "ignore_eos": True,
              "logprobs": 2}


def _line(custom_id, url, body, method="POST") -> str:
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})


@pytest.fixture(scope="module")
def engine():
    with Engine(EngineConfig(compile="false", max_batch_size=8, max_seq_len=256)) as e:
        yield e


def _server_answers(engine, calls: list[tuple[str, dict]]) -> list[httpx.Response]:
    service = AsyncEngine(engine, 8)
    app = build_app(service, ServerConfig(), "tiny", [])
    service.start()

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return [await c.post(url, json=body) for url, body in calls]

    try:
        return asyncio.run(go())
    finally:
        service.stop()


def _same_answer(batch_body: dict, server_body: dict) -> None:
    for body in (batch_body, server_body):
        for key in ("id", "created"):
            body.pop(key)
        body["usage"].pop("prompt_tokens_details")  # (the second run reads the first's prefix blocks)
    assert batch_body == server_body


def test_each_line_is_answered_as_the_server_answers_its_call(engine):
    lines = [_line("chat", "/v1/chat/completions", CHAT), "",
             _line("text", "/v1/completions", COMPLETION),
             _line("missing", "/v1/completions", {**COMPLETION, "model": "nope"}),
             _line("bad-body", "/v1/completions", {**COMPLETION, "temperature": -1}),
             _line("get", "/v1/completions", COMPLETION, method="GET"),
             _line("embed", "/v1/embeddings", {"input": "x"}),
             _line("streamed", "/v1/completions", {**COMPLETION, "stream": True}),
             json.dumps({"custom_id": "extra", "method": "POST", "url": "/v1/completions", "body": {}, "x": 1}),
             "{not json", "[1, 2]"]
    results, summary = run_openai_batch(engine, ServerConfig(), lines)
    assert [r["custom_id"] for r in results] == ["chat", "text", "missing", "bad-body", "get", "embed", "streamed",
                                                 "extra", None, None]
    assert len({r["id"] for r in results}) == len(results) and all(r["id"].startswith("batch_req_") for r in results)
    assert summary.requests == 10 and summary.blank_lines == 1 and summary.errors == 8
    assert summary.output_tokens == 12 and not summary.interrupted
    chat, text, missing, bad = (r["response"] for r in results[:4])
    assert all(r["error"] is None for r in results[:4])
    server = _server_answers(engine, [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION),
                                      ("/v1/completions", {**COMPLETION, "model": "nope"}),
                                      ("/v1/completions", {**COMPLETION, "temperature": -1})])
    for mine, theirs in zip((chat, text, missing, bad), server):
        assert mine["status_code"] == theirs.status_code
        assert mine["request_id"].startswith("batch-")
        if theirs.status_code == 200:
            assert mine["body"]["id"] == mine["request_id"]
            _same_answer(mine["body"], theirs.json())
        else:
            assert mine["body"] == theirs.json()
    assert chat["body"]["object"] == "chat.completion" and chat["body"]["model"] == "demo-r16"
    assert missing["status_code"] == 404 and bad["status_code"] == 400
    refused = {r["custom_id"]: r for r in results[4:]}
    assert all(r["response"] is None and r["error"]["code"] == "invalid_request" for r in refused.values())
    assert "line 6: 'method' must be \"POST\", got 'GET'" == refused["get"]["error"]["message"]
    assert "'url' must be one of" in refused["embed"]["error"]["message"]
    assert "'body.stream' must be false" in refused["streamed"]["error"]["message"]
    assert "unknown field(s) ['x']" in refused["extra"]["error"]["message"]
    assert "line 10 is not valid JSON" in results[8]["error"]["message"]
    assert "line 11: must be a JSON object" == results[9]["error"]["message"]


def test_more_calls_than_the_queue_takes_wait_their_turn(engine):
    """max_queue=2 against 7 calls, one of them n=3: each waits for room instead of a 503."""
    lines = [_line(f"c{i}", "/v1/completions", {**COMPLETION, "prompt": f"item {i}", "logprobs": None})
             for i in range(6)]
    lines.append(_line("n3", "/v1/chat/completions", {**CHAT, "n": 3, "temperature": 1, "seed": 7}))
    results, summary = run_openai_batch(engine, ServerConfig(max_queue=2), lines)
    assert [r["response"]["status_code"] for r in results] == [200] * 7, results
    assert summary.errors == 0 and summary.output_tokens == 6 * 6 + 3 * 6
    assert len(results[-1]["response"]["body"]["choices"]) == 3


def test_batch_files_are_told_by_their_first_line():
    assert is_batch_file(["", _line("a", "/v1/completions", {}), '{"prompt": "x"}'])
    assert not is_batch_file(['{"prompt": "x"}', _line("a", "/v1/completions", {})])
    assert is_batch_file(["{broken", "[1]", _line("a", "/v1/completions", {})])  # a bad first line fails alone
    assert not is_batch_file(["{broken", '{"prompt": "x"}', _line("a", "/v1/completions", {})])
    assert not is_batch_file([])


def _generate(tmp_path: Path, *args: str, **popen) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen([sys.executable, str(ROOT / "scripts" / "generate.py"), "engine.compile=false", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path, **popen)


@pytest.mark.slow
def test_generate_script_takes_batch_files_and_refuses_bad_settings(tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(_line("chat", "/v1/chat/completions", CHAT) + "\n" + _line("text", "/v1/completions",
                                                                               COMPLETION) + "\n")
    proc = _generate(tmp_path, f"input={src}", f"output={dst}", "progress=false")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    rows = [json.loads(x) for x in dst.read_text().splitlines()]
    assert [(r["custom_id"], r["response"]["status_code"]) for r in rows] == [("chat", 200), ("text", 200)]
    assert "2 requests (0 errors), 12 tokens" in err and "HTTP Request" not in err
    for args, says in ((("format=openai",), "format=openai needs input="),
                       ((f"input={src}", "format=json"), "format='json' must be one of auto|caraserve|openai"),
                       ((f"input={src}", "server.port=1"), "server.port"),
                       ((f"input={src}", "server=5"), "server=5 must be a mapping")):
        proc = _generate(tmp_path, *args)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode != 0 and says in err, err[-2000:]
    # format=caraserve reads the same file as CaraServe's own lines: each is refused alone
    proc = _generate(tmp_path, f"input={src}", f"output={dst}", "format=caraserve", "progress=false")
    proc.communicate(timeout=300)
    assert all("unknown field(s)" in json.loads(x)["error"] for x in dst.read_text().splitlines())


def test_an_interrupted_batch_job_writes_what_finished(tmp_path):
    """SIGTERM while a long call runs: the finished lines are written, the others say so, and
    the exit status is 130."""
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    quick = _line("quick", "/v1/completions", {**COMPLETION, "max_tokens": 1})
    slow = _line("slow", "/v1/completions", {**COMPLETION, "max_tokens": 200, "logprobs": None})
    src.write_text("\n".join([quick] + [slow] * 8) + "\n")
    proc = _generate(tmp_path, f"input={src}", f"output={dst}", "server.max_queue=1", "engine.max_seq_len=256")
    for line in proc.stderr:  # tqdm's bar: the quick line is done once it shows a line done
        if re.search(r" [1-8]/9 ", line) or line.startswith("error"):
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    rows = [json.loads(x) for x in dst.read_text().splitlines()]
    assert rows[0]["custom_id"] == "quick" and rows[0]["response"]["status_code"] == 200
    assert any(r["error"] == {"code": "interrupted", "message": "interrupted before it finished"} for r in rows[1:])
    assert len(rows) == 9
