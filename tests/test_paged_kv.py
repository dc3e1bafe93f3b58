"""The paged KV cache: blocks taken as tokens arrive, freed at finish, and preemption when they
run out (the youngest request recomputes later, its tokens unchanged)."""

from __future__ import annotations

import pytest
import torch

from caraserve.config import AdapterConfig, EngineConfig
from caraserve.config_checks import ConfigError
from caraserve.engine import Engine
from caraserve.kv_cache import KVCache, block_bytes, blocks_for
from caraserve.request import FinishReason, RequestError, SamplingParams
from caraserve.state import EngineState


def cache(blocks=6, block_size=4) -> KVCache:
    return KVCache(blocks, block_size, 2, 8, torch.float32, [torch.device("cpu")])


def test_blocks_are_taken_as_tokens_arrive_and_come_back():
    kv = cache()
    assert (kv.free_blocks, kv.capacity_tokens, kv.layers[0][0].shape) == (6, 24, (7, 4, 2, 8))
    table: list[int] = []
    assert kv.grow(table, 5) and len(table) == 2 and kv.used_blocks == 2
    assert kv.grow(table, 8) and len(table) == 2  # the second block has room for positions 5-7
    assert kv.blocks_needed(table, 9) == 1 and kv.blocks_needed(table, 3) == 0
    other: list[int] = []
    assert not kv.grow(other, 17) and other == [] and kv.free_blocks == 4  # 5 blocks: refused, none taken
    assert 0 not in table  # block 0 is the scratch block, never handed out
    kv.free(table)
    assert table == [] and kv.free_blocks == 6
    with pytest.raises(ValueError, match="not a block"):
        kv.free([0])
    kept = []
    kv.grow(kept, 1)
    with pytest.raises(ValueError, match="twice"):
        kv.free(kept * 2)


def test_block_arithmetic():
    assert [blocks_for(n, 16) for n in (0, 1, 16, 17)] == [0, 1, 1, 2]
    assert block_bytes(16, 2, 64, torch.float32, 4) == 2 * 4 * 16 * 2 * 64 * 4
    assert block_bytes(16, 2, 64, torch.bfloat16, 4) == 2 * 4 * 16 * 2 * 64 * 2


def engine(**kw) -> Engine:
    kw.setdefault("compile", "false")
    return Engine(EngineConfig(device="cpu", adapters=AdapterConfig(dir="demo", preload="host"), **kw))


PROMPTS = [[1, 5, 9, 13, 17, 21, 25], [1, 7, 300], [1, 44, 45, 46, 47], [1, 90], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
ADAPTERS = ["demo-r16", None, "demo-r64", "demo-r8", "demo-r16"]


def test_default_budget_is_the_memory_of_one_slot_per_request():
    e = engine(max_batch_size=4, max_seq_len=128)
    assert e.kv.block_size == 16 and e.kv.num_blocks == 4 * 128 // 16
    a = e.model.args
    per_block = block_bytes(16, a.num_kv_heads, a.head_dim, torch.float32, a.num_layers)
    assert engine(kv_cache_bytes=10 * per_block + 5).kv.num_blocks == 10
    assert engine(num_kv_blocks=7, kv_cache_bytes=10 * per_block).kv.num_blocks == 7  # the count wins
    with pytest.raises(ConfigError, match="holds no block"):
        engine(kv_cache_bytes=per_block - 1)


@pytest.mark.parametrize("key,value", [("kv_block_size", 0), ("num_kv_blocks", -1), ("kv_cache_bytes", -5),
                                       ("gpu_memory_utilization", 0.0), ("gpu_memory_utilization", 1.5)])
def test_bad_kv_settings_are_refused_by_name(key, value):
    with pytest.raises(ConfigError, match=f"engine.{key}"):
        EngineConfig(**{key: value})


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
                                    SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, seed=7,
                                                   ignore_eos=True)], ids=["greedy", "seeded"])
def test_preempted_requests_recompute_the_same_tokens(params):
    roomy = engine()
    want = [r.output_ids for r in roomy.generate(PROMPTS, params, ADAPTERS)]
    # 12 blocks of 4 tokens: each request needs 4-9 blocks, so at most ~2 run at once
    tight = engine(kv_block_size=4, num_kv_blocks=12)
    reqs = tight.generate(PROMPTS, params, ADAPTERS)
    assert [r.output_ids for r in reqs] == want
    assert all(r.finish_reason is FinishReason.LENGTH for r in reqs)
    assert tight.scheduler.num_preemptions > 0 and tight.kv.free_blocks == 12
    # a recompute after a preemption is not a new prefix-cache query (vLLM's counters)
    assert tight.kv.query_tokens == sum(map(len, PROMPTS))
    state = tight.snapshot()
    assert (state.preemptions, state.kv_blocks_total, state.kv_blocks_free, state.kv_block_size) == (
        tight.scheduler.num_preemptions, 12, 12, 4)
    assert EngineState.from_dict(state.to_dict()) == state


