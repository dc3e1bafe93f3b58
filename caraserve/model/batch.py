"""The per-step description of a forward pass, passed explicitly down the model."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from caraserve.lora.backend import LORA_NONE


@dataclass(frozen=True)
class ForwardBatch:
    """Packed tokens of B sequences; sequence i owns rows [starts[i], starts[i] + query_lens[i]).

    Prefill (is_decode False): several prompts (or prompt chunks) of different lengths.
    Decode (is_decode True): one token per sequence.
    KV: position p of sequence i lives in block block_tables[i, p // bs] at offset p % bs of the
    paged cache (`caraserve.kv_cache`); unused table entries name the scratch block.
    """

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, absolute position of each token
    slot_mapping: torch.Tensor  # [T] int64, block * bs + offset where each token's key and value go
    block_tables: torch.Tensor  # [B, W] int64, each sequence's blocks in position order
    row_seq: torch.Tensor  # [T] int64, the sequence of each token
    row_lens: torch.Tensor  # [T] int64, positions + 1: the keys each token attends to (before a window)
    query_lens: tuple[int, ...]  # new tokens per sequence
    context_lens: tuple[int, ...]  # tokens in the cache after this step, per sequence
    is_decode: bool
    lora_mode: int = LORA_NONE  # how the LoRA backend finds the step's rows (caraserve.lora.backend)
    lora_rows: tuple[torch.Tensor, torch.Tensor] | None = None  # LORA_ROWS: meta [3, B] int32, scale [B]
    # the rows whose logits the step returns, when not each sequence's last (prompt logprobs)
    logit_rows: torch.Tensor | None = None
    # [T] bool, longrope models: the rows of sequences that turn with the long factors (Rotary);
    # None: the rows at positions past the original context (a decode step's rule)
    rope_long: torch.Tensor | None = None

    @property
    def last_rows(self) -> torch.Tensor:
        """[B] int64 row of each sequence's last token."""
        ends = torch.tensor(self.query_lens, dtype=torch.int64).cumsum(0) - 1
        return ends.to(self.input_ids.device)

    def to(self, device: torch.device | str) -> ForwardBatch:
        """Copy of the index tensors on another device (the LoRA row table stays where it is)."""
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            positions=self.positions.to(device),
            slot_mapping=self.slot_mapping.to(device),
            block_tables=self.block_tables.to(device),
            row_seq=self.row_seq.to(device),
            row_lens=self.row_lens.to(device),
            logit_rows=None if self.logit_rows is None else self.logit_rows.to(device),
            rope_long=None if self.rope_long is None else self.rope_long.to(device),
        )

    @classmethod
    def build(
        cls,
        token_ids: list[list[int]],
        start_positions: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str,
        is_decode: bool,
        lora_mode: int = LORA_NONE,
        rope_long: list[bool] | None = None,
    ) -> ForwardBatch:
        """From host lists: new tokens per sequence, the position of each one's first new token,
        and each sequence's KV block table (enough blocks for its context after this step);
        rope_long: whether each sequence turns with longrope's long factors."""
        if not (len(token_ids) == len(start_positions) == len(block_tables)) or not token_ids:
            raise ValueError("token_ids, start_positions and block_tables must be non-empty and of one length")
        query_lens = tuple(len(t) for t in token_ids)
        if min(query_lens) == 0:
            raise ValueError("every sequence needs at least one new token")
        if is_decode and max(query_lens) != 1:
            raise ValueError("a decode batch has exactly one new token per sequence")
        ctx = tuple(p + n for p, n in zip(start_positions, query_lens))
        for i, (table, c) in enumerate(zip(block_tables, ctx)):
            if len(table) * block_size < c:
                raise ValueError(f"sequence {i}: {len(table)} KV blocks of {block_size} cannot hold {c} positions")
        flat = [t for seq in token_ids for t in seq]
        pos = [p + j for p, n in zip(start_positions, query_lens) for j in range(n)]
        seq = [i for i, n in enumerate(query_lens) for _ in range(n)]
        slot_mapping = [block_tables[i][p // block_size] * block_size + p % block_size for i, p in zip(seq, pos)]
        width = max(len(t) for t in block_tables)
        tables = [list(t) + [0] * (width - len(t)) for t in block_tables]

        def t(v):
            return torch.tensor(v, dtype=torch.int64, device=device)

        positions = t(pos)
        long = None if rope_long is None else torch.tensor([rope_long[i] for i in seq], dtype=torch.bool,
                                                           device=device)
        return cls(t(flat), positions, t(slot_mapping), t(tables), t(seq), positions + 1, query_lens, ctx,
                   is_decode, lora_mode, rope_long=long)
