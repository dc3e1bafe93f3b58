"""A fault in one request's part of a step fails that request only; the engine's own faults end
every request and say so. Validation refuses what the step could not take."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from caraserve.config import AdapterConfig, EngineConfig, LimitsConfig
from caraserve.engine import Engine
from caraserve.model.tiny import write_random_adapter
from caraserve.offline import run_offline
from caraserve.request import ErrorCause, FinishReason, RequestError, SamplingParams
from caraserve.step_isolation import EngineDeadError

MARK = 7777  # a token id no clean prompt below holds: the planted forward fault keys on it
PROMPTS = [[1, 100, 200, 300], [1, 55, 66], [1, 400, 401, 402, 403], [1, 9, 8, 7, 6, 5]]
ADAPTERS = [None, "demo-r8", "demo-r64", "demo-r16"]


@pytest.fixture(scope="module")
def engine():
    return Engine(EngineConfig(compile="false", max_batch_size=8, max_seq_len=256,
                               limits=LimitsConfig(max_prompt_bytes=4096, max_stop_strings=4, max_stop_chars=64,
                                                   max_stop_token_ids=8)))


def clean_params():
    """Greedy rows and one seeded sampled row: the sampled one shows generator states survive."""
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    return [greedy, greedy, SamplingParams(max_tokens=10, temperature=0.8, seed=7, ignore_eos=True), greedy]


def run(engine, extra=None):
    """Tokens of the clean requests, run together with `extra` (prompt, params, adapter) if given;
    and the extra request's final state."""
    rids = [engine.add_request(p, sp, a) for p, sp, a in zip(PROMPTS, clean_params(), ADAPTERS)]
    planted = engine.add_request(*extra) if extra is not None else None
    reqs = {rid: engine.request(rid) for rid in rids + ([planted] if planted else [])}
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    return [finals[r].output_ids for r in rids], (finals[planted] if planted else None), reqs


