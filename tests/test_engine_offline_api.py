"""Engine.generate and Engine.stream, the offline Python API: what they refuse, and that a caller
who stops early (or a step that raises) leaves nothing of its requests in the engine."""

from __future__ import annotations

import json

import pytest

from caraserve.config import EngineConfig
from caraserve.engine import Engine
from caraserve.offline import run_offline
from caraserve.request import SamplingParams

SP = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine():
    return Engine(EngineConfig(compile="false", max_batch_size=4, max_seq_len=128))


def assert_empty(engine, free_blocks):
    assert not engine.has_unfinished() and engine.kv.free_blocks == free_blocks
    assert engine.snapshot().running == engine.snapshot().queued == ()


def test_generate_refuses_lists_of_other_lengths(engine):
    free = engine.kv.free_blocks
    for params, adapters in (([SP, SP], None), (SP, ["demo-r8"]), ([SP] * 3, ["demo-r8"] * 2)):
        with pytest.raises(ValueError, match="3 prompts"):
            engine.generate(["a", "b", "c"], params, adapters)
    assert_empty(engine, free)


def test_closing_a_stream_early_aborts_its_request(engine):
    free = engine.kv.free_blocks
    gen = engine.stream(list(range(10, 50)), SP, "demo-r8")
    outs = [next(gen) for _ in range(3)]
    assert not outs[-1].finished and engine.has_unfinished()
    gen.close()
    assert_empty(engine, free)
    engine.unregister_adapter("demo-r8")  # no request holds it any more
    assert "demo-r8" not in {a.name for a in engine.adapters()}


def test_a_step_that_raises_aborts_the_generate_calls_requests(engine, monkeypatch):
    free, steps = engine.kv.free_blocks, []
    real_step = engine.step

    def failing_step():
        steps.append(1)
        if len(steps) == 3:
            raise RuntimeError("device lost")
        return real_step()

    monkeypatch.setattr(engine, "step", failing_step)
    with pytest.raises(RuntimeError, match="device lost"):
        engine.generate(["import os", "def f():"], SP, [None, "demo-r16"])
    assert_empty(engine, free)
    monkeypatch.undo()
    (done,) = engine.generate(["import os"], SP)  # the engine goes on serving
    assert len(done.output_ids) == 40


def test_offline_lines_take_n_and_the_completions_logprobs_form(engine):
    """A JSONL line with n > 1 gets its n completions in "choices", completion i sampled with
    seed + i (as the server makes them); logprobs: N is the completions API's form (N
    alternatives with each token)."""
    base = {"prompt": "def main():", "max_tokens": 6, "temperature": 1.0, "ignore_eos": True}
    lines = [json.dumps({"id": "n3", **base, "n": 3, "seed": 7}),
             json.dumps({"id": "lp", **base, "temperature": 0, "logprobs": 2}),
             json.dumps({"id": "bad", **base, "logprobs": 2, "top_logprobs": 3}),
             json.dumps({"id": "many", **base, "n": 17}),  # past limits.max_n (16)
             json.dumps({"id": "top", **base, "n": 2, "seed": 2**63 - 1})]  # seed + 1 wraps, as the server's
    lines += [json.dumps({"id": f"s{i}", **base, "seed": 7 + i}) for i in range(3)]
    results, summary = run_offline(engine, lines)
    by_id = {r["id"]: r for r in results}
    choices = by_id["n3"]["choices"]
    assert [c["token_ids"] for c in choices] == [by_id[f"s{i}"]["token_ids"] for i in range(3)]
    assert len({tuple(c["token_ids"]) for c in choices}) > 1
    lp = by_id["lp"]
    assert len(lp["logprobs"]) == 6 and all(len(top) == 2 for top in lp["top_logprobs"])
    assert "logprobs=2 and top_logprobs=3 disagree" in by_id["bad"]["error"]
    assert "n=17 is more than limits.max_n=16" in by_id["many"]["error"]
    assert len(by_id["top"]["choices"]) == 2
    assert summary.requests == 8 and summary.errors == 2 and summary.output_tokens == 6 * 3 + 6 + 2 * 6 + 3 * 6


@pytest.mark.parametrize("where", ["step", "wait"])
def test_an_interrupted_offline_job_keeps_what_finished(engine, monkeypatch, where):
    """Ctrl-C (or SIGTERM, which scripts/generate.py takes as one) while the requests run, in a
    step or between steps: the lines that finished keep their results, the others say they were
    interrupted, and nothing stays in the engine."""
    free = engine.kv.free_blocks
    lines = [json.dumps({"id": i, "prompt_token_ids": [5 + i, 6, 7], "max_tokens": 2 if i < 2 else 60,
                         "ignore_eos": True}) for i in range(5)]
    real_step, real_stalled, calls = engine.step, engine.scheduler.stalled, []

    def step():
        calls.append(1)
        if len(calls) == 8 and where == "step":
            raise KeyboardInterrupt
        return real_step()

    def stalled():  # what the loop asks between steps
        if len(calls) == 8 and where == "wait":
            raise KeyboardInterrupt
        return real_stalled()

    monkeypatch.setattr(engine, "step", step)
    monkeypatch.setattr(engine.scheduler, "stalled", stalled)
    results, summary = run_offline(engine, lines)
    assert summary.interrupted and summary.requests == 5
    assert [("text" in r) for r in results] == [True, True, False, False, False]
    assert all(r["error"] == "interrupted before it finished" for r in results[2:])
    assert_empty(engine, free)


