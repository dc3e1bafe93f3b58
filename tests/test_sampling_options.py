"""Logit adjustments: presence/frequency/repetition penalties, logit_bias and min_tokens, against a
plain-torch reference, in the sampler and end to end (greedy tokens of transformers' model with
the reference adjustments applied step by step)."""

from __future__ import annotations

import pytest
import torch

from caraserve.config import AdapterConfig, EngineConfig
from caraserve.engine import Engine
from caraserve.model.tiny import tiny_paths
from caraserve.request import RequestError, SamplingParams
from caraserve.sampler import adjust_logits, sample


def reference(row: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int], eos=()) -> torch.Tensor:
    """The adjustments one token at a time, as OpenAI and vLLM document them."""
    row = row.clone().double()
    for t, b in p.logit_bias:
        row[t] += b
    for t in set(prompt) | set(output):
        row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
    for t in set(output):
        row[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    if len(output) < p.min_tokens:
        for t in set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos)):
            row[t] = float("-inf")
    return row


CASES = {
    "presence": SamplingParams(presence_penalty=1.5),
    "frequency": SamplingParams(frequency_penalty=-0.7),
    "repetition": SamplingParams(repetition_penalty=1.8),
    "bias": SamplingParams(logit_bias={"3": 4.0, 17: -100.0, "25": 30.0}),
    "min_tokens": SamplingParams(max_tokens=20, min_tokens=9, stop_token_ids=[5]),
    "all": SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=0.8,
                          logit_bias={"1": 2.5}, min_tokens=3, max_tokens=8),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_adjustments_match_the_reference(name):
    g = torch.Generator().manual_seed(len(name))
    logits = torch.randn(3, 40, generator=g) * 3
    p = CASES[name]
    histories = [([1, 2, 2, 9], [9, 9, 4, 17, 3]), ([30], []), ([5, 6], [6])]
    params = [p, SamplingParams(), p]  # the middle row asks for nothing: unchanged
    got = adjust_logits(logits, params, histories, eos_ids={2, 39})
    assert torch.equal(got[1], logits[1])
    for i in (0, 2):
        assert torch.allclose(got[i].double(), reference(logits[i], p, *histories[i], eos={2, 39}), atol=1e-5)
    assert not torch.equal(got[0], logits[0])  # the case changes something


def test_min_tokens_holds_back_stops_until_exactly_min_tokens_are_out():
    """The ban lasts while fewer than min_tokens tokens are out: at min_tokens - 1 out, EOS and the
    stop tokens are banned; at min_tokens, nothing is."""
    p = SamplingParams(max_tokens=20, min_tokens=3, stop_token_ids=[5])
    got = adjust_logits(torch.zeros(2, 10), [p, p], [([1], [7, 7]), ([1], [7, 7, 7])], eos_ids={2})
    assert got[0, 5] == got[0, 2] == float("-inf") and torch.equal(got[0, [0, 1, 3, 4, 6, 7, 8, 9]], torch.zeros(8))
    assert torch.equal(got[1], torch.zeros(10))


def test_a_tiny_repetition_penalty_keeps_finite_logits_finite():
    """A penalty near zero divides a positive logit past float32's range: it stays finite and
    huge (the token ranks first, as the infinity would), so the row is still sampled,
    greedy or not; an infinity or NaN the model gave stays what it was."""
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    p = SamplingParams(max_tokens=1, temperature=0, repetition_penalty=1e-40)
    got = adjust_logits(logits, [p], [([0, 1], [])])
    assert torch.isfinite(got).all() and int(got.argmax()) == 0 and got[0, 0] > 1e38
    assert sample(logits, [p], [None], [([0, 1], [])])[0] == [0]
    for temperature in (1.0, 0.7, 1e-3):  # (the temperature divides the penalized logits again)
        seeded = SamplingParams(max_tokens=1, temperature=temperature, seed=3, repetition_penalty=1e-40)
        assert sample(logits, [seeded], [torch.Generator().manual_seed(3)], [([0, 1], [])])[0] == [0]
    odd = torch.tensor([[float("inf"), float("nan"), 1.0]])
    got = adjust_logits(odd, [p], [([0, 1, 2], [])])
    assert got[0, 0] == float("inf") and got[0, 1].isnan() and torch.isfinite(got[0, 2])