class FaultyModel:
    """The engine's model, except that a forward whose input holds MARK raises, and so does a
    decode step of a sequence reaching `at_context` tokens (always=True: every forward raises, as
    a broken device would)."""

    def __init__(self, model, always=False, at_context=None):
        self.model, self.always, self.at_context = model, always, at_context

    def __call__(self, fb, kv, *args, **kwargs):
        late = fb.is_decode and self.at_context in fb.context_lens
        if self.always or late or bool((fb.input_ids == MARK).any()):
            raise RuntimeError("planted fault")
        return self.model(fb, kv, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def test_sampler_fault_fails_only_its_request(engine):
    clean, _, _ = run(engine)
    bad = SamplingParams(max_tokens=10, temperature=0.5, ignore_eos=True)
    object.__setattr__(bad, "temperature", math.nan)  # past validation: the sampler raises on it
    tokens, planted, _ = run(engine, ([1, 300, 301], bad, "demo-r32"))
    assert tokens == clean
    assert planted.finish_reason is FinishReason.ERROR and planted.error_cause is ErrorCause.REQUEST
    assert "sampling failed" in planted.error and engine.request(planted.request_id) is None


def test_forward_fault_fails_only_its_request(engine, monkeypatch):
    clean, _, _ = run(engine)
    monkeypatch.setattr(engine.runner, "model", FaultyModel(engine.runner.model))
    tokens, planted, _ = run(engine, ([1, MARK, 5], SamplingParams(max_tokens=10, temperature=0), "demo-r8"))
    assert tokens == clean
    assert planted.error_cause is ErrorCause.REQUEST and "planted fault" in planted.error
    assert engine.kv.free_blocks == engine.kv.num_blocks  # its KV blocks came back


def nan_adapter(folder: Path) -> Path:
    """A demo-shaped adapter whose weights hold a NaN: its header is fine, its values are not."""
    from safetensors.torch import load_file, save_file

    write_random_adapter(folder, 8, 16, ["q_proj", "v_proj"], seed=3)
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    next(iter(tensors.values()))[0, 0] = math.nan
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return folder


def test_adapter_refused_on_first_read_fails_only_its_request(engine, tmp_path):
    """Registration reads the header only; the NaN shows on the first read, which fails that
    request alone (ErrorCause.ADAPTER: a 400 at the API) and then refuses the adapter at once."""
    clean, _, _ = run(engine)
    engine.store.register("nan-r8", nan_adapter(tmp_path / "nan-r8"), confined=False)  # outside the roots
    try:
        tokens, planted, _ = run(engine, ([1, 2, 3], SamplingParams(max_tokens=4, temperature=0), "nan-r8"))
        assert tokens == clean
        assert planted.error_cause is ErrorCause.ADAPTER and "NaN" in planted.error
        with pytest.raises(RequestError, match="nan-r8.*cannot be used.*NaN"):
            engine.add_request([1, 2], SamplingParams(max_tokens=2), "nan-r8")
    finally:
        engine.unregister_adapter("nan-r8")


def overflowing_adapter(folder: Path) -> Path:
    """A demo-shaped adapter of finite weights so large that the model's logits overflow to NaN."""
    from safetensors.torch import load_file, save_file

    write_random_adapter(folder, 8, 16, ["q_proj", "v_proj", "o_proj"], seed=4)
    weights = folder / "adapter_model.safetensors"
    save_file({k: v * 1e18 for k, v in load_file(str(weights)).items()}, str(weights), metadata={"format": "pt"})
    return folder


def test_nonfinite_logits_fail_only_their_requests(engine, tmp_path):
    """Logits that overflow (NaN or infinite) give no token: those requests fail with a message
    naming their adapter (ErrorCause.ADAPTER: a 400 at the API, the caller's choice), even when
    they are every row of a step (not the engine's fault), and the others get the tokens they
    get alone, the seeded sampled row included."""
    clean, _, _ = run(engine)
    engine.store.register("huge-r8", overflowing_adapter(tmp_path / "huge-r8"), confined=False)
    try:
        for params in (SamplingParams(max_tokens=4, temperature=0), SamplingParams(max_tokens=4, seed=1)):
            tokens, planted, _ = run(engine, ([1, 2, 3], params, "huge-r8"))
            assert tokens == clean
            assert planted.finish_reason is FinishReason.ERROR and planted.error_cause is ErrorCause.ADAPTER
            assert "adapter 'huge-r8'" in planted.error and "NaN or infinite" in planted.error
            assert not planted.output_ids
        alone = [engine.add_request([1, 5 + i], SamplingParams(max_tokens=3), "huge-r8") for i in range(3)]
        finals = [out for _ in range(8) for out in engine.step() if out.finished]
        assert sorted(out.request_id for out in finals) == sorted(alone)
        assert all("NaN or infinite" in out.error for out in finals)
        assert run(engine)[0] == clean  # the engine still serves
    finally:
        engine.unregister_adapter("huge-r8")


def test_an_io_error_on_first_read_fails_that_request_and_the_next_one_reads_again(engine, tmp_path, monkeypatch):
    """A read that fails for a reason that may pass (EIO) fails the request waiting on it as this
    machine's fault (ErrorCause.ENGINE: a 500 a router retries on another replica), does not mark
    the adapter broken, and the next request reads again."""
    import errno

    from helpers import failing_weight_reads

    from caraserve.model.tiny import write_random_adapter

    clean, _, _ = run(engine)
    write_random_adapter(tmp_path / "eio-r8", 8, 16, ["q_proj"], seed=3)
    engine.store.register("eio-r8", tmp_path / "eio-r8", confined=False)
    failing_weight_reads(monkeypatch, OSError(errno.EIO, "Input/output error"))
    try:
        tokens, planted, _ = run(engine, ([1, 2, 3], SamplingParams(max_tokens=4, temperature=0), "eio-r8"))
        assert tokens == clean
        assert planted.error_cause is ErrorCause.ENGINE and "could not be read" in planted.error
        assert engine.store.broken("eio-r8") is None
        again = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0), adapters=["eio-r8"])[0]
        assert again.error is None and len(again.output_ids) == 4
    finally:
        engine.unregister_adapter("eio-r8")


