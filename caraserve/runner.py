"""ModelRunner: turns a scheduled batch into tensors, runs the model, returns logits."""

from __future__ import annotations

import torch

from caraserve.kv_cache import KVCache
from caraserve.lora.device_pool import DevicePool
from caraserve.model.batch import ForwardBatch
from caraserve.model.llama import CausalLM
from caraserve.scheduler import ScheduledBatch


class ModelRunner:
    def __init__(self, model: CausalLM, kv: KVCache, pool: DevicePool, device: torch.device, decode_fn=None):
        self.model = model
        self.kv = kv
        self.pool = pool
        self.device = device
        self.decode_fn = decode_fn  # compiled decode step (graphs.DecodeGraphs) or None for eager

    def run(self, batch: ScheduledBatch, use_lora: bool = True) -> torch.Tensor:
        """Logits [B, V] of each request's last computed token, in the batch's order."""
        reqs = batch.requests
        # Rows ordered by (rank bucket, slot): each bucket and each adapter is one contiguous run.
        order = sorted(range(len(reqs)), key=lambda i: self.pool.sort_key(reqs[i].adapter if use_lora else None))
        tokens, starts, slots, runs = [], [], [], []
        row = 0
        for i in order:
            r, n = reqs[i], batch.chunk_lens[i]
            if batch.is_decode:
                tokens.append([r.last_token])
                starts.append(r.context_len - 1)
            else:
                tokens.append(r.prompt_ids[r.num_computed : r.num_computed + n])
                starts.append(r.num_computed)
            slots.append(r.kv_slot)
            runs.append((row, n, r.adapter if use_lora else None))
            row += n
        lora = self.pool.make_batch(runs, batch.is_decode, self.device)
        logits = None
        if batch.is_decode and self.decode_fn is not None:
            logits = self.decode_fn(tokens, starts, slots, lora)
        if logits is None:
            fb = ForwardBatch.build(tokens, starts, slots, self.device, batch.is_decode, lora)
            logits = self.model(fb, self.kv.layers)
        inverse = torch.empty(len(order), dtype=torch.int64)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return logits[inverse.to(logits.device)]
