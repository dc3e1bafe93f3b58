"""ModelRunner: turns a scheduled batch into tensors, runs the model, returns logits."""

from __future__ import annotations

from dataclasses import replace

import torch

from caraserve.cpu_assist.handoff import HostSegment
from caraserve.kv_cache import KVCache
from caraserve.lora.batch import LoraBatch
from caraserve.lora.device_pool import AdapterState, DevicePool
from caraserve.model.batch import ForwardBatch
from caraserve.model.llama import CausalLM
from caraserve.request import RequestState
from caraserve.sampler import token_logprobs, token_ranks
from caraserve.scheduler import ScheduledBatch


class ModelRunner:
    def __init__(self, model: CausalLM, kv: KVCache, pool: DevicePool, device: torch.device, decode_fn=None,
                 store=None, handoff=None):
        self.model = model
        self.kv = kv
        self.pool = pool
        self.device = device
        self.decode_fn = decode_fn  # the compiled decode step (graphs.DecodeGraphs, callable) or None: eager
        self.store = store  # host tier, for CPU-assisted rows
        self.handoff = handoff  # cpu_assist Handoff, or None when CPU assist is off

    def run(self, batch: ScheduledBatch, eager: bool = False) -> tuple[torch.Tensor, list[int]]:
        """(logits [B, V] of each request's last computed token, order): row j belongs to
        batch.requests[order[j]]. Rows come in the forward's own order (grouped by adapter), so
        the caller maps rows to requests instead of copying the logits back into batch order.
        eager: skip the compiled decode step (a fault-isolation rerun must not compile a variant)."""
        order, tokens, starts, tables, lora, assisted = self._layout(batch)
        mode = self.model.prepare_lora(lora)
        logits = None
        if batch.is_decode and self.decode_fn is not None and not eager:
            logits = self.decode_fn(tokens, starts, tables, lora)
        if logits is None:
            long = [batch.requests[i].rope_long for i in order] if self.model.args.long_rope_from is not None else None
            fb = ForwardBatch.build(tokens, starts, tables, self.kv.block_size, self.device, batch.is_decode, mode,
                                    long)
            logits = self._forward([batch.requests[i] for i in order], tokens, starts, fb)
        for r, landing in assisted:  # each layer's path was chosen as the forward was launched
            device_layers = sum(landing.on_device.values())
            r.assist_device_layers += device_layers
            r.assist_cpu_layers += len(landing.on_device) - device_layers
        return logits, order

    def _layout(self, batch: ScheduledBatch):
        """The step's rows in the forward's order: (order, token ids and first position per
        request, block tables, the LoraBatch, (request, landing) of the CPU-assisted ones)."""
        reqs = batch.requests

        def slot_adapter(r) -> str | None:
            """The adapter whose device slot the row reads, None for base rows and CPU-assisted ones."""
            if r.adapter is None:
                return None
            if r.state is RequestState.PREFILL and self.pool.state(r.adapter) is not AdapterState.RESIDENT:
                return None
            return r.adapter

        placed = [slot_adapter(r) for r in reqs]  # read once: a copy may land meanwhile
        # Rows ordered by (rank bucket, slot): each bucket and each adapter is one contiguous run.
        order = sorted(range(len(reqs)), key=lambda i: self.pool.sort_key(placed[i]))
        tokens, starts, tables, runs, host, assisted = [], [], [], [], [], []
        row = 0
        for i in order:
            r, n = reqs[i], batch.chunk_lens[i]
            adapter = placed[i]
            if r.adapter is not None and adapter is None:
                # still loading: CPU path, or its slot for the layers already landed
                landing = self.pool.landing(r.adapter, row, n, self.device)
                host.append(HostSegment(row, n, self.store.get(r.adapter), landing))
                assisted.append((r, landing))
            if r.state is RequestState.DECODE:  # a decode step's rows, or a mixed step's decode rows
                tokens.append([r.last_token])
                starts.append(r.context_len - 1)
            else:
                tokens.append(r.prefill_ids(r.num_computed, n))
                starts.append(r.num_computed)
            tables.append(r.block_table)
            runs.append((row, n, adapter))
            row += n
        lora = self.pool.make_batch(runs, batch.is_decode, self.device)
        if host:
            if self.handoff is None:
                raise RuntimeError("a prefill row's adapter is not resident and CPU assist is off")
            lora = replace(lora, host=tuple(host), handoff=self.handoff) if lora is not None else \
                LoraBatch((), False, tuple(host), self.handoff)
        return order, tokens, starts, tables, lora, assisted

    def _forward(self, reqs, tokens, starts, fb: ForwardBatch) -> torch.Tensor:
        """The eager forward's logits of each sequence's last row; prompt logprobs go to the
        requests (in forward order) that want them from the same forward."""
        scored = [(req, k) for k, req in enumerate(reqs) if wants_prompt_logprobs(req, starts[k])]
        if scored:  # their rows' logits too, after each sequence's last row
            ends = torch.tensor([len(t) for t in tokens]).cumsum(0)
            extra = [torch.arange(int(ends[k]) - len(tokens[k]), int(ends[k])) for _, k in scored]
            fb = replace(fb, logit_rows=torch.cat([ends - 1, *extra]).to(self.device))
        logits = self.model(fb, self.kv.layers)
        if scored:
            logits, rest = logits[: len(tokens)], logits[len(tokens) :]
            for req, k in scored:
                add_prompt_logprobs(req, starts[k], rest[: len(tokens[k])])
                rest = rest[len(tokens[k]) :]
        return logits


def wants_prompt_logprobs(req, start: int) -> bool:
    """Whether a prefill row range from position `start` gives prompt logprobs the request still
    lacks (its chunks come in order; a recomputed prefill after a preemption has them already)."""
    return (req.params.prompt_logprobs is not None and req.state is RequestState.PREFILL
            and len(req.prompt_logprobs) == (start + 1 if start else 0) and start < len(req.prompt_ids))


def add_prompt_logprobs(req, start: int, logits: torch.Tensor) -> None:
    """Appends the (logprob, alternatives, rank) of the prompt tokens that rows at positions
    start.. predict (row p: prompt token p + 1; the prompt's first token has none)."""
    if start == 0:
        req.prompt_logprobs.append(None)
    n = min(len(logits), len(req.prompt_ids) - 1 - start)  # rows past the prompt (a recompute's) predict none
    if n > 0:
        targets = torch.tensor(req.prompt_ids[start + 1 : start + 1 + n])
        lps, alts = token_logprobs(logits[:n], targets, [req.params.prompt_logprobs] * n)
        req.prompt_logprobs.extend(zip(lps, alts, token_ranks(logits[:n], targets)))