def test_resolver_registers_on_first_use_and_confines(tmp_path):
    tenants = tmp_path / "tenants"
    write_random_adapter(tenants / "tenant-7", 8, 16, ["q_proj"], seed=4)
    write_random_adapter(tmp_path / "outside" / "x", 8, 16, ["q_proj"], seed=5)
    (tenants / "escape").symlink_to(tmp_path / "outside" / "x")  # a folder leaving the roots
    engine = Engine(EngineConfig(compile="false", max_batch_size=2, max_seq_len=64,
                                 adapters=AdapterConfig(resolve_dirs=(str(tenants),))))
    assert "tenant-7" not in engine.store
    out = engine.generate([[1, 5, 6]], SamplingParams(max_tokens=3, temperature=0), adapters=["tenant-7"])
    assert "tenant-7" in engine.store and out[0].finish_reason is FinishReason.LENGTH
    with pytest.raises(RequestError, match="unknown adapter 'tenant-8'"):
        engine.add_request([1, 2], SamplingParams(max_tokens=2), "tenant-8")
    with pytest.raises(RequestError, match="escape.*outside the allowed adapter roots"):
        engine.add_request([1, 2], SamplingParams(max_tokens=2), "escape")
    for bad in ("../tenants/tenant-7", "a/b"):
        with pytest.raises(RequestError, match="unknown adapter"):
            engine.add_request([1, 2], SamplingParams(max_tokens=2), bad)


def test_fault_of_every_row_is_the_engines(engine, monkeypatch):
    monkeypatch.setattr(engine.runner, "model", FaultyModel(engine.runner.model, always=True))
    for p, a in zip(PROMPTS[:2], ADAPTERS[:2]):
        engine.add_request(p, SamplingParams(max_tokens=4, temperature=0), a)
    with pytest.raises(EngineDeadError):
        engine.step()
    outs = engine.fail_all("engine failed")
    assert len(outs) == 2 and all(o.error_cause is ErrorCause.ENGINE for o in outs)
    assert not engine.has_unfinished()


def test_faults_of_every_row_that_are_the_requests_own_leave_the_engine_serving(engine, monkeypatch):
    """Requests whose own forward raises fail alone even when nothing else shares their step (a
    step of two such, then three one-request steps in a row): a one-token probe of the base model
    runs, so the fault is theirs, and the engine goes on serving with the same tokens."""
    clean, _, _ = run(engine)
    monkeypatch.setattr(engine.runner, "model", FaultyModel(engine.runner.model))
    both = [engine.add_request([1, MARK, i], SamplingParams(max_tokens=3)) for i in (2, 3)]
    finals = [out for _ in range(4) for out in engine.step() if out.finished]
    assert sorted(o.request_id for o in finals) == sorted(both)
    for i in range(3):
        out = engine.generate([[1, MARK, 10 + i]], SamplingParams(max_tokens=3))[0]
        assert out.finish_reason is FinishReason.ERROR and out.error_cause is ErrorCause.REQUEST
        assert "planted fault" in out.error
    assert run(engine)[0] == clean


def test_a_fault_of_every_decode_step_is_the_engines(engine, monkeypatch):
    """The probe runs a row of the failed step's kind: a decode path that always raises fails the
    one-token decode probe too, though prompts still run: the engine's fault at the first step."""
    model = engine.runner.model

    def decode_fails(fb, kv, *args, **kwargs):
        if fb.is_decode:
            raise RuntimeError("planted decode fault")
        return model(fb, kv, *args, **kwargs)

    monkeypatch.setattr(engine.runner, "model", type("M", (), {"__call__": staticmethod(decode_fails),
                                                               "__getattr__": lambda self, n: getattr(model, n)})())
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=4, temperature=0))
    with pytest.raises(EngineDeadError, match="planted decode fault"):
        for _ in range(4):
            engine.step()
    engine.fail_all("engine failed")


