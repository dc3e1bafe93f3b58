"""Beam search (vLLM's LLM.beam_search and `use_beam_search`): the engine's search equals a plain
implementation of vLLM's algorithm over transformers' log-probabilities (the same beams, tokens
and scores), with adapters, EOS, length penalties and several prompts at once."""

from __future__ import annotations

import pytest
import torch

from caraserve.beam_search import BeamSearchParams, beam_search
from caraserve.config import AdapterConfig, EngineConfig, ServerConfig
from caraserve.engine import Engine
from caraserve.model.tiny import tiny_paths
from caraserve.request import RequestError


@pytest.fixture(scope="module")
def engine():
    return Engine(EngineConfig(device="cpu", compile="false", adapters=AdapterConfig(dir="demo", preload="host")))


@pytest.fixture(scope="module")
def hf():
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir, adapter_dir = tiny_paths()
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return base, lambda name: PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32), str(adapter_dir / name)).eval()


def reference(model, prompt: list[int], width: int, max_tokens: int, eos: set[int], length_penalty=1.0,
              ignore_eos=False):
    """vLLM's beam search, written out: [(tokens after the prompt, cum logprob)] best first."""
    def score(tokens, cum):
        n = len(tokens) - (1 if tokens[-1] in eos else 0)
        return cum / n ** length_penalty

    live, done = [(list(prompt), 0.0)], []
    for _ in range(max_tokens):
        if not live:
            break
        grown = []
        for tokens, cum in live:
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([tokens])).logits[0, -1].double(), -1)
            top = torch.topk(lp, 2 * width)
            for t, v in zip(top.indices.tolist(), top.values.tolist()):
                (done if t in eos and not ignore_eos else grown).append((tokens + [t], cum + v))
        live = sorted(grown, key=lambda b: score(*b), reverse=True)[:width]
    best = sorted(done + live, key=lambda b: score(*b), reverse=True)[:width]
    return [(tokens[len(prompt):], cum) for tokens, cum in best]


def check(got, want):
    assert [b.tokens for b in got] == [t for t, _ in want]
    assert [b.cum_logprob for b in got] == pytest.approx([c for _, c in want], abs=1e-4)


@pytest.mark.parametrize("width, length_penalty", [(1, 1.0), (3, 1.0), (4, 0.5)])
def test_beams_equal_the_reference(engine, hf, width, length_penalty):
    prompt = engine.encode("def fibonacci(n):")
    params = BeamSearchParams(beam_width=width, max_tokens=6, length_penalty=length_penalty,
                              include_stop_str_in_output=True)
    [got] = beam_search(engine, [prompt], params)
    assert len(got) == width and all(b.finish_reason == "length" for b in got)
    got_gen = [type(b)(b.tokens[len(prompt):], b.cum_logprob) for b in got]
    check(got_gen, reference(hf[0], prompt, width, 6, set(), length_penalty))
    if width == 1:  # a beam of one is greedy decoding
        from caraserve.request import SamplingParams
        greedy = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
        assert got_gen[0].tokens == greedy.output_ids


def test_eos_ends_beams_and_several_prompts_search_together(engine, hf):
    """A token the plain search ranks second is made EOS: beams that take it end there (and it
    leaves their tokens unless include_stop_str_in_output), as in the reference."""
    prompts = [engine.encode("import os"), engine.encode("class A:")]
    free = reference(hf[0], prompts[0], 2, 4, set())
    eos = {free[1][0][0]}
    saved = engine.outputs.eos_ids
    engine.outputs.eos_ids = eos
    try:
        got = beam_search(engine, prompts, BeamSearchParams(beam_width=2, max_tokens=4))
        kept = beam_search(engine, prompts[:1], BeamSearchParams(beam_width=2, max_tokens=4,
                                                                 include_stop_str_in_output=True))[0]
    finally:
        engine.outputs.eos_ids = saved
    for beams, prompt in zip(got, prompts):
        want = reference(hf[0], prompt, 2, 4, eos)
        assert [b.tokens[len(prompt):] for b in beams] == [t[:-1] if t and t[-1] in eos else t for t, _ in want]
        assert [b.cum_logprob for b in beams] == pytest.approx([c for _, c in want], abs=1e-4)
    assert any(b.finish_reason == "stop" for b in kept) and all(
        b.tokens[-1] in eos for b in kept if b.finish_reason == "stop")


