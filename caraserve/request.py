"""Requests, their sampling parameters and their lifecycle."""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field


class RequestError(ValueError):
    """A request is invalid (bad parameters, unknown adapter, prompt too long)."""


class RequestState(enum.Enum):
    WAITING = "waiting"  # queued, not admitted yet
    LOADING_ADAPTER = "loading_adapter"  # admitted, waiting for its adapter's device copy
    PREFILL = "prefill"
    DECODE = "decode"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    LENGTH = "length"
    STOP = "stop"  # a stop string or stop token id
    EOS = "eos"
    ABORT = "abort"
    ERROR = "error"

    @property
    def openai(self) -> str:
        """OpenAI's finish_reason vocabulary."""
        return {"eos": "stop", "stop": "stop", "length": "length", "abort": "abort", "error": "error"}[self.value]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    logprobs: bool = False  # log-probability of each chosen token

    def __post_init__(self):
        def bad(msg):
            raise RequestError(msg)

        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            bad(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            bad(f"top_k must be -1 (off) or a positive integer, got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            bad(f"seed must be an integer, got {self.seed!r}")
        if self.n != 1:
            bad(f"n={self.n!r} is not supported (only n=1)")
        if not all(isinstance(s, str) and s for s in self.stop):
            bad(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            bad(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass(eq=False)  # a request is itself: identity, not field-by-field, in queues and lookups
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None
    arrival_s: float = field(default_factory=time.perf_counter)
    state: RequestState = RequestState.WAITING
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: str | None = None
    kv_slot: int | None = None
    num_computed: int = 0  # prompt tokens already in the KV cache
    first_token_s: float | None = None
    finish_s: float | None = None
    cold_start: bool = False  # its adapter was not resident on arrival
    cpu_assisted: bool = False  # prefilled (at least partly) with the LoRA delta from the CPU
    # While its adapter was loading: prefill layer passes whose LoRA delta came from the CPU, and
    # those that read the layers of its device slot already landed.
    assist_cpu_layers: int = 0
    assist_device_layers: int = 0
    text: str = ""  # detokenized output (filled when a tokenizer is present)
    detok_prefix: int = 0  # incremental detokenization window: tokens [prefix, read) are text already
    detok_read: int = 0

    @property
    def finished(self) -> bool:
        return self.state is RequestState.FINISHED

    @property
    def context_len(self) -> int:
        return self.num_computed + len(self.output_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]


@dataclass(frozen=True)
class RequestOutput:
    """A snapshot of a request after a step: the new tokens, and the final state when finished."""

    request_id: str
    new_token_ids: list[int]
    output_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None
    text: str = ""
    new_text: str = ""
    error: str | None = None
    logprobs: list[float] | None = None
    prompt_tokens: int = 0
    ttft_s: float | None = None  # arrival -> first token
    e2e_s: float | None = None  # arrival -> finish (set when finished)
    cold_start: bool = False  # the adapter was not resident when the request arrived