def test_a_penalty_below_float32_keeps_masked_tokens_masked_not_nan():
    """A penalty that is 0 in float32 (1e-300): the tokens allowed_token_ids masks stay -inf
    (-inf times 0 would be NaN, and the row unsampleable), the allowed one is chosen."""
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    p = SamplingParams(max_tokens=1, temperature=0, repetition_penalty=1e-300, allowed_token_ids=[2])
    got = adjust_logits(logits, [p], [([0, 1, 2, 3], [])])
    assert not got.isnan().any() and got[0, [0, 1, 3]].eq(float("-inf")).all() and torch.isfinite(got[0, 2])
    assert sample(logits, [p], [None], [([0, 1, 2, 3], [])])[0] == [2]


def test_logprobs_stay_those_of_the_model():
    logits = torch.randn(1, 16, generator=torch.Generator().manual_seed(3))
    p = SamplingParams(temperature=0, logprobs=True, logit_bias={7: 100.0})
    (token,), (lp,), _ = sample(logits, [p], [None], [([1], [])])
    assert token == 7 and lp == pytest.approx((logits[0, 7] - logits[0].logsumexp(-1)).item(), abs=1e-6)


@pytest.mark.parametrize("kw,message", [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": "1"}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"min_tokens": 17}, "min_tokens"),
    ({"logit_bias": {"x": 1.0}}, "logit_bias"), ({"logit_bias": {3: 101}}, "logit_bias"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias"), ({"logit_bias": 5}, "logit_bias"),
])
def test_bad_values_are_refused_by_name(kw, message):
    with pytest.raises(RequestError, match=message):
        SamplingParams(max_tokens=16, **kw)


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_paths()[0]), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine():
    return Engine(EngineConfig(device="cpu", compile="false", adapters=AdapterConfig(dir="none")))


def hf_greedy(model, prompt, p: SamplingParams, n: int, eos=()) -> list[int]:
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([prompt + out])).logits[0, -1]
            out.append(int(reference(logits, p, prompt, out, eos).argmax()))
    return out


# Stronger than CASES: the tiny model's greedy text repeats a token only after ~30 tokens
ENGINE_CASES = {
    "presence": dict(presence_penalty=2.0), "frequency": dict(frequency_penalty=1.5),
    "repetition": dict(repetition_penalty=2.0), "bias": dict(logit_bias={"25": 30.0}),
    "all": dict(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=0.8, logit_bias={"1": 2.5},
                min_tokens=3),
}


@pytest.mark.parametrize("name", sorted(ENGINE_CASES))
def test_greedy_tokens_with_adjustments_match_transformers(hf_model, engine, name):
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, **ENGINE_CASES[name])
    prompt = engine.encode("def fibonacci(n):")
    got = engine.generate([prompt], params)[0].output_ids
    assert got == hf_greedy(hf_model, prompt, params, 30)
    plain = engine.generate([prompt], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0].output_ids
    assert got != plain  # the option changed the tokens


def test_min_tokens_holds_back_eos_and_stop_tokens(hf_model, engine):
    prompt = engine.encode("import os")
    free = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].output_ids
    eos = engine.outputs.eos_ids
    engine.outputs.eos_ids = {free[1]}  # the model's second token ends the request...
    try:
        short = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0]
        assert len(short.output_ids) == 2
        held = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0, min_tokens=6))[0]
        assert len(held.output_ids) >= 6 and free[1] not in held.output_ids[:6]  # ... not before 6 tokens
        assert held.output_ids == hf_greedy(hf_model, prompt, SamplingParams(max_tokens=12, min_tokens=6),
                                            len(held.output_ids), eos={free[1]})
    finally:
        engine.outputs.eos_ids = eos


def test_logit_bias_past_the_vocabulary_is_refused(engine):
    with pytest.raises(RequestError, match="logit_bias"):
        engine.check_params(SamplingParams(logit_bias={10**6: 1.0}))
