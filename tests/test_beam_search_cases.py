"""Beam search cases beyond the main tests'. The algorithm against
vLLM's, written out, over a toy engine whose EOS is often among the best tokens (beams that end,
ignore_eos, the 2 x width alternatives, EOS out of a beam's length); the width limit at its bound,
a text prompt, a negative temperature; and on the server: ignore_eos, include_stop_str_in_output,
skip_special_tokens, include_reasoning and priority reach the search, and a call is admitted at
prompts x n."""

from __future__ import annotations

import asyncio
import math
import random
from types import SimpleNamespace

import pytest
from test_beam_search import _api, engine  # noqa: F401  (engine: the module's fixture)

from caraserve.beam_search import Beam, BeamSearchParams, beam_search
from caraserve.request import RequestError
from caraserve.serve import beams as serve_beams
from caraserve.serve import choices
from caraserve.serve import protocol as proto


class Toy:
    """An engine stand-in for beam_search: the next token's log-probabilities are a fixed random
    function of the last two tokens; tokens 0 and 1 (EOS) are often among the best."""

    VOCAB = 24

    def __init__(self, eos=(0, 1), max_logprobs=20, seed=0):
        rng = random.Random(seed)
        self.rows = {}
        for a in range(self.VOCAB):
            for b in range(self.VOCAB):
                logits = [rng.gauss(0, 2) + (2.5 if t in eos else 0.0) for t in range(self.VOCAB)]
                norm = math.log(sum(math.exp(x) for x in logits))
                self.rows[a, b] = [x - norm for x in logits]
        self.outputs = SimpleNamespace(eos_ids=set(eos))
        self.config = SimpleNamespace(limits=SimpleNamespace(max_logprobs=max_logprobs))

    def logprobs(self, tokens):
        return self.rows[tokens[-2] if len(tokens) > 1 else 0, tokens[-1]]

    def encode(self, prompt):
        return [2 + ord(c) % (self.VOCAB - 2) for c in prompt] if isinstance(prompt, str) else list(prompt)

    def check_fits(self, n, params):
        pass

    def generate(self, prompts, params, adapter=None):
        outs = []
        for tokens in prompts:
            row = self.logprobs(tokens)
            top = sorted(range(self.VOCAB), key=lambda t: -row[t])[: params.top_logprobs]
            outs.append(SimpleNamespace(output_top_logprobs=[tuple((t, row[t]) for t in top)]))
        return outs


def reference(toy, prompt, width, max_tokens, length_penalty=1.0, ignore_eos=False):
    """vLLM's beam search, written out: [(tokens after the prompt, cum logprob, finish)] best first."""
    eos = toy.outputs.eos_ids

    def score(b):
        tokens, cum, _ = b
        return cum / (len(tokens) - (1 if tokens[-1] in eos else 0)) ** length_penalty

    live, done = [(list(prompt), 0.0, None)], []
    for _ in range(max_tokens):
        if not live:
            break
        grown = []
        for tokens, cum, _ in live:
            row = toy.logprobs(tokens)
            for t in sorted(range(toy.VOCAB), key=lambda t: -row[t])[: 2 * width]:
                if t in eos and not ignore_eos:
                    done.append((tokens + [t], cum + row[t], "stop"))
                else:
                    grown.append((tokens + [t], cum + row[t], "length"))
        live = sorted(grown, key=score, reverse=True)[:width]
    best = sorted(done + live, key=score, reverse=True)[:width]
    return [(tokens[len(prompt):], cum, finish) for tokens, cum, finish in best]


@pytest.mark.parametrize("width", [1, 2, 3])
@pytest.mark.parametrize("length_penalty", [1.0, 0.3, 2.0])
@pytest.mark.parametrize("ignore_eos", [False, True])
def test_the_search_equals_vllms_where_beams_end_in_eos(width, length_penalty, ignore_eos):
    toy = Toy()
    prompts = [[5, 9], [7, 3, 11, 4], [20]]
    params = BeamSearchParams(beam_width=width, max_tokens=5, length_penalty=length_penalty, ignore_eos=ignore_eos,
                              include_stop_str_in_output=True)
    got = beam_search(toy, prompts, params)
    ended = 0
    for beams, prompt in zip(got, prompts):
        want = reference(toy, prompt, width, 5, length_penalty, ignore_eos)
        assert [(b.tokens[len(prompt):], b.finish_reason) for b in beams] == [(t, f) for t, _, f in want]
        assert [b.cum_logprob for b in beams] == pytest.approx([c for _, c, _ in want])
        ended += sum(b.finish_reason == "stop" for b in beams)
    assert (ended == 0) == ignore_eos  # (the case: some answers ended in EOS, unless it is ignored)


def test_a_beam_ended_by_eos_is_scored_without_it():
    """A beam's length in its score leaves out the EOS that ended it (vLLM's)."""
    from caraserve.beam_search import BeamSearch

    s = BeamSearch([5, 6], BeamSearchParams(beam_width=2, max_tokens=3), frozenset({0}))
    assert s.score(Beam([5, 6, 7, 0], -2.0)) == pytest.approx(-2.0 / 3)
    assert s.score(Beam([5, 6, 7, 8], -2.0)) == pytest.approx(-2.0 / 4)


