"""Prefix caching over the paged KV cache: shared blocks give the tokens of a cold run, blocks are
never shared across adapters (or across two loads of one adapter name), and cached blocks nobody
holds are evicted least recently released first."""

from __future__ import annotations

import shutil

import pytest
import torch

from caraserve.config import AdapterConfig, EngineConfig
from caraserve.engine import Engine
from caraserve.kv_cache import KVCache, block_hashes
from caraserve.model.tiny import tiny_paths, write_random_adapter
from caraserve.request import RequestError, SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
SYSTEM = list(range(100, 180))  # an 80-token shared prefix: 5 blocks of 16


def engine(**kw) -> Engine:
    kw.setdefault("compile", "false")
    adapters = kw.pop("adapters", AdapterConfig(dir="demo", preload="host"))
    return Engine(EngineConfig(device="cpu", adapters=adapters, **kw))


def cache(blocks=4, block_size=2) -> KVCache:
    return KVCache(blocks, block_size, 1, 4, torch.float32, [torch.device("cpu")])


def test_hashes_chain_over_the_prefix_and_the_adapter():
    a = block_hashes([], [1, 2, 3, 4, 5], 2, "")
    assert len(a) == 2  # full blocks only
    assert block_hashes(a[:1], [1, 2, 3, 4, 5], 2, "") == a  # extending gives the same hashes
    assert block_hashes([], [9, 9, 3, 4], 2, "")[1] != a[1]  # same block tokens, another prefix
    assert block_hashes([], [1, 2, 3, 4], 2, "demo#1") != a  # another adapter
    assert block_hashes([], [1, 2, 3, 4], 2, "demo#2") != block_hashes([], [1, 2, 3, 4], 2, "demo#1")


def test_published_blocks_are_shared_cached_and_evicted_lru():
    kv = cache(blocks=4)
    t1: list[int] = []
    assert kv.grow(t1, 4)  # 2 blocks
    h = block_hashes([], [1, 2, 3, 4], 2, "")
    for block, hh in zip(t1, h):
        kv.publish(block, hh)
    t2: list[int] = []
    hit = kv.match(h)
    assert hit == t1 and kv.evictable_among(hit) == 0
    kv.share(t2, hit)
    kv.free(t1)
    assert kv.free_blocks == 2 and kv.cached_blocks == 2  # still held by t2
    kv.free(t2)
    assert kv.free_blocks == 4 and kv.cached_blocks == 2  # nobody holds them: cached, and free to take
    assert kv.evictable_among(kv.match(h)) == 2
    t3: list[int] = []
    assert kv.grow(t3, 4) and set(t3).isdisjoint(hit)  # empty blocks go first
    t4: list[int] = []
    assert kv.grow(t4, 2) and t4 == [hit[1]]  # then the least recently released cached block
    assert kv.match(h) == [hit[0]]  # block 1's hash is gone; block 0 still found
    with pytest.raises(ValueError, match="twice"):
        kv.free([t3[0], t3[0]])
    with pytest.raises(ValueError, match="empty block table"):
        kv.share(t3, [hit[0]])


def test_reset_forgets_the_cached_blocks_nobody_holds():
    """Benchmarks start each run cold: cached blocks nobody holds are forgotten (and free), those
    a request holds stay cached."""
    kv = cache(blocks=4)
    held, released = [], []
    assert kv.grow(held, 2) and kv.grow(released, 4)
    h_held, h_rel = block_hashes([], [1, 2], 2, ""), block_hashes([], [5, 6, 7, 8], 2, "")
    kv.publish(held[0], h_held[0])
    for block, h in zip(released, h_rel):
        kv.publish(block, h)
    kv.free(released)
    assert kv.cached_blocks == 3 and kv.free_blocks == 3
    assert kv.reset_prefix_cache() == 2
    assert kv.match(h_rel) == [] and kv.match(h_held) == held and kv.free_blocks == 3
    taken: list[int] = []
    assert kv.grow(taken, 6) and sorted(taken) == sorted(set(range(1, 5)) - set(held))


PROMPTS = [SYSTEM + [7, 8, 9], SYSTEM + [40, 41], SYSTEM + [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]]


@pytest.mark.parametrize("adapter", [None, "demo-r16"])
def test_prefix_hits_give_the_tokens_of_a_cold_run(adapter):
    cold = engine(prefix_caching=False)
    want = [cold.generate([p], GREEDY, [adapter])[0].output_ids for p in PROMPTS]
    warm = engine()
    got = []
    for p in PROMPTS:  # one after the other: each later one finds the first one's blocks
        got.append(warm.generate([p], GREEDY, [adapter])[0])
    assert [r.output_ids for r in got] == want
    assert got[0].cached_tokens == 0 and got[1].cached_tokens == 80 and got[2].cached_tokens == 80
    assert warm.kv.hit_tokens == 160 and cold.kv.hit_tokens == 0
    # the same prompt again: everything but its last block comes from the cache
    again = warm.generate([PROMPTS[0]], GREEDY, [adapter])[0]
    assert again.output_ids == want[0] and again.cached_tokens == 80


