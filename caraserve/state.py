"""EngineState: the typed snapshot of one engine that everything routing-related reads.

`Engine.snapshot()` produces it; the server's `/v1/state` and a Ray replica's routing stats carry
it as JSON (`to_dict` / `from_dict`); the routing policies turn it into their `ReplicaState`, and
the simulator builds the same views for its simulated replicas. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from caraserve.perf.model import PerfModel


@dataclass(frozen=True)
class RequestView:
    """What a router knows of one request. remaining_tokens: output tokens still to generate
    (for a queued request: all of them). request_id: the engine's id ("" where none is known)."""

    adapter: str
    rank: int
    prompt_tokens: int
    remaining_tokens: int
    request_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "adapter": self.adapter or None, "rank": self.rank,
                "prompt_tokens": self.prompt_tokens, "remaining_tokens": self.remaining_tokens}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RequestView:
        return cls(d.get("adapter") or "", int(d["rank"]), int(d["prompt_tokens"]), int(d["remaining_tokens"]),
                   str(d.get("request_id") or ""))


@dataclass(frozen=True)
class EngineState:
    """One engine between two steps. running: requests in the batch (being prefilled or decoded);
    queued: admitted, waiting for a step to take them. adapters: every registered adapter's rank
    (name -> rank); resident_adapters: those in a device slot now. perf_model: a copy of the
    latency model the scheduler keeps refitting (None without one). model: the served base
    model's name ("" when the engine alone does not know it). kv_blocks_total / kv_blocks_free:
    the paged KV cache's blocks of kv_block_size tokens; preemptions: running requests sent back
    to recompute because KV blocks ran out, since the engine started; kv_blocks_cached: blocks
    published for prefix reuse; prefix_query_tokens / prefix_hit_tokens: prompt tokens looked up
    in the prefix cache and found there."""

    max_batch_size: int
    running: tuple[RequestView, ...] = ()
    queued: tuple[RequestView, ...] = ()
    resident_adapters: frozenset[str] = frozenset()
    adapters: Mapping[str, int] = field(default_factory=dict)
    slo_ms: float = 0.0
    perf_model: PerfModel | None = None
    model: str = ""
    kv_block_size: int = 0
    kv_blocks_total: int = 0
    kv_blocks_free: int = 0
    preemptions: int = 0
    kv_blocks_cached: int = 0
    prefix_query_tokens: int = 0
    prefix_hit_tokens: int = 0

    def __post_init__(self):
        object.__setattr__(self, "adapters", dict(self.adapters))  # a copy the caller cannot change

    @classmethod
    def of(cls, sched, kv, ranks: Mapping[str, int], resident: frozenset[str]) -> EngineState:
        """The state of an engine's scheduler (caraserve.scheduler.Scheduler) and KV cache
        (caraserve.kv_cache.KVCache), with every adapter's rank and the resident ones."""

        def view(r) -> RequestView:
            return RequestView(r.adapter or "", sched.rank_of(r), len(r.prompt_ids),
                               max(r.params.max_tokens - len(r.output_ids), 0), r.request_id)

        perf = sched.perf_model and PerfModel.from_dict(sched.perf_model.to_dict())  # a copy: it keeps changing
        return cls(sched.max_batch_size, tuple(map(view, sched.running)), tuple(map(view, sched.waiting)),
                   resident, ranks, sched.slo_s * 1e3, perf,
                   kv_block_size=kv.block_size, kv_blocks_total=kv.num_blocks, kv_blocks_free=kv.free_blocks,
                   preemptions=sched.num_preemptions, kv_blocks_cached=kv.cached_blocks,
                   prefix_query_tokens=kv.query_tokens, prefix_hit_tokens=kv.hit_tokens)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (the wire form of /v1/state and of a Ray replica's routing stats)."""
        return {"model": self.model, "max_batch_size": self.max_batch_size,
                "running": [v.to_dict() for v in self.running], "queued": [v.to_dict() for v in self.queued],
                "resident_adapters": sorted(self.resident_adapters), "adapters": dict(self.adapters),
                "slo_ms": self.slo_ms,
                "perf_model": self.perf_model.to_dict() if self.perf_model is not None else None,
                "kv_block_size": self.kv_block_size, "kv_blocks_total": self.kv_blocks_total,
                "kv_blocks_free": self.kv_blocks_free, "preemptions": self.preemptions,
                "kv_blocks_cached": self.kv_blocks_cached, "prefix_query_tokens": self.prefix_query_tokens,
                "prefix_hit_tokens": self.prefix_hit_tokens}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EngineState:
        """The inverse of to_dict; raises KeyError / ValueError / TypeError on a malformed state."""
        perf = d.get("perf_model")
        return cls(int(d["max_batch_size"]), tuple(RequestView.from_dict(v) for v in d.get("running") or ()),
                   tuple(RequestView.from_dict(v) for v in d.get("queued") or ()),
                   frozenset(d.get("resident_adapters") or ()),
                   {str(k): int(v) for k, v in (d.get("adapters") or {}).items()}, float(d.get("slo_ms") or 0.0),
                   PerfModel.from_dict(perf) if perf else None, str(d.get("model") or ""),
                   int(d.get("kv_block_size") or 0), int(d.get("kv_blocks_total") or 0),
                   int(d.get("kv_blocks_free") or 0), int(d.get("preemptions") or 0),
                   int(d.get("kv_blocks_cached") or 0), int(d.get("prefix_query_tokens") or 0),
                   int(d.get("prefix_hit_tokens") or 0))