def test_chunked_prefill_with_preemption_gives_the_same_tokens():
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    long_prompts = [list(range(1, 60)), list(range(100, 140)), list(range(200, 230))]
    want = [r.output_ids for r in engine().generate(long_prompts, params, ["demo-r32", None, "demo-r16"])]
    tight = engine(kv_block_size=8, num_kv_blocks=12, max_tokens_per_step=16, max_batch_size=8)
    got = tight.generate(long_prompts, params, ["demo-r32", None, "demo-r16"])
    assert [r.output_ids for r in got] == want and tight.scheduler.num_preemptions > 0


def test_the_youngest_request_is_the_one_preempted():
    e = engine(kv_block_size=4, num_kv_blocks=8)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    old = e.add_request([1, 2, 3, 4, 5, 6], params)
    young = e.add_request([1, 9, 8, 7, 6, 5], params)
    reqs = {rid: e.request(rid) for rid in (old, young)}
    while e.has_unfinished():
        e.step()
    assert reqs[old].preemptions == 0 and reqs[young].preemptions > 0
    assert e.kv.free_blocks == 8


def test_a_lone_request_as_long_as_the_whole_cache_runs():
    """Admission keeps blocks free for running requests to grow into, but none when nothing runs:
    a request of every block's worth of tokens starts on an idle engine and finishes."""
    e = engine(kv_block_size=16, num_kv_blocks=4)
    req = e.request(e.add_request(list(range(100, 160)), SamplingParams(max_tokens=4, temperature=0,
                                                                          ignore_eos=True)))
    for _ in range(20):
        if not e.has_unfinished():
            break
        e.step()
    assert req.finished and len(req.output_ids) == 4 and e.kv.free_blocks == 4


def test_a_preempted_request_is_admitted_again_before_later_arrivals():
    e = engine(kv_block_size=4, num_kv_blocks=12, max_batch_size=2, max_seq_len=48)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    ids = [e.add_request([1, 2, 3, 4, 5, 6, 7, 8 + i], params) for i in range(4)]
    admitted = []  # (arrival index, preemptions before this admission)
    while e.has_unfinished():
        before = {r.request_id for r in e.scheduler.running}
        e.step()
        admitted += [(ids.index(r.request_id), r.preemptions) for r in e.scheduler.running
                     if r.request_id not in before]
    assert e.scheduler.num_preemptions == 2
    assert admitted == [(0, 0), (1, 0), (1, 1), (2, 0), (3, 0), (3, 1)]


def test_requests_larger_than_the_whole_cache_are_refused():
    """A cache smaller than engine.max_seq_len limits every request to what it holds, and that is
    the context length the engine gives (what /v1/models advertises and defaults are sized by)."""
    e = engine(kv_block_size=4, num_kv_blocks=5)
    assert e.max_seq_len == 20
    with pytest.raises(RequestError, match=r"context length 20 \(all the KV cache holds: 5 blocks of 4 tokens\)"):
        e.add_request([1, 2, 3], SamplingParams(max_tokens=18))
    with pytest.raises(RequestError, match=r"21 token ids .* context length 20 \(all the KV cache holds"):
        e.add_request([1] * 21, SamplingParams(max_tokens=1))  # a prompt alone past it says so too
    assert not e.has_unfinished()
    e.add_request([1, 2, 3], SamplingParams(max_tokens=17, ignore_eos=True))  # 20 tokens: exactly the cache
    while e.has_unfinished():
        e.step()
    assert e.kv.free_blocks == 5


def test_more_requests_in_flight_than_one_slot_each_allowed():
    """The same memory as 2 slots of 64 tokens holds all 5 short requests at once when paged."""
    e = engine(max_batch_size=8, max_seq_len=64, kv_cache_bytes=0, kv_block_size=4, num_kv_blocks=32)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    for p, a in zip(PROMPTS, ADAPTERS):
        e.add_request(p, params, a)
    most = 0
    while e.has_unfinished():
        e.step()
        most = max(most, len(e.scheduler.running))
    assert most == len(PROMPTS) and e.scheduler.num_preemptions == 0


def test_mixed_steps_carry_decode_rows_beside_prefill_chunks():
    """A long prompt arriving while others decode: each step gives every running request its next
    token and prefills a chunk of the prompt with the rest of the token budget."""
    from caraserve.config import SchedulerConfig
    from caraserve.request import RequestState

    e = engine(max_tokens_per_step=24, max_batch_size=8)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    early = [e.add_request(p, params, a) for p, a in zip(PROMPTS[:3], ADAPTERS[:3])]
    e.step()  # their prefill
    long_prompt = list(range(5, 105))  # 100 tokens: five chunks of at most 21 beside 3 decode rows
    late = e.add_request(long_prompt, params, "demo-r32")
    batch = e.scheduler.schedule()
    assert not batch.is_decode and len(batch.requests) == 4
    kinds = {r.request_id: (r.state, n) for r, n in zip(batch.requests, batch.chunk_lens)}
    assert all(kinds[rid] == (RequestState.DECODE, 1) for rid in early)
    assert kinds[late] == (RequestState.PREFILL, 21)

    def stalls(mixed: bool) -> int:
        """Steps in which the early requests got no token while the long prompt prefilled."""
        eng = engine(max_tokens_per_step=24, max_batch_size=8, scheduler=SchedulerConfig(mixed_steps=mixed))
        rids = [eng.add_request(p, params, a) for p, a in zip(PROMPTS[:3], ADAPTERS[:3])]
        eng.step()
        long_req = eng.request(eng.add_request(long_prompt, params, "demo-r32"))
        stalled = 0
        while eng.has_unfinished():
            got = {o.request_id for o in eng.step() if o.new_token_ids}
            if long_req.state is RequestState.PREFILL:
                stalled += not (got & set(rids))
        return stalled

    assert stalls(mixed=True) == 0 and stalls(mixed=False) >= 3


