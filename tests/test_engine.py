"""The engine end to end on the embedded tiny model against transformers + peft."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from caraserve.config import AdapterConfig, EngineConfig, ModelConfig
from caraserve.engine import Engine
from caraserve.model.tiny import tiny_paths, write_random_adapter
from caraserve.request import FinishReason, RequestError, SamplingParams
from caraserve.state import EngineState

ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = 12
EXTRA = {"extra-r4": (4, 8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
         "extra-r24": (24, 12, ["v_proj", "down_proj"])}
PROMPTS = ["def fibonacci(n):", "import os", "class Server(object):\n    def", "x = 1", "for i in range(",
           "return self", "while True:", "print('hello world')", "try:\n    pass\nexcept"]


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    """The tiny model and a folder with the 4 demo adapters plus 2 more (6 adapters, ranks 4-64)."""
    model_dir, demo_dir = tiny_paths()
    adapters = tmp_path_factory.mktemp("adapters")
    for d in demo_dir.iterdir():
        os.symlink(d, adapters / d.name)
    for i, (name, (r, alpha, targets)) in enumerate(EXTRA.items()):
        write_random_adapter(adapters / name, r, alpha, targets, seed=500 + i)
    names = sorted(p.name for p in adapters.iterdir())
    return model_dir, adapters, names


@pytest.fixture(scope="module")
def workload(catalogue):
    model_dir, _, names = catalogue
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    items = []
    for i, p in enumerate(PROMPTS * 2):
        adapter = None if i % 4 == 3 else names[i % len(names)]
        items.append((tok(p)["input_ids"], adapter))
    return items


@pytest.fixture(scope="module")
def reference(catalogue, workload):
    """Greedy tokens of transformers (+ peft) for each request alone."""
    from helpers import peft_greedy, peft_reference

    model_dir, adapters, names = catalogue
    return peft_greedy(peft_reference(model_dir, {n: adapters / n for n in names}), workload, NEW_TOKENS)


def make_engine(catalogue, **engine_kw) -> Engine:
    model_dir, adapters, _ = catalogue
    slots = engine_kw.pop("device_slots", 4)
    engine_kw.setdefault("compile", "false")
    # preload=host: admission never waits for a first disk read, so each step admits what it can
    return Engine(EngineConfig(model=ModelConfig(path=str(model_dir)),
                               adapters=AdapterConfig(dir=str(adapters), device_slots=slots, preload="host"),
                               **engine_kw))


GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)


# (max_batch_size, device_slots, KV blocks of 4 tokens or 0 for the default cache): the last case
# holds ~3 of the 18 requests (15-24 tokens each), so requests are preempted and recomputed
@pytest.mark.parametrize("max_batch_size,device_slots,kv_blocks", [(32, 4, 0), (1, 4, 0), (32, 1, 0), (32, 4, 16)])
def test_greedy_matches_transformers_peft(catalogue, workload, reference, max_batch_size, device_slots, kv_blocks):
    kv = dict(kv_block_size=4, num_kv_blocks=kv_blocks) if kv_blocks else {}
    engine = make_engine(catalogue, max_batch_size=max_batch_size, device_slots=device_slots, **kv)
    reqs = engine.generate([ids for ids, _ in workload], GREEDY, [a for _, a in workload])
    for (_, adapter), req, ref in zip(workload, reqs, reference):
        assert req.output_ids == ref, f"adapter {adapter}"
        assert req.finish_reason is FinishReason.LENGTH
    if device_slots == 1:
        assert engine.pool.evictions > 0  # adapters had to take turns in the slots
        assert engine.pool.spills > 0  # and took larger buckets' slots, zero-padded, while theirs were held
    if kv_blocks:
        assert engine.scheduler.num_preemptions > 0 and any(r.preemptions for r in reqs)
    assert engine.kv.free_blocks == engine.kv.num_blocks


def test_compiled_steps_with_preemption_match_transformers_peft(catalogue, workload, reference, tmp_path):
    """engine.compile=true (the model's forward compiled for decode steps) with a KV cache small
    enough that requests are preempted and recomputed: the tokens of transformers + peft."""
    engine = make_engine(catalogue, compile="true", compile_cache_dir=str(tmp_path), kv_block_size=4,
                         num_kv_blocks=16)
    reqs = engine.generate([ids for ids, _ in workload], GREEDY, [a for _, a in workload])
    assert [r.output_ids for r in reqs] == reference
    assert engine.graphs.compile_s > 0 and engine.scheduler.num_preemptions > 0


def test_adapters_change_the_output(reference, workload):
    by_prompt = {}
    for (ids, _), ref in zip(workload, reference):
        by_prompt.setdefault(tuple(ids), set()).add(tuple(ref))
    assert any(len(v) > 1 for v in by_prompt.values())


def test_generate_script_matches_reference(catalogue, workload, reference, tmp_path):
    model_dir, adapters, _ = catalogue
    lines = [json.dumps({"id": f"r{i}", "prompt_token_ids": ids, "adapter": a, "max_tokens": NEW_TOKENS,
                         "temperature": 0, "ignore_eos": True}) for i, (ids, a) in enumerate(workload)]
    lines.insert(3, "{not json")
    lines.insert(5, json.dumps({"id": "bad-adapter", "prompt": "x", "adapter": "nope"}))
    lines.insert(7, json.dumps({"id": "bad-param", "prompt": "x", "temperature": -1}))
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(lines) + "\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate.py"), f"input={src}", f"output={dst}",
         f"model.path={model_dir}", f"adapters.dir={adapters}", "adapters.device_slots=2", "progress=false",
         "engine.compile=false"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(x) for x in dst.read_text().splitlines()]
    assert len(rows) == len(lines)
    assert rows[3] == {"id": "4", "error": rows[3]["error"]} and "line 4 is not valid JSON" in rows[3]["error"]
    assert rows[5] == {"id": "bad-adapter", "error": "line 6: unknown adapter 'nope'"}
    assert "temperature" in rows[7]["error"]
    good = [r for r in rows if "error" not in r]
    assert [r["id"] for r in good] == [f"r{i}" for i in range(len(workload))]
    assert [r["token_ids"] for r in good] == reference
    assert all(r["finish_reason"] == "length" for r in good)
    assert not (tmp_path / "outputs").exists()


def test_seeded_sampling_is_reproducible(catalogue):
    engine = make_engine(catalogue)
    sp = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    a = engine.generate(["import os"] * 3, sp, [None, "demo-r8", "demo-r8"])
    b = engine.generate(["import os"], sp, ["demo-r8"])
    assert a[1].output_ids == a[2].output_ids == b[0].output_ids
    other = engine.generate(["import os"], SamplingParams(max_tokens=16, seed=99, ignore_eos=True), ["demo-r8"])
    assert other[0].output_ids != b[0].output_ids


def test_generate_refusing_a_prompt_leaves_nothing_queued(catalogue):
    """A refused prompt raises before any prompt runs, and those added before it are gone: the
    next call gets its own outputs, with nothing of the refused call's in the engine."""
    engine = make_engine(catalogue)
    sp = SamplingParams(max_tokens=4, temperature=0)
    with pytest.raises(RequestError, match="not-an-adapter"):
        engine.generate(["import os", "def f():", "x = 1"], sp, [None, "demo-r8", "not-an-adapter"])
    assert not engine.has_unfinished() and engine.kv.used_blocks == 0
    (again,) = engine.generate(["import os"], sp)
    assert again.finished and len(again.output_ids) == 4


def test_abort_frees_slots(catalogue):
    engine = make_engine(catalogue, max_batch_size=2)
    rid = engine.add_request("import os", SamplingParams(max_tokens=50, ignore_eos=True), "demo-r16")
    engine.step()
    engine.step()
    held = engine.kv.used_blocks
    assert held >= 1 and engine.pool._where["demo-r16"].refs == 1
    assert engine.abort(rid)
    assert engine.kv.used_blocks == 0 and engine.pool._where["demo-r16"].refs == 0
    assert not engine.abort(rid) and not engine.has_unfinished()


def test_snapshot_reports_queue_ranks_and_remaining_tokens(catalogue):
    engine = make_engine(catalogue, max_batch_size=1)
    a = engine.add_request("import os", SamplingParams(max_tokens=10, ignore_eos=True), "demo-r32", "a")
    engine.add_request("x = 1", SamplingParams(max_tokens=7, ignore_eos=True), None, "b")
    engine.step()  # prefill of a (batch size 1: b waits), first token
    engine.step()  # a decodes its second token
    state = engine.snapshot()
    assert state.max_batch_size == 1 and state.adapters["demo-r32"] == 32 and state.perf_model is None
    assert [(v.request_id, v.adapter, v.rank, v.remaining_tokens) for v in state.running] == [(a, "demo-r32", 32, 8)]
    assert [(v.request_id, v.rank, v.remaining_tokens) for v in state.queued] == [("b", 0, 7)]
    assert state.queued[0].prompt_tokens == len(engine.encode("x = 1"))
    assert "demo-r32" in state.resident_adapters
    wire = json.loads(json.dumps(state.to_dict()))  # plain JSON for /v1/state and Ray's routing stats
    assert EngineState.from_dict(wire) == state


def test_bad_requests_change_nothing(catalogue):
    engine = make_engine(catalogue, max_seq_len=64)
    with pytest.raises(RequestError, match="unknown adapter"):
        engine.add_request("x", adapter="missing")
    with pytest.raises(RequestError, match="exceeds the context length 64"):
        engine.add_request("x", SamplingParams(max_tokens=100))
    with pytest.raises(RequestError, match="empty"):
        engine.add_request([])
    with pytest.raises(RequestError, match="token ids"):
        engine.add_request([10**9])
    with pytest.raises(RequestError, match="top_p"):
        SamplingParams(top_p=0)
    assert not engine.has_unfinished() and engine.kv.free_blocks == engine.kv.num_blocks


def test_long_prompt_is_prefilled_in_chunks(catalogue):
    engine = make_engine(catalogue, max_tokens_per_step=16, max_batch_size=8)
    whole = make_engine(catalogue)
    prompt = list(range(10, 80))
    a = engine.generate([prompt], GREEDY, ["demo-r32"])[0]
    b = whole.generate([prompt], GREEDY, ["demo-r32"])[0]
    assert a.output_ids == b.output_ids


def test_slo_admission_limits_the_batch_and_refits_online(catalogue, tmp_path):
    import json as _json

    from caraserve.config import SchedulerConfig
    from caraserve.perf.model import PerfModel

    # 1 request: 20 ms per step, 2 requests: 30 ms; a 0.3 ms SLO stays below every real step here too
    # (the model refits online toward this machine's ~1-10 ms steps), so one request runs at a time
    model = PerfModel.linear(decode_base_ms=10.0, decode_per_request_ms=10.0, decode_per_rank_request_ms=0.0)
    path = tmp_path / "latency.json"
    path.write_text(_json.dumps({"model": model.to_dict()}))
    engine = make_engine(catalogue, scheduler=SchedulerConfig(slo_ms=0.3, perf_model=str(path)))
    ids = [engine.add_request("import os", GREEDY, a) for a in ("demo-r8", None, "demo-r64")]
    most = 0
    while engine.has_unfinished():
        engine.step()
        most = max(most, len(engine.scheduler.running))
    assert most == 1 and all(engine.request(i) is None for i in ids)
    assert engine.perf_model.decode_s(1, 8, 8) != pytest.approx(0.020, rel=1e-6)  # moved toward measured steps
    free = make_engine(catalogue)
    want = [r.output_ids for r in free.generate(["import os"] * 3, GREEDY, ["demo-r8", None, "demo-r64"])]
    again = make_engine(catalogue, scheduler=SchedulerConfig(slo_ms=0.3, perf_model=str(path)))
    assert [r.output_ids for r in again.generate(["import os"] * 3, GREEDY, ["demo-r8", None, "demo-r64"])] == want


def _admitted(engine, ids) -> list[str]:
    return [i for i in ids if engine.request(i) is not None and engine.request(i) in engine.scheduler.running]


def test_rank_grouping_keeps_the_bucket_and_does_not_starve(catalogue):
    from caraserve.config import SchedulerConfig

    long = SamplingParams(max_tokens=40, ignore_eos=True)
    short = SamplingParams(max_tokens=2, ignore_eos=True)
    for grouping, first_in in ((True, "c"), (False, "b")):
        engine = make_engine(catalogue, max_batch_size=2,
                             scheduler=SchedulerConfig(rank_grouping=grouping, max_passed_over=1))
        engine.add_request("import os", short, "demo-r8", "a")
        engine.step()  # a alone: the batch has room for one more
        engine.add_request("x = 1", long, "demo-r64", "b")  # older, a new (larger) bucket
        engine.add_request("x = 2", long, "demo-r8", "c")  # younger, a's bucket
        engine.add_request("x = 3", long, "demo-r8", "d")
        engine.step()
        assert _admitted(engine, "bcd") == [first_in]
        if grouping:  # b was overtaken once (max_passed_over=1): when a leaves, b goes before d
            while engine.request("a") is not None:
                engine.step()
            engine.step()
            assert _admitted(engine, "bcd") == ["b", "c"]
    # a base-model request adds no rank to the batch: it goes ahead of a larger bucket too
    engine = make_engine(catalogue, max_batch_size=2, scheduler=SchedulerConfig(rank_grouping=True, max_passed_over=1))
    engine.add_request("import os", short, "demo-r8", "a")
    engine.step()
    engine.add_request("x = 1", long, "demo-r64", "b")
    engine.add_request("x = 2", long, None, "c")
    engine.step()
    assert _admitted(engine, "bc") == ["c"]


def test_rank_grouping_lets_requests_that_fit_the_slo_go_ahead(catalogue, tmp_path):
    from caraserve.config import SchedulerConfig
    from caraserve.perf.model import PerfModel

    # 2 requests at rank 8: 10 + 2*8*0.1 = 11.6 ms; with a rank-64 one: 10 + 2*64*0.1 = 22.8 ms
    model = PerfModel.linear(decode_base_ms=10.0, decode_per_request_ms=0.0, decode_per_rank_request_ms=0.1)
    path = tmp_path / "latency.json"
    path.write_text(json.dumps({"model": model.to_dict()}))
    runs = {}
    for grouping in (True, False):
        engine = make_engine(catalogue, max_batch_size=4, scheduler=SchedulerConfig(
            slo_ms=15.0, perf_model=str(path), rank_grouping=grouping, max_passed_over=3))
        engine.add_request("import os", GREEDY, "demo-r8", "a")
        engine.step()  # prefill only: the model is not refit before the admission below
        engine.add_request("x = 1", GREEDY, "demo-r64", "b")
        engine.add_request("x = 2", GREEDY, "demo-r8", "c")
        engine.step()
        runs[grouping] = _admitted(engine, "bc")
    assert runs == {True: ["c"], False: []}  # strict FCFS: c waits behind b although it fits


def test_incremental_detokenization_holds_split_characters(catalogue):
    from caraserve.request import Request

    engine = make_engine(catalogue)
    text = "naïve café → ✓ 東京 done"
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    singles = [engine.tokenizer.decode([t]) for t in ids]
    assert any("\ufffd" in s for s in singles)  # some token ends inside a character
    reqs = [Request("a", [1], SamplingParams(max_tokens=len(ids), ignore_eos=True)),
            Request("b", [1], SamplingParams(max_tokens=len(ids) + 5, ignore_eos=True))]
    pieces = {"a": [], "b": []}
    for t in ids:  # both requests of the step decoded in one batched call
        for r in reqs:
            r.output_ids.append(t)
        for r, piece in zip(reqs, engine.outputs.detokenize(reqs)):
            pieces[r.request_id].append(piece)
    for r in reqs:
        assert all("\ufffd" not in p for p in pieces[r.request_id])
        assert "".join(pieces[r.request_id]) == r.text
    assert reqs[0].text == engine.tokenizer.decode(ids)  # a ends with its last token: nothing held back
    # the step's batched decoder (the tokenizer's Rust one) equals transformers' batch_decode
    tok = engine.tokenizer
    windows = [[tok.bos_token_id] + ids[:5] + [tok.eos_token_id], ids[3:], []]
    assert engine.outputs._decode_batch(windows, [True] * 3) == tok.batch_decode(windows, skip_special_tokens=True)
    assert engine.outputs._decode_batch(windows, [False] * 3) == tok.batch_decode(windows, skip_special_tokens=False)


def test_final_only_requests_end_with_the_streamed_tokens_and_text(catalogue):
    """Offline generation (generate, scripts/generate.py) takes each request's output once, when
    it ends: step returns none before, and the one it returns carries every token and the whole
    text, as a streamed request of the same prompt gets them token by token; its text is decoded
    once at the end, never per step."""
    engine = make_engine(catalogue)
    sp = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True)
    prompts = ["def main():", "naïve café → ✓ 東京"]
    streamed = {engine.add_request(p, sp, "demo-r16"): [] for p in prompts}
    final = {engine.add_request(p, sp, "demo-r16", final_only=True): [] for p in prompts}
    detokenized, real = [], engine.outputs.detokenize
    engine.outputs.detokenize = lambda reqs: detokenized.extend(r.request_id for r in reqs) or real(reqs)
    while engine.has_unfinished():
        for out in engine.step():
            (streamed if out.request_id in streamed else final)[out.request_id].append(out)
    for s_outs, f_outs in zip(streamed.values(), final.values()):
        assert len(s_outs) == 14 and len(f_outs) == 1
        last, only = s_outs[-1], f_outs[0]
        assert only.finished and only.finish_reason is last.finish_reason is FinishReason.LENGTH
        assert only.output_ids == only.new_token_ids == last.output_ids
        assert only.text == only.new_text == last.text == "".join(o.new_text for o in s_outs) != ""
    assert detokenized and set(detokenized) <= set(streamed)
