"""The per-step description of a forward pass, passed explicitly down the model."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from caraserve.lora.batch import LoraBatch


@dataclass(frozen=True)
class ForwardBatch:
    """Packed tokens of B sequences; sequence i owns rows [starts[i], starts[i] + query_lens[i]).

    Prefill (is_decode False): several prompts (or prompt chunks) of different lengths.
    Decode (is_decode True): one token per sequence.
    """

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, absolute position of each token
    token_slots: torch.Tensor  # [T] int64, KV-cache slot of each token's sequence
    slots: torch.Tensor  # [B] int64, KV-cache slot of each sequence
    context_lens_t: torch.Tensor  # [B] int64, tokens in the cache after this step
    query_lens: tuple[int, ...]  # new tokens per sequence
    context_lens: tuple[int, ...]  # same as context_lens_t, on the host
    is_decode: bool
    lora: LoraBatch | None = None
    # Decode with dense KV slots (max slot < 2 B): attention runs over cache slots [0, slot_span)
    # as a view of the cache instead of gathering each sequence's keys. 0 = gather.
    slot_span: int = 0
    slot_context_lens_t: torch.Tensor | None = None  # [slot_span] int64, 1 for slots not in the batch

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def max_context(self) -> int:
        return max(self.context_lens)

    @property
    def last_rows(self) -> torch.Tensor:
        """[B] int64 row of each sequence's last token."""
        ends = torch.tensor(self.query_lens, dtype=torch.int64).cumsum(0) - 1
        return ends.to(self.input_ids.device)

    def to(self, device: torch.device | str) -> ForwardBatch:
        """Copy of the index tensors on another device (the LoRA batch stays where it is)."""
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            positions=self.positions.to(device),
            token_slots=self.token_slots.to(device),
            slots=self.slots.to(device),
            context_lens_t=self.context_lens_t.to(device),
            slot_context_lens_t=None if self.slot_context_lens_t is None else self.slot_context_lens_t.to(device),
        )

    @classmethod
    def build(
        cls,
        token_ids: list[list[int]],
        start_positions: list[int],
        slots: list[int],
        device: torch.device | str,
        is_decode: bool,
        lora: LoraBatch | None = None,
    ) -> ForwardBatch:
        """From host lists: new tokens per sequence, the position of each one's first new token,
        and each sequence's KV slot."""
        if not (len(token_ids) == len(start_positions) == len(slots)) or not token_ids:
            raise ValueError("token_ids, start_positions and slots must be non-empty and of one length")
        query_lens = tuple(len(t) for t in token_ids)
        if min(query_lens) == 0:
            raise ValueError("every sequence needs at least one new token")
        if is_decode and max(query_lens) != 1:
            raise ValueError("a decode batch has exactly one new token per sequence")
        flat = [t for seq in token_ids for t in seq]
        pos = [p + j for p, n in zip(start_positions, query_lens) for j in range(n)]
        tslots = [s for s, n in zip(slots, query_lens) for _ in range(n)]
        ctx = tuple(p + n for p, n in zip(start_positions, query_lens))

        def t(v):
            return torch.tensor(v, dtype=torch.int64, device=device)

        span, slot_ctx = 0, None
        if is_decode and max(slots) < 2 * len(slots):
            span = max(slots) + 1
            per_slot = [1] * span
            for s, c in zip(slots, ctx):
                per_slot[s] = c
            slot_ctx = t(per_slot)
        return cls(t(flat), t(pos), t(tslots), t(slots), t(ctx), query_lens, ctx, is_decode, lora, span, slot_ctx)