def test_many_steps_with_no_row_left_are_the_engines_though_the_probe_runs(engine, monkeypatch):
    """A fault on a path the probe does not take (here: any forward holding MARK, which every
    request then holds) fails the requests one by one until FAILED_STEPS_FATAL steps in a row
    have had no row left: then it is the engine's; a step with a row between them starts over."""
    from caraserve.step_isolation import FAILED_STEPS_FATAL

    monkeypatch.setattr(engine.runner, "model", FaultyModel(engine.runner.model))
    for i in range(FAILED_STEPS_FATAL - 1):
        out = engine.generate([[1, MARK, i]], SamplingParams(max_tokens=2))[0]
        assert out.error_cause is ErrorCause.REQUEST
    assert engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2))[0].error is None  # a row: count starts over
    for i in range(FAILED_STEPS_FATAL - 1):
        assert engine.generate([[1, MARK, i]], SamplingParams(max_tokens=2))[0].error_cause is ErrorCause.REQUEST
    engine.add_request([1, MARK, 99], SamplingParams(max_tokens=2))
    with pytest.raises(EngineDeadError, match=f"{FAILED_STEPS_FATAL} steps in a row"):
        engine.step()
    engine.fail_all("engine failed")


def test_a_failed_prompt_withdraws_its_cached_blocks(tmp_path):
    """A fault that spoils a chunk of a prompt's KV (NaN, once) fails that request when its last
    chunk's logits show it; the blocks it published on the way are withdrawn from the prefix
    cache, so a later request sharing the prefix computes it again and gets the clean tokens."""
    engine = Engine(EngineConfig(compile="false", max_batch_size=4, max_seq_len=256, max_tokens_per_step=32))
    system = list(range(100, 110)) + [MARK] + list(range(110, 150))  # 51 tokens: two chunks and a bit
    greedy = SamplingParams(max_tokens=4, temperature=0)
    want = engine.generate([system + [11, 12, 13]], greedy)[0].output_ids
    engine.kv.reset_prefix_cache()
    armed = [True]

    def spoil(module, args, out):
        marked = args[0] == MARK
        if armed[0] and bool(marked.any()):
            armed[0] = False
            out = out.clone()
            out[marked] = float("nan")
            return out

    hook = engine.model.model.embed_tokens.register_forward_hook(spoil)
    try:
        first = engine.generate([system + [7, 8, 9]], greedy)[0]
        assert first.finish_reason is FinishReason.ERROR and "NaN or infinite" in first.error
        assert not armed[0] and engine.kv.cached_blocks == 0
        again = engine.generate([system + [11, 12, 13]], greedy)[0]
        assert again.error is None and again.output_ids == want
    finally:
        hook.remove()


def test_offline_batch_survives_poisoned_lines(engine, monkeypatch):
    clean, _, _ = run(engine)
    monkeypatch.setattr(engine.runner, "model", FaultyModel(engine.runner.model))
    import json

    good = [json.dumps({"id": f"g{i}", "prompt_token_ids": p, "adapter": a, "max_tokens": 10, "temperature": 0,
                        "ignore_eos": True}) for i, (p, a) in enumerate(zip(PROMPTS, ADAPTERS)) if i != 2]
    lines = [good[0], "", json.dumps({"id": "big-seed", "prompt": "x", "seed": 2**64}), good[1],
             "[1, 2]", json.dumps({"prompt": "x", "max_tokens": True}), "   ",
             json.dumps({"id": "poison", "prompt_token_ids": [1, MARK], "max_tokens": 3}), good[2],
             json.dumps({"id": 17, "prompt_token_ids": [1, 10**30]})]
    results, summary = run_offline(engine, lines)
    assert summary.blank_lines == 2 and summary.requests == 8 and summary.errors == 5
    by_id = {r["id"]: r for r in results}
    assert [by_id[f"g{i}"]["token_ids"] for i in (0, 1, 3)] == [clean[0], clean[1], clean[3]]
    assert "seed" in by_id["big-seed"]["error"] and by_id["big-seed"]["error"].startswith("line 3:")
    assert by_id["5"]["error"].startswith("line 5:")  # no id: the line number, counted from 1
    assert "max_tokens" in by_id["6"]["error"]
    assert "planted fault" in by_id["poison"]["error"]
    assert "token ids" in by_id[17]["error"]  # the id as the line gave it


