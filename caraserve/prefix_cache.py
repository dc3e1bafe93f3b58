"""Automatic prefix caching over the paged KV cache (`caraserve.kv_cache`): a request's full
blocks are published under hashes of their tokens and of everything before them (its adapter's
registration and cache salt included), and a later prompt starts from the longest published
prefix of its own blocks instead of computing them again."""

from __future__ import annotations

from caraserve.kv_cache import KVCache, block_hashes
from caraserve.request import Request


def set_rope(req: Request, long_from: int | None) -> None:
    """longrope (ModelArgs.long_rope_from): a request whose prefill (its prompt, or what it
    recomputes) outgrows the original context turns with the long factors, all its tokens; its
    blocks are then not those of the same tokens turned with the short ones."""
    long = long_from is not None and req.prefill_len > long_from
    if long != req.rope_long:
        req.rope_long, req.block_hashes = long, []


def _key(req: Request) -> str:
    """What the request's keys and values depend on besides its tokens: its adapter's
    registration and cache salt, and whether they turn with longrope's long factors."""
    return req.adapter_key + ("\0rope:long" if req.rope_long else "")


def cached_prefix(kv: KVCache, req: Request) -> list[int]:
    """The published blocks the request's prefill can start from. At least the prefill's last
    token is left to compute: its logits are needed."""
    tokens = req.prompt_ids + req.output_ids[: req.recompute]
    req.block_hashes = block_hashes(req.block_hashes, tokens, kv.block_size, _key(req))
    if req.params.prompt_logprobs is not None and len(req.prompt_logprobs) < len(req.prompt_ids):
        return []  # the prompt's logprobs come from its own rows: every one is computed
    return kv.match(req.block_hashes[: (req.prefill_len - 1) // kv.block_size])


def take_prefix(kv: KVCache, req: Request, hit: list[int], count: bool) -> None:
    """Admits the request onto its cached prefix `hit`: shares the blocks, skips their tokens.
    count: the lookup counts as a prefix-cache query (prefix caching on)."""
    if count and not req.preemptions:  # (a recompute is no new query: vLLM's)
        kv.count_query(req.prefill_len, len(hit))
    if not hit:
        return
    kv.share(req.block_table, hit)
    req.num_computed = len(hit) * kv.block_size
    req.published_blocks = len(hit)
    if not req.preemptions:
        req.cached_tokens = req.num_computed


def publish(kv: KVCache, reqs: list[Request]) -> None:
    """Publishes the blocks a step filled: each request's full blocks whose tokens are all in
    the cache."""
    bs = kv.block_size
    for req in reqs:
        full = req.kv_tokens // bs
        if full <= req.published_blocks or req.finished:
            continue
        tokens = req.prompt_ids + req.output_ids
        req.block_hashes = block_hashes(req.block_hashes, tokens[: full * bs], bs, _key(req))
        for i in range(req.published_blocks, full):
            kv.publish(req.block_table[i], req.block_hashes[i])
        req.published_blocks = full