def test_an_adapter_searches_with_its_weights(engine, hf):
    prompt = engine.encode("hello world")
    [got] = beam_search(engine, [prompt], BeamSearchParams(beam_width=2, max_tokens=5), "demo-r32")
    check([type(b)(b.tokens[len(prompt):], b.cum_logprob) for b in got],
          reference(hf[1]("demo-r32"), prompt, 2, 5, set(engine.outputs.eos_ids)))


def test_bad_params_are_refused_by_name(engine):
    for kw, says in ((dict(beam_width=0, max_tokens=4), "beam width"), (dict(beam_width=2, max_tokens=0), "max_tokens"),
                     (dict(beam_width=2, max_tokens=4, length_penalty=float("nan")), "length_penalty")):
        with pytest.raises(RequestError, match=says):
            BeamSearchParams(**kw)
    with pytest.raises(RequestError, match="context length"):
        beam_search(engine, [[1] * 10], BeamSearchParams(beam_width=2, max_tokens=10**6))
    with pytest.raises(RequestError, match="beam width"):
        beam_search(engine, [[1, 2]], BeamSearchParams(beam_width=11, max_tokens=2))


def test_the_server_answers_use_beam_search_with_the_best_beams(engine):
    import httpx
    from test_server_hardening import in_process_server

    from caraserve.serve import choices

    body = {"model": "demo-r16", "prompt": ["def fibonacci(n):", "import os"], "max_tokens": 5, "n": 3,
            "use_beam_search": True, "ignore_eos": True, "length_penalty": 0.7}
    prompts = [engine.encode(p) for p in body["prompt"]]
    want = beam_search(engine, prompts, BeamSearchParams(beam_width=3, max_tokens=5, ignore_eos=True,
                                                         length_penalty=0.7), "demo-r16")
    with in_process_server(engine, ServerConfig()) as (base, _):
        r = httpx.post(base + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        got = r.json()
        texts = [choices.decode(engine.tokenizer, b.tokens[len(p):]) for bs, p in zip(want, prompts) for b in bs]
        assert [c["text"] for c in got["choices"]] == texts and [c["index"] for c in got["choices"]] == list(range(6))
        assert all(c["finish_reason"] == "length" for c in got["choices"])
        assert got["usage"]["completion_tokens"] == 30 and got["usage"]["prompt_tokens"] == sum(map(len, prompts))
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "n": 2,
                "use_beam_search": True}
        r = httpx.post(base + "/v1/chat/completions", json=chat, timeout=60)
        assert r.status_code == 200, r.text
        ids = engine.encode(engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                                                 add_generation_prompt=True, tokenize=False),
                            add_special_tokens=False)
        [beams] = beam_search(engine, [ids], BeamSearchParams(beam_width=2, max_tokens=4))
        assert [c["message"]["content"] for c in r.json()["choices"]] == [
            choices.decode(engine.tokenizer, b.tokens[len(ids):]) for b in beams]
        for extra, says in (({"stream": True}, "stream"), ({"logprobs": 2}, "logprobs"), ({"stop": ["x"]}, "stop"),
                            ({"n": 11}, "beam width")):
            r = httpx.post(base + "/v1/completions", json={**body, "prompt": "x", **extra}, timeout=60)
            assert r.status_code == 400 and says in r.json()["error"]["message"], r.text


def _api(engine, max_queue=16, **kw):
    from caraserve.serve.async_engine import AsyncEngine
    from caraserve.serve.service import EngineService

    service = AsyncEngine(engine, max_queue=max_queue)
    service.start()
    return service, EngineService(service, "tiny", [], 1.0, **kw)