def test_generate_takes_one_prompt_one_params_and_one_adapter_as_vllm_does(engine):
    short = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    (one,) = engine.generate("import os", short, "demo-r32")  # a str is one prompt, not one per character
    (ids,) = engine.generate(list(one.prompt_ids), short, "demo-r32")  # so is a list of token ids
    listed = engine.generate(["import os", "x = 1"], (short, short), "demo-r32")
    assert one.output_ids == ids.output_ids == listed[0].output_ids
    for bad, says in (({"max_tokens": 4}, "params must be a SamplingParams"), ([short, "x"], "params must be"),):
        with pytest.raises(TypeError, match=says):
            engine.generate(["a"], bad)
    with pytest.raises(TypeError, match="adapters must be"):
        engine.generate(["a"], short, 8)


def test_streams_read_together_each_get_every_output_of_their_own(engine):
    """Two streams advanced in turn (or from two threads): each step serves both, and each
    stream gets all of its tokens, whichever of them stepped."""
    import threading

    prompts, adapters = [list(range(10, 30)), list(range(40, 55))], ["demo-r32", None]
    want = [r.output_ids for r in engine.generate(prompts, SP, adapters)]
    a, b = (engine.stream(p, SP, ad) for p, ad in zip(prompts, adapters))
    got = {0: [], 1: []}
    live = {0: a, 1: b}
    for _ in range(200):  # (bounded: a stream that lost its last output would wait for it forever)
        if not live:
            break
        for i, gen in list(live.items()):
            out = next(gen)
            got[i] += out.new_token_ids
            if out.finished:
                del live[i]
    assert [got[0], got[1]] == want

    threaded = {}

    def consume(i):
        threaded[i] = [t for out in engine.stream(prompts[i], SP, adapters[i]) for t in out.new_token_ids]

    threads = [threading.Thread(target=consume, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and [threaded[0], threaded[1]] == want
    assert not engine.outputs.watched and not engine.has_unfinished()


def test_aborting_a_final_only_request_gives_its_tokens_and_their_text(engine):
    rid = engine.add_request("import os", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True),
                             final_only=True)
    for _ in range(6):
        engine.step()
    out = engine.abort(rid)
    assert out.finished and len(out.output_ids) >= 4 and out.new_token_ids == out.output_ids
    assert out.text and out.text == engine.tokenizer.decode(out.output_ids, skip_special_tokens=True)


def test_closing_an_engine_ends_its_worker_threads():
    """`with Engine(...)` ends the CPU-assist lanes and the adapter-read threads it started."""
    import threading

    from caraserve.config import AdapterConfig, CpuAssistConfig

    def workers():
        return {t for t in threading.enumerate() if t.name.startswith(("caraserve-cpu-lora", "adapter-io"))}

    before = workers()
    assist = CpuAssistConfig(mode="on", emulate_copy_gbps=0.01, threads=1)  # a slow copy: the CPU path runs
    with Engine(EngineConfig(compile="false", max_batch_size=2, max_seq_len=64, cpu_assist=assist,
                             adapters=AdapterConfig(dir="demo", preload="none", device_slots=1))) as e:
        out = e.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0), adapters=["demo-r8"])[0]
        assert out.error is None and len(out.output_ids) == 3
        started = workers() - before
        assert any(t.name.startswith("caraserve-cpu-lora") for t in started)
        assert any(t.name.startswith("adapter-io") for t in started)
    for t in started:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in started)
    for adapter in ("demo-r8", None):  # it takes no more requests, with or without an adapter
        with pytest.raises(RuntimeError, match="the engine is closed"):
            e.generate([[5, 6, 7]], SamplingParams(max_tokens=3), adapters=[adapter])


def test_a_second_ctrl_c_while_the_job_ends_keeps_what_finished(engine, monkeypatch):
    """Ctrl-C pressed twice: the second lands while the unfinished requests are being aborted;
    the finished lines keep their results all the same, and nothing stays in the engine."""
    free = engine.kv.free_blocks
    lines = [json.dumps({"id": i, "prompt_token_ids": [5 + i, 6, 7], "max_tokens": 2 if i < 2 else 60,
                         "ignore_eos": True}) for i in range(5)]
    real_step, real_abort, calls, aborts = engine.step, engine.abort, [], []

    def step():
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return real_step()

    def abort(rid):
        aborts.append(rid)
        if len(aborts) == 2:
            raise KeyboardInterrupt  # the second Ctrl-C
        return real_abort(rid)

    monkeypatch.setattr(engine, "step", step)
    monkeypatch.setattr(engine, "abort", abort)
    results, summary = run_offline(engine, lines)
    assert summary.interrupted and [("text" in r) for r in results] == [True, True, False, False, False]
    assert all(r["error"] == "interrupted before it finished" for r in results[2:])
    assert_empty(engine, free)


def test_an_id_strict_json_cannot_carry_is_refused_and_the_line_named_by_its_number(engine):
    """An id holding a lone surrogate ("\\udc80", as a JSON escape) would make its output line
    one that strict JSON parsers refuse: the line fails alone, under its line number."""
    lines = ['{"id": "\\udc80", "prompt": "x", "max_tokens": 2}',
             '{"id": ["ok", "\\u00e9"], "prompt": "x", "max_tokens": 2}']
    results, _ = run_offline(engine, lines)
    assert results[0]["id"] == "1" and "'id' holds a lone surrogate" in results[0]["error"]
    assert results[1]["id"] == ["ok", "\u00e9"] and "error" not in results[1]
    for r in results:
        json.dumps(r, ensure_ascii=False).encode("utf-8")