def test_slo_bounds_the_prompt_tokens_a_mixed_step_carries(tmp_path):
    """With a per-token SLO, a mixed step takes only as many prompt tokens as keep its predicted
    time within it (at least one KV block's worth), and the engine learns from mixed steps."""
    import json

    from caraserve.config import SchedulerConfig
    from caraserve.perf.model import PerfModel

    # decode step 2 ms whatever the batch; each prompt token 0.01 ms more: 2.2 ms holds 20 tokens
    model = PerfModel.linear(decode_base_ms=2.0, decode_per_request_ms=0.0, decode_per_rank_request_ms=0.0,
                             prefill_base_ms=1.0, prefill_per_token_ms=0.01, prefill_per_token_rank_ms=0.0)
    path = tmp_path / "latency.json"
    path.write_text(json.dumps({"model": model.to_dict()}))
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    chunks = {}
    for slo in (2.2, 2.005, 0.0):
        sched = SchedulerConfig(slo_ms=slo, perf_model=str(path)) if slo else SchedulerConfig()
        e = engine(max_tokens_per_step=256, scheduler=sched)
        early = [e.add_request(p, params, a) for p, a in zip(PROMPTS[:3], ADAPTERS[:3])]
        e.step()  # their prefill (a step without decode rows teaches the decode law nothing)
        late = e.add_request(list(range(5, 105)), params, "demo-r32")
        batch = e.scheduler.schedule()
        assert batch.num_decode == 3 and [r.request_id for r in batch.requests[:3]] == early
        chunks[slo] = batch.chunk_lens[3]
        if slo:
            observed = e.perf_model.decode.observed
            e.step()
            assert e.perf_model.decode.observed == observed  # no prompt-token terms: nothing to learn
        assert e.request(late) is not None
    assert chunks == {2.2: 20, 2.005: e.kv.block_size, 0.0: 100}


def test_a_latency_law_with_prompt_token_terms_learns_from_mixed_steps(tmp_path):
    import json

    import numpy as np

    from caraserve.config import SchedulerConfig
    from caraserve.perf.model import DecodeFeatures, PerfModel, PrefillFeatures, make_header

    rng = np.random.default_rng(0)
    ranks = rng.choice([8, 16, 64], 40)  # two ranks at least, or no rank term can be fitted
    dec = [(DecodeFeatures.of([int(r)] * int(b), [int(t)], [int(r)]), 0.002 + 1e-4 * b + 1e-5 * t)
           for b, t, r in zip(rng.integers(1, 9, 40), rng.integers(0, 200, 40), ranks)]
    pre = [(PrefillFeatures.of([int(t)], [int(r)]), 0.001 + 1e-5 * t) for t, r in zip(rng.integers(8, 200, 20), ranks)]
    model = PerfModel.fit(dec, pre, make_header("test", "tiny", "float32"))
    assert "tokens" in model.decode.terms
    path = tmp_path / "latency.json"
    path.write_text(json.dumps({"model": model.to_dict()}))
    e = engine(max_tokens_per_step=256, scheduler=SchedulerConfig(slo_ms=1000.0, perf_model=str(path)))
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    for p, a in zip(PROMPTS[:3], ADAPTERS[:3]):
        e.add_request(p, params, a)
    e.step()
    e.add_request(list(range(5, 105)), params, "demo-r32")
    e.step()  # three decode rows and the new prompt
    assert e.perf_model.decode.observed == 1


def test_mixed_steps_give_the_tokens_of_separate_steps():
    from caraserve.config import SchedulerConfig

    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    prompts = PROMPTS + [list(range(7, 90)), list(range(300, 350))]
    adapters = ADAPTERS + ["demo-r64", None]
    outs = {}
    for mixed in (True, False):
        e = engine(max_tokens_per_step=16, max_batch_size=8, scheduler=SchedulerConfig(mixed_steps=mixed))
        reqs = []
        for p, a in zip(prompts, adapters):  # arrivals spread over the steps
            reqs.append(e.request(e.add_request(p, params, a)))
            e.step()
            e.step()
        while e.has_unfinished():
            e.step()
        outs[mixed] = [r.output_ids for r in reqs]
    assert outs[True] == outs[False]