def test_beam_calls_take_neutral_fields_salt_and_the_reasoning_parser(engine, monkeypatch):
    """Fields set to what changes nothing are taken; the cache salt reaches every step's
    requests; temperature and seed change nothing; a chat's reasoning parser reads the beams."""
    import asyncio

    from caraserve.serve import choices
    from caraserve.serve import protocol as proto

    seen, add_request = [], engine.add_request

    def recorded_add(prompt, params=None, *args, **kw):
        seen.append(params)
        return add_request(prompt, params, *args, **kw)

    monkeypatch.setattr(engine, "add_request", recorded_add)
    service, api = _api(engine, reasoning_parser="deepseek_r1")
    neutral = dict(stop=[], stop_token_ids=[], logit_bias={}, top_k=0, seed=7, temperature=0.8, tools=[],
                   response_format={"type": "text"}, bad_words=[], echo=False, return_token_ids=False)
    try:
        body = proto.CompletionRequest(model="tiny", prompt="import os", n=2, max_tokens=3, use_beam_search=True,
                                       cache_salt="tenant-a", **neutral)
        got = asyncio.run(api.completion(body, "b1", False))
        salted = [p.cache_salt for p in seen]  # the completion's steps: 1 + 2 + 2 requests
        chat = proto.ChatCompletionRequest(model="tiny", messages=[{"role": "user", "content": "hi"}], n=2,
                                           max_tokens=3, use_beam_search=True, logprobs=False, **neutral)
        answer = asyncio.run(api.chat(chat, "b2", False))
    finally:
        service.stop()
    ids = engine.encode("import os")
    want = beam_search(engine, [ids], BeamSearchParams(beam_width=2, max_tokens=3))[0]
    assert [c["text"] for c in got["choices"]] == [choices.decode(engine.tokenizer, b.tokens[len(ids):])
                                                   for b in want]
    assert len(salted) == 5 and set(salted) == {"tenant-a"}, salted
    # deepseek_r1: an output that never closes </think> is all reasoning
    assert all(c["message"]["content"] is None and c["message"]["reasoning"] for c in answer["choices"])


def test_beam_calls_end_when_the_caller_goes_away(engine):
    """Each step's requests end before the server's wait looks at the connection: the search
    asks between steps, and a caller gone ends it with nothing left running."""
    import asyncio

    from caraserve.serve import protocol as proto
    from caraserve.serve.http import ClientClosed

    asked = []

    async def disconnected():
        asked.append(1)
        return len(asked) >= 2

    service, api = _api(engine)
    try:
        body = proto.CompletionRequest(model="tiny", prompt="import os", n=2, max_tokens=50, use_beam_search=True,
                                       ignore_eos=True)
        with pytest.raises(ClientClosed):
            asyncio.run(api.completion(body, "gone", False, disconnected))
    finally:
        service.stop()
    assert len(asked) == 2 and not engine.has_unfinished()


def test_a_beam_call_is_admitted_whole_at_its_first_step(engine, monkeypatch):
    """A beam call is admitted at its widest (prompts x width) before its first step, so a full
    queue refuses it before it starts (a 503), never between its steps: each call answers whole
    or was refused with none of its requests run."""
    import asyncio

    from caraserve.serve import protocol as proto
    from caraserve.serve.http import Overloaded

    added, add_request = [], engine.add_request

    def recorded_add(prompt, params=None, adapter=None, request_id=None, *args, **kw):
        added.append(request_id)
        return add_request(prompt, params, adapter, request_id, *args, **kw)

    monkeypatch.setattr(engine, "add_request", recorded_add)
    service, api = _api(engine, max_queue=8)
    body = proto.CompletionRequest(model="tiny", prompt=["import os", "def f("], n=5, max_tokens=3,
                                   use_beam_search=True, ignore_eos=True)

    async def calls():
        return await asyncio.gather(*(api.completion(body, f"c{i}", False) for i in range(4)),
                                    return_exceptions=True)

    try:
        got = asyncio.run(calls())
    finally:
        service.stop()
    refused = [i for i, g in enumerate(got) if isinstance(g, BaseException)]
    assert all(isinstance(got[i], Overloaded) for i in refused), got
    assert len(refused) < 4  # the queue holds one call's widest step
    for i, g in enumerate(got):
        ran = [r for r in added if r.startswith(f"c{i}-")]
        assert (not ran) if i in refused else len(g["choices"]) == 10, (i, ran)


@pytest.mark.parametrize("length_penalty", [1e308, -1e308, 100.0])
def test_extreme_length_penalties_score_as_their_limit(engine, hf, length_penalty):
    """A length ** length_penalty past the float range scores as its limit (no OverflowError or
    ZeroDivisionError), and a finite one still equals the reference."""
    prompt = engine.encode("import os")
    [got] = beam_search(engine, [prompt], BeamSearchParams(beam_width=2, max_tokens=3, ignore_eos=True,
                                                           length_penalty=length_penalty))
    assert len(got) == 2 and all(len(b.tokens) == len(prompt) + 3 for b in got)
    if length_penalty == 100.0:
        check([type(b)(b.tokens[len(prompt):], b.cum_logprob) for b in got],
              reference(hf[0], prompt, 2, 3, set(), length_penalty, ignore_eos=True))
