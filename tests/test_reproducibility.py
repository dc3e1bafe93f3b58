"""A request's greedy tokens and logprobs (float32, eager) do not depend on what runs beside it
or how its steps go: random workloads (shared prefixes, mixed adapters and sampling options,
staggered arrivals, aborts) through engines of several configurations, each request's outputs
equal bit for bit to the same request run alone in that engine, and its tokens to a roomy
reference engine's."""

from __future__ import annotations

import random

import pytest

from caraserve.config import AdapterConfig, EngineConfig, SchedulerConfig
from caraserve.engine import Engine
from caraserve.request import SamplingParams

ADAPTERS = [None, "demo-r8", "demo-r16", "demo-r32", "demo-r64"]
CONFIGS = {  # name -> EngineConfig overrides
    "chunks of 7": dict(max_tokens_per_step=7, max_batch_size=7),
    "tight KV (preemption)": dict(kv_block_size=4, num_kv_blocks=40),
    "prefix caching, blocks of 3": dict(kv_block_size=3),
    "batch of 3, no mixed steps": dict(max_batch_size=3, scheduler=SchedulerConfig(mixed_steps=False)),
    "one slot per bucket": dict(adapters=AdapterConfig(dir="demo", preload="none", device_slots=1)),
}


def workload(seed: int, vocab: int) -> list[dict]:
    """~12 requests: prompts of 1-120 tokens, some sharing a prefix, each with an adapter or none,
    8-20 greedy tokens, some with a sampling option, some arriving a few steps late or aborted."""
    rng = random.Random(seed)
    prefix = [rng.randrange(3, vocab) for _ in range(rng.randint(16, 60))]
    specs = []
    for _ in range(rng.randint(9, 14)):
        tail = [rng.randrange(3, vocab) for _ in range(rng.choice([1, 2, rng.randint(1, 60)]))]
        options = rng.choice([{}, {}, {}, dict(min_tokens=4, stop_token_ids=[rng.randrange(3, vocab)]),
                              dict(repetition_penalty=1.3, presence_penalty=0.4), dict(top_logprobs=2),
                              dict(logit_bias=((rng.randrange(3, vocab), 2.5),))])
        specs.append(dict(prompt=(prefix if rng.random() < 0.4 else []) + tail, adapter=rng.choice(ADAPTERS),
                          params=SamplingParams(max_tokens=rng.randint(8, 20), temperature=0, ignore_eos=True,
                                                logprobs=True, **options),
                          arrival=rng.choice([0, 0, 0, rng.randint(1, 12)]),
                          abort=rng.randint(2, 10) if rng.random() < 0.1 else None))
    return specs


def run_together(engine: Engine, specs: list[dict]) -> dict[int, object]:
    """Final outputs by request index; an aborted request's last output."""
    ids, finals, step = {}, {}, 0
    while len(finals) < len(specs):
        for i, s in enumerate(specs):
            if s["arrival"] == step and i not in ids:
                ids[i] = engine.add_request(s["prompt"], s["params"], s["adapter"])
            if s["abort"] is not None and step == s["arrival"] + s["abort"] and i not in finals:
                out = engine.abort(ids[i])
                finals[i] = out
        index = {rid: i for i, rid in ids.items()}
        for out in engine.step():
            if out.finished and index[out.request_id] not in finals:
                finals[index[out.request_id]] = out
        step += 1
        assert step < 2000
    return finals


@pytest.fixture(scope="module")
def reference():
    return Engine(EngineConfig(compile="false", prefix_caching=False, max_batch_size=4, max_seq_len=512,
                               adapters=AdapterConfig(dir="demo", preload="all")))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_outputs_do_not_depend_on_the_company_a_request_keeps(name, reference):
    kwargs = dict(dict(compile="false", max_batch_size=8, max_seq_len=512,
                       adapters=AdapterConfig(dir="demo", preload="all")), **CONFIGS[name])
    engine = Engine(EngineConfig(**kwargs))
    vocab = engine.model.args.vocab_size
    for seed in range(2):
        specs = workload(seed * 31 + len(name), vocab)
        together = run_together(engine, specs)
        for i, s in enumerate(specs):
            out = together[i]
            alone = engine.generate([s["prompt"]], s["params"], adapters=[s["adapter"]])[0]
            if s["abort"] is not None:  # what it had made is what it makes alone, so far
                assert alone.output_ids[: len(out.output_ids)] == list(out.output_ids)
                continue
            assert out.error is None and alone.error is None
            assert list(out.output_ids) == list(alone.output_ids), (name, seed, i)
            assert out.logprobs == alone.output_logprobs, (name, seed, i)  # bit for bit
            want = reference.generate([s["prompt"]], s["params"], adapters=[s["adapter"]])[0]
            assert list(out.output_ids) == list(want.output_ids), (name, seed, i)
    assert engine.scheduler.num_preemptions > 0 or name != "tight KV (preemption)"


def test_long_prompts_give_the_same_numbers_whole_chunked_or_after_a_prefix_hit():
    """A prompt of several hundred tokens computed whole, after a prefix-cache hit of most of it,
    or in chunks: its logprobs are the same bit for bit; and a short prompt computed in the same
    step as a long one gets those it gets alone."""
    def engine(**kw):
        return Engine(EngineConfig(compile="false", max_batch_size=4, max_seq_len=1024,
                                   adapters=AdapterConfig(dir="demo", preload="all"), **kw))

    whole_engine = engine()
    rng = random.Random(5)
    vocab = whole_engine.model.args.vocab_size
    long, short = [rng.randrange(3, vocab) for _ in range(700)], [rng.randrange(3, vocab) for _ in range(9)]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=True)

    def numbers(e, prompts):
        return [r.output_logprobs for r in e.generate(prompts, params, adapters=["demo-r16"] * len(prompts))]

    (whole,) = numbers(whole_engine, [long])  # a miss: 700 prompt tokens in one step
    hits = whole_engine.kv.hit_tokens
    assert numbers(whole_engine, [long]) == [whole]  # most of it from the prefix cache
    assert whole_engine.kv.hit_tokens - hits >= 600
    assert numbers(engine(max_tokens_per_step=64), [long]) == [whole]  # in chunks of 64
    (alone,) = numbers(whole_engine, [short])
    assert whole_engine.kv.reset_prefix_cache() >= 0
    assert numbers(whole_engine, [long, short])[1] == alone  # beside a 700-token prompt in one step
