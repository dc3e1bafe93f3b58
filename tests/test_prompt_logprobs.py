"""Prompt logprobs (SamplingParams.prompt_logprobs: each prompt token's logprob given what precedes
it, and its alternatives) against transformers + peft, in chunks, beside other requests, past
the prefix cache and a preemption."""

from __future__ import annotations

import pytest
import torch
from helpers import peft_logits

from caraserve.config import AdapterConfig, EngineConfig
from caraserve.engine import Engine
from caraserve.model.tiny import tiny_paths
from caraserve.request import RequestError, SamplingParams

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)"


@pytest.fixture(scope="module")
def engine():
    return Engine(EngineConfig(compile="false", max_batch_size=4, max_seq_len=256, max_tokens_per_step=16,
                               adapters=AdapterConfig(dir="demo")))


def reference(ids: list[int], adapter: str | None) -> torch.Tensor:
    """[len(ids) - 1, V]: the log-softmax before each prompt token but the first."""
    model_dir, adapter_dir = tiny_paths()
    logits = peft_logits(model_dir, None if adapter is None else adapter_dir / adapter, ids)
    return logits[:-1].log_softmax(-1)


@pytest.mark.parametrize("adapter", [None, "demo-r32"])
def test_prompt_logprobs_match_transformers_and_peft(engine, adapter):
    ids = engine.encode(PROMPT)
    assert len(ids) > 2 * 16  # a prefill of several chunks
    sp = SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=2)
    other = SamplingParams(max_tokens=3, temperature=0)
    got, beside = engine.generate([PROMPT, "import os"], [sp, other], [adapter, "demo-r8"])  # in one batch
    ref = reference(ids, adapter)
    assert len(got.prompt_logprobs) == len(ids) and got.prompt_logprobs[0] is None
    for p, (lp, alts, rank) in enumerate(got.prompt_logprobs[1:]):
        assert lp == pytest.approx(ref[p, ids[p + 1]].item(), abs=2e-5)
        chosen = ref[p, ids[p + 1]]  # its rank: 1 + the tokens more likely (those within tolerance either way)
        assert 1 + (ref[p] > chosen + 2e-5).sum().item() <= rank <= 1 + (ref[p] > chosen - 2e-5).sum().item()
        values, best = ref[p].topk(2)
        assert [t for t, _ in alts] == best.tolist()
        assert [v for _, v in alts] == pytest.approx(values.tolist(), abs=2e-5)
    assert beside.prompt_logprobs == []  # not asked


def test_prompt_logprobs_past_the_prefix_cache_and_a_preemption():
    """A prompt whose blocks are cached is still computed (its rows give the logprobs); a request
    preempted and recomputed keeps the logprobs it had, once each."""
    small = Engine(EngineConfig(compile="false", max_batch_size=4, max_seq_len=256, kv_block_size=16,
                                num_kv_blocks=12, adapters=AdapterConfig(dir="none")))
    ids = small.encode(PROMPT)
    sp = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, prompt_logprobs=0)
    first = small.generate([PROMPT], sp)[0].prompt_logprobs
    assert small.kv.hit_tokens == 0
    again = small.generate([PROMPT, PROMPT, PROMPT], sp)  # the KV blocks run out: someone is preempted
    assert small.scheduler.num_preemptions > 0
    assert all(r.prompt_logprobs == first for r in again) and len(first) == len(ids)
    ref = reference(ids, None)
    assert [e[0] for e in first[1:]] == pytest.approx([ref[p, ids[p + 1]].item() for p in range(len(ids) - 1)],
                                                        abs=2e-5)


def test_prompt_logprobs_are_checked(engine):
    with pytest.raises(RequestError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)
    with pytest.raises(RequestError, match="limits.max_logprobs"):
        engine.generate(["x"], SamplingParams(prompt_logprobs=21))


def test_a_request_preempted_mid_prompt_scores_it_again_from_the_start(engine):
    sp = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=1)
    want = engine.generate([PROMPT], sp)[0].prompt_logprobs
    rid = engine.add_request(PROMPT, sp)
    engine.step()  # the first chunk of 16 prompt tokens
    req = engine.request(rid)
    assert 0 < len(req.prompt_logprobs) < len(want)
    engine.scheduler.preempt(req)
    while not req.finished:
        engine.step()
    assert req.prompt_logprobs == want


def test_a_scored_prompt_preempted_by_a_growing_request_scores_every_token():
    """A long prompt being scored in chunks is preempted when a running request needs its blocks:
    it starts over and still gives one logprob per prompt token, those of a run alone."""
    def tight():
        return Engine(EngineConfig(compile="false", kv_block_size=16, num_kv_blocks=72, max_tokens_per_step=32,
                                   adapters=AdapterConfig(dir="demo", preload="host")))

    scored = list(range(200, 1300))
    sp = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0, ignore_eos=True)
    want = tight().generate([scored], sp)[0].prompt_logprobs
    e = tight()
    first = e.add_request(list(range(100, 110)), SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    while e.request(first).context_len < 31:
        e.step()
    req = e.request(e.add_request(scored, sp))
    while e.has_unfinished():
        e.step()
    assert e.scheduler.num_preemptions >= 1 and req.preemptions >= 1
    assert len(req.prompt_logprobs) == len(scored) and req.prompt_logprobs == want


def test_a_scored_prompt_goes_in_bounded_chunks_and_slices(engine, monkeypatch):
    """A prompt being scored computes at most PROMPT_LOGPROBS_CHUNK tokens a step, and its rows'
    log-softmax is made LOGPROB_ROWS rows at a time (the logits over the vocabulary stay bounded):
    the same logprobs."""
    from caraserve import sampler, scheduler

    sp = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=2)
    want = engine.generate([PROMPT], sp)[0].prompt_logprobs
    monkeypatch.setattr(scheduler, "PROMPT_LOGPROBS_CHUNK", 5)
    monkeypatch.setattr(sampler, "LOGPROB_ROWS", 3)
    rid = engine.add_request(PROMPT, sp)
    req, chunks = engine.request(rid), []
    while not req.finished:
        before = req.num_computed
        engine.step()
        if req.num_computed != before:
            chunks.append(req.num_computed - before)
    assert max(chunks) == 5 and sum(chunks) == len(req.prompt_ids)
    assert len(req.prompt_logprobs) == len(want) and req.prompt_logprobs[0] is None
    for (lp, alts, rank), (lp_want, alts_want, rank_want) in zip(req.prompt_logprobs[1:], want[1:]):
        assert lp == pytest.approx(lp_want, abs=1e-6) and [t for t, _ in alts] == [t for t, _ in alts_want]
        assert rank == rank_want