def test_the_width_is_taken_up_to_half_of_max_logprobs():
    toy = Toy(max_logprobs=20)
    [beams] = beam_search(toy, [[5, 6]], BeamSearchParams(beam_width=10, max_tokens=1, ignore_eos=True))
    assert len(beams) == 10
    with pytest.raises(RequestError, match="at most 10"):
        beam_search(toy, [[5, 6]], BeamSearchParams(beam_width=11, max_tokens=1))


def test_a_text_prompt_is_one_prompt():
    toy = Toy()
    params = BeamSearchParams(beam_width=2, max_tokens=3)
    got = beam_search(toy, "abc", params)
    assert len(got) == 1
    assert [b.tokens for b in got[0]] == [b.tokens for b in beam_search(toy, [toy.encode("abc")], params)[0]]


def test_a_negative_temperature_is_refused():
    with pytest.raises(RequestError, match="temperature must be >= 0"):
        BeamSearchParams(beam_width=2, max_tokens=2, temperature=-0.5)


def answer(api, **kw) -> dict:
    body = proto.CompletionRequest(**{"model": "tiny", "prompt": "import os", "n": 2, "max_tokens": 3,
                                      "use_beam_search": True, **kw})
    return asyncio.run(api.completion(body, "edge", False))


def test_the_server_passes_ignore_eos_and_include_stop_str_in_output(engine, monkeypatch):  # noqa: F811
    ids = engine.encode("import os")
    best = beam_search(engine, [ids], BeamSearchParams(beam_width=2, max_tokens=3))[0][0].tokens[len(ids)]
    monkeypatch.setattr(engine.outputs, "eos_ids", {best})  # the best first token ends beams
    free = beam_search(engine, [ids], BeamSearchParams(beam_width=2, max_tokens=3, ignore_eos=True))[0]
    kept = beam_search(engine, [ids], BeamSearchParams(beam_width=2, max_tokens=3, include_stop_str_in_output=True))
    assert any(b.finish_reason == "stop" for b in kept[0])  # (the case)
    service, api = _api(engine)
    try:
        ignoring = answer(api, ignore_eos=True)
        stopping = answer(api, include_stop_str_in_output=True)
    finally:
        service.stop()

    def texts(found):
        return [(choices.decode(engine.tokenizer, b.tokens[len(ids):]), b.finish_reason) for b in found]

    assert [(c["text"], c["finish_reason"]) for c in ignoring["choices"]] == texts(free)
    assert [(c["text"], c["finish_reason"]) for c in stopping["choices"]] == texts(kept[0])


def test_the_server_admits_a_call_at_prompts_times_n(engine, monkeypatch):  # noqa: F811
    """With one request waiting, a call of 2 prompts x n 5 does not fit in a queue of 10; of 1 x 5 it does."""
    from caraserve.serve.http import Overloaded

    service, api = _api(engine, max_queue=10)
    monkeypatch.setattr(type(service), "num_waiting", property(lambda self: 1))
    try:
        with pytest.raises(Overloaded):
            answer(api, prompt=["import os", "def f("], n=5, max_tokens=2)
        assert len(answer(api, n=5, max_tokens=2)["choices"]) == 5
    finally:
        service.stop()


def test_the_server_leaves_the_reasoning_out_when_asked(engine):  # noqa: F811
    service, api = _api(engine, reasoning_parser="deepseek_r1")
    chat = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=3, use_beam_search=True)
    try:
        shown = asyncio.run(api.chat(proto.ChatCompletionRequest(**chat), "r1", False))
        hidden = asyncio.run(api.chat(proto.ChatCompletionRequest(**chat, include_reasoning=False), "r2", False))
    finally:
        service.stop()
    assert all(c["message"]["reasoning"] for c in shown["choices"])  # deepseek_r1: all of it is reasoning
    assert [c["message"].get("reasoning") for c in hidden["choices"]] == [None, None]


def test_the_server_steps_at_the_calls_priority(monkeypatch):
    from caraserve.config import AdapterConfig, EngineConfig, SchedulerConfig
    from caraserve.engine import Engine

    e = Engine(EngineConfig(device="cpu", compile="false", adapters=AdapterConfig(dir="none"),
                            scheduler=SchedulerConfig(policy="priority")))
    seen, add_request = [], e.add_request

    def recorded_add(prompt, params=None, *args, **kw):
        seen.append(params.priority)
        return add_request(prompt, params, *args, **kw)

    monkeypatch.setattr(e, "add_request", recorded_add)
    service, api = _api(e)
    try:
        answer(api, priority=-3)
    finally:
        service.stop()
    assert seen == [-3] * 5  # 1 + 2 + 2 step requests


def test_a_beam_call_refuses_return_token_ids_by_name():
    body = proto.CompletionRequest(model="tiny", prompt="x", use_beam_search=True, return_token_ids=True)
    with pytest.raises(serve_beams.BadRequest, match="return_token_ids is not served with use_beam_search"):
        serve_beams.check(body)


def test_a_beams_text_keeps_special_tokens_when_asked(engine):  # noqa: F811
    """(The tiny model never ranks a special token high: the texts of a beam holding one.)"""
    service = SimpleNamespace(engine=engine)
    ids = engine.encode("import os")
    beam = Beam(ids + [309, 2], finish_reason="stop")
    [(kept, _, _)] = serve_beams._texts(service, [beam], ids, False)
    [(skipped, _, _)] = serve_beams._texts(service, [beam], ids, True)
    assert kept == skipped + "</s>" and "</s>" not in skipped