def test_offline_lines_may_ask_for_top_logprobs(engine):
    import json

    line = {"id": "t", "prompt_token_ids": [1, 40, 50], "max_tokens": 4, "temperature": 0, "ignore_eos": True,
            "logprobs": True, "top_logprobs": 2}
    (result,), summary = run_offline(engine, [json.dumps(line)])
    assert summary.errors == 0 and len(result["top_logprobs"]) == len(result["logprobs"]) == 4
    for chosen, token, top in zip(result["logprobs"], result["token_ids"], result["top_logprobs"]):
        assert len(top) == 2 and top[0] == [token, chosen] and top[1][1] <= chosen  # greedy: the best
    line["top_logprobs"] = 21
    (result,), _ = run_offline(engine, [json.dumps(line)])
    assert "limits.max_logprobs" in result["error"]


@pytest.mark.parametrize("kwargs,field", [
    ({"temperature": math.nan}, "temperature"), ({"temperature": 1e300}, "temperature"),
    ({"temperature": True}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": math.inf}, "top_p"),
    ({"top_k": 2**64}, "top_k"), ({"top_k": -2}, "top_k"), ({"top_k": True}, "top_k"),
    ({"seed": 2**63}, "seed"), ({"seed": -(2**63) - 1}, "seed"), ({"seed": 1.5}, "seed"),
    ({"max_tokens": True}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"), ({"n": True}, "n"),
    ({"stop_token_ids": [True]}, "stop_token_ids"), ({"stop_token_ids": [2**63]}, "stop_token_ids"),
    ({"stop": [""]}, "stop"), ({"stop": 5}, "stop"), ({"ignore_eos": 1}, "ignore_eos"), ({"logprobs": -1}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs needs logprobs"), ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"min_p": 1.5}, "min_p"), ({"min_p": math.nan}, "min_p"), ({"include_stop_str_in_output": 1}, "include_stop"),
])
def test_sampling_params_refuse_what_the_step_cannot_take(kwargs, field):
    with pytest.raises(RequestError, match=field):
        SamplingParams(**kwargs)


def test_borderline_params_run(engine):
    """Values at the edges of what is valid run, and mean what they say."""
    greedy = engine.generate([[1, 5, 6]], SamplingParams(max_tokens=6, temperature=0))[0].output_ids
    tiny_t = engine.generate([[1, 5, 6]], SamplingParams(max_tokens=6, temperature=1e-30, seed=-(2**63)))
    assert tiny_t[0].output_ids == greedy  # below float32's meaningful range: greedy
    wide = engine.generate([[1, 5, 6]], SamplingParams(max_tokens=6, temperature=1.0, top_k=2**63 - 1,
                                                       top_p=1e-300, seed=-(2**63)))
    assert wide[0].output_ids == greedy  # a nucleus of one token is the greedy token


@pytest.mark.parametrize("prompt,params,needle", [
    ("x" * 5000, {}, "max_prompt_bytes"),
    ("é" * 3000, {}, "max_prompt_bytes"),  # 3000 characters, 6000 bytes
    ("bad \ud800 surrogate", {}, "not valid Unicode"),
    ([1, True, 3], {}, "token ids"),
    ("x", {"stop": ["a", "b", "c", "d", "e"]}, "at most 4 stop strings"),
    ("x", {"stop": ["a" * 40, "b" * 40]}, "64 characters"),
    ("x", {"stop_token_ids": list(range(9))}, "at most 8 ids"),
    ("x", {"stop_token_ids": [10**9]}, "stop_token_ids"),
])
def test_engine_limits(engine, prompt, params, needle):
    with pytest.raises(RequestError, match=needle):
        engine.add_request(prompt, SamplingParams(**params))
    assert not engine.has_unfinished()


def test_sampler_clamps_top_k_past_the_vocabulary():
    from caraserve.sampler import sample

    logits = torch.tensor([[0.0, 5.0, 1.0]])
    gen = torch.Generator().manual_seed(0)
    tokens, _, _ = sample(logits, [SamplingParams(temperature=1e-3, top_k=2**63 - 1)], [gen])
    assert tokens == [1]