def test_a_prompt_of_whole_blocks_computes_its_last_block_again():
    """A prompt of exactly k blocks sent again takes k - 1 from the cache: its last token must be
    computed for the first output's logits (a request needs at least one new token)."""
    e = engine()
    prompt = list(range(100, 164))  # 4 blocks of 16
    cold = e.generate([prompt], GREEDY)[0]
    again = e.generate([prompt], GREEDY)[0]
    assert again.error is None and again.output_ids == cold.output_ids
    assert (cold.cached_tokens, again.cached_tokens) == (0, 48)


def test_a_finished_conversation_turn_is_reused_by_the_next():
    """Multi-turn chat: the next turn resends the history with the reply; the reply's blocks are cached too."""
    e = engine()
    first = e.generate([SYSTEM + [5, 6]], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    history = SYSTEM + [5, 6] + first.output_ids  # 112 tokens: 7 full blocks, the last one partly generated
    second = e.generate([history + [9, 9, 9]], GREEDY)[0]
    assert second.cached_tokens == 96  # 6 blocks: the seventh holds the reply's last token, never fed back
    cold = engine(prefix_caching=False).generate([history + [9, 9, 9]], GREEDY)[0]
    assert second.output_ids == cold.output_ids


def test_base_and_adapter_never_share_blocks():
    e = engine()
    e.generate([PROMPTS[0]], GREEDY, [None])
    r = e.generate([PROMPTS[1]], GREEDY, ["demo-r16"])[0]
    assert r.cached_tokens == 0
    r = e.generate([PROMPTS[1]], GREEDY, ["demo-r8"])[0]  # nor two adapters
    assert r.cached_tokens == 0
    assert e.generate([PROMPTS[2]], GREEDY, ["demo-r8"])[0].cached_tokens == 80


def test_an_adapter_loaded_again_under_its_name_never_reuses_its_old_blocks(tmp_path):
    """Unload adapter "x", load other weights as "x": the old blocks hold the old adapter's keys."""
    _, demo = tiny_paths()
    root = tmp_path / "adapters"
    shutil.copytree(demo / "demo-r16", root / "x")
    other = root / "other-weights"
    write_random_adapter(other, 16, 32, ["q_proj", "k_proj", "v_proj", "o_proj"], seed=77)
    e = engine(adapters=AdapterConfig(dir=str(root), preload="host"))
    before = e.generate([PROMPTS[0]], GREEDY, ["x"])[0]
    e.unregister_adapter("x")
    e.register_adapter("x", other)
    after = e.generate([PROMPTS[1]], GREEDY, ["x"])[0]
    assert after.cached_tokens == 0
    fresh = engine(adapters=AdapterConfig(dir=str(root), preload="host"), prefix_caching=False)
    fresh.unregister_adapter("x")
    fresh.register_adapter("x", other)
    assert after.output_ids == fresh.generate([PROMPTS[1]], GREEDY, ["x"])[0].output_ids
    assert before.output_ids != fresh.generate([PROMPTS[0]], GREEDY, ["x"])[0].output_ids  # they differ at all


def test_hits_show_in_the_snapshot_and_a_small_cache_still_completes():
    e = engine(kv_block_size=16, num_kv_blocks=12)  # 192 tokens: one 95-token request and a bit
    outs = e.generate(PROMPTS * 2, GREEDY, [None, "demo-r16", None, "demo-r16", None, "demo-r16"])
    cold = engine(prefix_caching=False)
    assert [r.output_ids for r in outs] == [r.output_ids for r in cold.generate(
        PROMPTS * 2, GREEDY, [None, "demo-r16", None, "demo-r16", None, "demo-r16"])]
    state = e.snapshot()
    assert state.prefix_hit_tokens == e.kv.hit_tokens > 0 and state.prefix_query_tokens >= state.prefix_hit_tokens
    assert state.kv_blocks_cached == e.kv.cached_blocks > 0 and e.kv.free_blocks == 12


def test_a_sibling_waits_for_the_first_prefill_and_shares_it():
    """add_request(after=...): the n completions of one call compute their prompt once."""
    e = engine()
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    first = e.add_request(PROMPTS[2], params, "demo-r16")
    second = e.add_request(PROMPTS[2], params, "demo-r16", after=first)
    sib = e.request(second)
    e.step()  # the first prefills; the sibling waits for it
    assert sib.state.value == "waiting"
    while e.has_unfinished():
        e.step()
    assert sib.cached_tokens == 80 and sib.output_ids == e.generate([PROMPTS[2]], params, ["demo-r16"])[0].output_ids
    with pytest.raises(RequestError, match="n=2"):
        e.add_request([1, 2], SamplingParams(n=2))
