"""Sampling: greedy picks the first maximum, logprobs are the model's log-softmax at the chosen
token (only where asked), seeded sampling respects top-k / top-p."""

from __future__ import annotations

import pytest
import torch

from caraserve.request import SamplingParams
from caraserve.sampler import NonFiniteLogits, sample


def test_greedy_and_logprobs_match_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 300, generator=g) * 3
    logits[2, 7] = logits[2, 40] = logits[2].max() + 1  # a tie: the first one wins, as torch.argmax
    params = [SamplingParams(temperature=0, logprobs=i % 2 == 0) for i in range(5)]
    tokens, lps, tops = sample(logits, params, [None] * 5)
    assert tops == [()] * 5  # no alternatives asked
    assert tokens == logits.argmax(-1).tolist() and tokens[2] == 7
    ref = logits.log_softmax(-1)
    for i, (t, lp) in enumerate(zip(tokens, lps)):
        if params[i].logprobs:
            assert abs(lp - ref[i, t].item()) < 1e-5
        else:
            assert lp == 0.0  # not asked: the vocabulary-wide pass is skipped


@pytest.mark.parametrize("logprobs", [False, True], ids=["greedy-only", "with-logprobs"])
def test_greedy_rows_take_the_first_maximum_and_name_rows_without_a_finite_one(logprobs):
    """Greedy rows alone (the numpy path on CPU) and with a logprobs row (the torch path) agree:
    the first maximum of each row, and NonFiniteLogits naming exactly the rows whose maximum is
    NaN or +inf or that hold nothing but -inf."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 50, generator=g)
    logits[1, 3] = logits[1, 9] = 10.0  # a tie
    params = [SamplingParams(temperature=0, logprobs=logprobs and i == 0) for i in range(6)]
    tokens, lps, tops = sample(logits, params, [None] * 6)
    assert tokens == logits.argmax(-1).tolist() and tokens[1] == 3
    assert tops == [()] * 6 and lps[1:] == [0.0] * 5
    logits[2, 4] = float("nan")
    logits[3, 0] = float("inf")
    logits[5] = float("-inf")
    with pytest.raises(NonFiniteLogits) as e:
        sample(logits, params, [None] * 6)
    assert e.value.rows == [2, 3, 5]


def test_seeded_sampling_respects_top_k_and_reports_logprob():
    logits = torch.tensor([[0.0, 5.0, 4.9, 4.8, -1.0, 0.5]])
    p = SamplingParams(temperature=1.0, top_k=2, seed=3, logprobs=True)
    seen = set()
    for seed in range(40):
        tokens, lps, _ = sample(logits, [p], [torch.Generator().manual_seed(seed)])
        seen.add(tokens[0])
        assert abs(lps[0] - logits.log_softmax(-1)[0, tokens[0]].item()) < 1e-6
    assert seen == {1, 2}  # only the two most likely tokens
    again = [sample(logits, [p], [torch.Generator().manual_seed(7)])[0][0] for _ in range(3)]
    assert len(set(again)) == 1


def test_top_logprobs_are_the_most_likely_of_the_model():
    """Each row gets its own number of alternatives, best first, from the model's log-softmax
    (not the adjusted or tempered distribution the token was sampled from)."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 50, generator=g) * 2
    params = [SamplingParams(temperature=0, logprobs=True, top_logprobs=3),
              SamplingParams(temperature=0.7, seed=1, logprobs=True, top_logprobs=1, logit_bias={4: 50.0}),
              SamplingParams(temperature=0, logprobs=True)]
    gens = [None, torch.Generator().manual_seed(1), None]
    tokens, lps, tops = sample(logits, params, gens, [([1], []), ([1], []), ([1], [])])
    ref = logits.log_softmax(-1)
    for i, n in enumerate((3, 1, 0)):
        values, ids = ref[i].topk(3)
        assert [t for t, _ in tops[i]] == ids[:n].tolist()
        assert all(abs(lp - v) < 1e-5 for (_, lp), v in zip(tops[i], values[:n].tolist()))
        assert abs(lps[i] - ref[i, tokens[i]].item()) < 1e-5
    assert tokens[1] == 4 and tops[1][0][0] != 4  # sampled with the bias, reported without it


def test_min_p_keeps_the_tokens_at_least_that_fraction_of_the_best():
    """min_p = 0.15: tokens below 0.15 x the best one's probability (after the temperature) never
    come; the others all do. It applies before top-p, whose nucleus is taken of what is left."""
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]])
    logits = probs.log()
    seen = set()
    for seed in range(300):
        p = SamplingParams(temperature=1.0, min_p=0.15, seed=seed)
        seen.add(sample(logits, [p], [torch.Generator().manual_seed(seed)])[0][0])
    assert seen == {0, 1, 2}  # 0.075 is the floor: 0.06 and 0.04 are below it
    narrow = {sample(logits, [SamplingParams(temperature=1.0, min_p=0.15, top_p=0.6)],
                     [torch.Generator().manual_seed(seed)])[0][0] for seed in range(100)}
    assert narrow == {0, 1}  # of 0.5 / 0.3 / 0.1 renormalised, the nucleus of 0.6 is the first two


def test_top_p_one_keeps_every_token():
    """top_p 1 (the default) filters nothing, however long the tail: the float32 running sum of
    a peaky 128k-token distribution reaches 1.0 well before its last tokens."""
    from caraserve.sampler import _filter

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 128_000, generator=g) * 4
    logits[:, :8] += 30  # a few tokens hold nearly all the mass
    off = torch.zeros(4, dtype=torch.int64)
    kept = _filter(logits, off, torch.ones(4), torch.zeros(4))
    assert torch.isfinite(kept).all() and torch.equal(kept, logits)
    nucleus = _filter(logits, off, torch.full((4,), 0.999), torch.zeros(4))
    assert (~torch.isfinite(nucleus)).sum() > 0  # a top_p below 1 still cuts the tail
