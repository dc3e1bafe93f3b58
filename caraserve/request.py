"""Requests, their sampling parameters and their lifecycle."""

from __future__ import annotations

import enum
import math
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from caraserve.structured_output import Grammar, StructuredOutputs


class RequestError(ValueError):
    """A request is invalid (bad parameters, unknown adapter, prompt too long)."""


class CapacityError(RequestError):
    """A valid request the server cannot take now, by a limit of its operator's (a 503, not a 400)."""


class ErrorCause(enum.Enum):
    """Why a request ended with an error."""

    REQUEST = "request"  # its own part of a step raised; the other requests went on
    ADAPTER = "adapter"  # its adapter's weights were refused when first read (the caller named it)
    PARAMS = "params"  # its settings left nothing to sample (a grammar and allowed_token_ids apart): the caller's
    ENGINE = "engine"  # the engine failed as a whole: every request in flight ended
    SHUTDOWN = "shutdown"  # the server stopped before it finished (its drain time ran out)


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


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Temperatures below this sample greedily (as vLLM does): dividing float32 logits by a smaller one
# overflows them, and the distribution is a point mass long before that anyway.
MIN_TEMPERATURE = 1e-5
# Above this the tempered distribution is uniform to float32 precision: a larger value is a mistake.
MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 10.0
MAX_LOGIT_BIAS = 1024  # entries of one request's logit_bias
DETOK_CONTEXT = 5  # prompt tokens before the output its detokenization reads (vLLM's offset)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _utf8(text: str) -> bool:
    try:
        text.encode()
        return True
    except UnicodeEncodeError:  # a lone surrogate
        return False


def _bad(msg: str):
    raise RequestError(msg)


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of the sampler. Every field is checked against what the step can
    represent (integers that reach torch fit int64, temperatures meaningful in float32), so a
    value that passes here cannot make a step raise."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0 = off; values past the vocabulary mean off too
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one (0 = off)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False  # a stop string that ends the text stays in it
    skip_special_tokens: bool = True  # texts leave special tokens out (false: their text is in, vLLM's)
    ignore_eos: bool = False
    n: int = 1
    logprobs: bool = False  # log-probability of each chosen token (vLLM's int N: also top_logprobs=N)
    top_logprobs: int = 0  # with logprobs: also the this many most likely tokens at each position
    prompt_logprobs: int | None = None  # each prompt token's logprob and this many alternatives (None: off)
    # Logit adjustments (caraserve.sampler.adjust_logits states them): OpenAI's presence and
    # frequency penalties and logit_bias ({token id: bias}), vLLM's repetition_penalty and min_tokens
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()
    allowed_token_ids: tuple[int, ...] | None = None  # vLLM's: only these may be sampled (None: any)
    cache_salt: str | None = None  # vLLM's: prefix-cache blocks are shared only within one salt
    priority: int = 0  # vLLM's: with scheduler.policy=priority, lower values are served first
    # vLLM's bad_words: words never generated. Engine.add_request tokenizes them into
    # bad_words_token_ids (input_checks.bad_words_ids), which a caller may also give itself
    bad_words: tuple[str, ...] = ()
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
    # what the output must match (caraserve.structured_output; a mapping of its fields is taken too)
    structured_outputs: StructuredOutputs | None = None

    def __post_init__(self):
        self._take_lists()
        self._check_scalars()
        object.__setattr__(self, "logit_bias", self._checked_logit_bias())
        self._check_lists()
        if self.structured_outputs is not None:
            from caraserve.structured_output import StructuredOutputs  # (it imports this module)

            object.__setattr__(self, "structured_outputs", StructuredOutputs.of(self.structured_outputs))

    def _take_lists(self) -> None:
        """stop and stop_token_ids as tuples (stop may be one string)."""
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if not isinstance(self.stop, (list, tuple)) and self.stop is not None:
            _bad(f"stop must be a string or a list of strings, got {type(self.stop).__name__}")
        if not isinstance(self.stop_token_ids, (list, tuple)) and self.stop_token_ids is not None:
            _bad(f"stop_token_ids must be a list of integers, got {type(self.stop_token_ids).__name__}")
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if not isinstance(self.bad_words, (list, tuple)):
            _bad(f"bad_words must be a list of strings, got {type(self.bad_words).__name__}")
        if not isinstance(self.bad_words_token_ids, (list, tuple)) or not all(
                isinstance(w, (list, tuple)) for w in self.bad_words_token_ids):
            _bad("bad_words_token_ids must be a list of lists of token ids")
        object.__setattr__(self, "bad_words", tuple(self.bad_words))
        object.__setattr__(self, "bad_words_token_ids", tuple(map(tuple, self.bad_words_token_ids)))

    def _check_scalars(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            _bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:
            _bad(f"temperature must be a number in [0, {MAX_TEMPERATURE:g}], got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            _bad(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or not -1 <= self.top_k <= INT64_MAX:
            _bad(f"top_k must be -1 (off) or an integer in [0, 2**63 - 1], got {self.top_k!r}")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            _bad(f"min_p must be a number in [0, 1], got {self.min_p!r}")
        for name in ("include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                _bad(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.seed is not None and (not _is_int(self.seed) or not INT64_MIN <= self.seed <= INT64_MAX):
            _bad(f"seed must be an integer in [-2**63, 2**63 - 1], got {self.seed!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                _bad(f"{name} must be a number in [-2, 2], got {value!r}")
        if not _is_number(self.repetition_penalty) or not 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            _bad(f"repetition_penalty must be a number in (0, {MAX_REPETITION_PENALTY:g}], "
                 f"got {self.repetition_penalty!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            _bad(f"min_tokens must be an integer in [0, max_tokens], got {self.min_tokens!r}")
        if not isinstance(self.ignore_eos, bool):
            _bad(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        if self.logprobs is None or _is_int(self.logprobs) and self.logprobs >= 0:  # vLLM's forms: None, or N
            if self.logprobs and self.top_logprobs not in (0, self.logprobs):
                _bad(f"logprobs={self.logprobs} and top_logprobs={self.top_logprobs} disagree (give one)")
            object.__setattr__(self, "top_logprobs", self.logprobs or self.top_logprobs)
            object.__setattr__(self, "logprobs", self.logprobs is not None)
        if not isinstance(self.logprobs, bool):
            _bad(f"logprobs must be true or false, or a number of alternatives >= 0, got {self.logprobs!r}")
        if not _is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= INT64_MAX:
            _bad(f"top_logprobs must be an integer >= 0, got {self.top_logprobs!r}")
        if self.top_logprobs and not self.logprobs:
            _bad("top_logprobs needs logprobs")
        if self.prompt_logprobs is not None and (not _is_int(self.prompt_logprobs) or not
                                                 0 <= self.prompt_logprobs <= INT64_MAX):
            _bad(f"prompt_logprobs must be an integer >= 0, got {self.prompt_logprobs!r}")
        if not _is_int(self.n) or not 1 <= self.n <= INT64_MAX:
            _bad(f"n={self.n!r} must be an integer >= 1")
        if not _is_int(self.priority) or not INT64_MIN <= self.priority <= INT64_MAX:
            _bad(f"priority must be an integer in [-2**63, 2**63 - 1], got {self.priority!r}")

    def _checked_logit_bias(self) -> tuple[tuple[int, float], ...]:
        """logit_bias as ((token id, bias), ...), from a mapping or pairs; token ids may be decimal
        strings (JSON object keys)."""
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        try:  # JSON object keys are strings: OpenAI's logit_bias names token ids as "123"
            bias = tuple((int(t) if isinstance(t, str) and t.isdecimal() else t, b) for t, b in (bias or ()))
        except (TypeError, ValueError):
            _bad("logit_bias must map token ids to numbers")
        if len(bias) > MAX_LOGIT_BIAS:
            _bad(f"logit_bias: at most {MAX_LOGIT_BIAS} entries, got {len(bias)}")
        for t, b in bias:
            if not _is_int(t) or not 0 <= t <= INT64_MAX:
                _bad(f"logit_bias keys must be token ids (integers >= 0), got {t!r}")
            if not _is_number(b) or not -100 <= b <= 100:
                _bad(f"logit_bias values must be numbers in [-100, 100], got {b!r} for token {t}")
        return bias

    def _check_lists(self) -> None:
        if not all(isinstance(s, str) and s for s in self.stop):
            _bad("stop must be a string or a list of non-empty strings")
        if not all(_is_int(t) and 0 <= t <= INT64_MAX for t in self.stop_token_ids):
            _bad("stop_token_ids must be integers in [0, 2**63 - 1]")
        if not all(isinstance(w, str) and w.strip() and _utf8(w) for w in self.bad_words):
            _bad("bad_words must be strings with a character other than whitespace")
        if not all(w and all(_is_int(t) and 0 <= t <= INT64_MAX for t in w) for w in self.bad_words_token_ids):
            _bad("bad_words_token_ids must be non-empty lists of token ids (integers >= 0)")
        if self.cache_salt is not None and not (isinstance(self.cache_salt, str) and 0 < len(self.cache_salt) <= 1024
                                                and _utf8(self.cache_salt)):
            _bad(f"cache_salt must be a non-empty string of at most 1024 characters, got {self.cache_salt!r:.80}")
        if self.allowed_token_ids is not None:
            if not isinstance(self.allowed_token_ids, (list, tuple)) or not self.allowed_token_ids:
                _bad(f"allowed_token_ids must be a non-empty list of token ids, got {self.allowed_token_ids!r}")
            if not all(_is_int(t) and 0 <= t <= INT64_MAX for t in self.allowed_token_ids):
                _bad("allowed_token_ids must be integers in [0, 2**63 - 1]")
            object.__setattr__(self, "allowed_token_ids", tuple(sorted(set(self.allowed_token_ids))))

    @property
    def adjusts(self) -> bool:
        """Whether any logit adjustment applies (the sampler skips the others' rows)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.min_tokens or self.logit_bias or self.allowed_token_ids is not None
                    or self.bad_words_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1


def choice_params(params: SamplingParams, i: int) -> SamplingParams:
    """The params of completion i of a request's n (the server's and offline jobs' alike): one
    completion, sampled with seed + i (wrapped into int64 as SamplingParams takes seeds), so the
    completions differ, reproducibly; completion 0 keeps the seed."""
    seed = None if params.seed is None else (params.seed + i + 2**63) % 2**64 - 2**63
    return replace(params, n=1, seed=seed)


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
    output_top_logprobs: list[tuple[tuple[int, float], ...]] = field(default_factory=list)  # (token, logprob)s
    # with logprobs and a tokenizer: the text each output token added (OutputProcessor.detokenize),
    # which add up to the output's text until a stop string cuts it
    output_texts: list[str] = field(default_factory=list)
    # with params.prompt_logprobs: per prompt position, None for the first, else (logprob, alternatives, rank)
    prompt_logprobs: list = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: str | None = None
    error_cause: ErrorCause | None = None
    block_table: list[int] = field(default_factory=list)  # its KV blocks, in position order
    num_computed: int = 0  # tokens of the prefill (prefill_ids) already in the KV cache
    # Output tokens that are part of the prefill: after a preemption the request recomputes its
    # prompt and the tokens it had generated, then goes on decoding.
    recompute: int = 0
    preemptions: int = 0
    rope_long: bool = False  # it turns with longrope's long factors: it outgrew the original context
    # Prefix caching: the adapter registration the KV depends on ("" = base model), the hashes of
    # the request's full blocks so far, how many of its blocks are published, and the prompt
    # tokens its first admission found cached.
    adapter_key: str = ""
    after: Request | None = None  # a sibling of the same prompt (n > 1): admitted once its prefill is done
    block_hashes: list[bytes] = field(default_factory=list)
    published_blocks: int = 0
    cached_tokens: int = 0
    first_token_s: float | None = None
    finish_s: float | None = None
    cold_start: bool = False  # its adapter was not resident on arrival
    cpu_assisted: bool = False  # prefilled (at least partly) with the LoRA delta from the CPU
    adapter_read: Future | None = None  # the host read of its adapter it waits for
    # While its adapter was loading: prefill layer passes whose LoRA delta came from the CPU, and
    # those that read the layers of its device slot already landed.
    assist_cpu_layers: int = 0
    assist_device_layers: int = 0
    text: str = ""  # detokenized output (filled when a tokenizer is present)
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it (vLLM's)
    # The caller takes the request's output once, when it ends (offline generation): no output
    # per step, and its text decoded once at the end unless stop strings must watch it grow.
    final_only: bool = False
    # Incremental detokenization's window over the whole sequence (prompt, then outputs): tokens
    # [prefix, read) are text already (OutputProcessor.detokenize; set in __post_init__)
    detok_prefix: int = 0
    detok_read: int = 0
    text_sent: int = 0  # with stop strings: characters of `text` streamed so far (the rest may begin one)
    grammar: Grammar | None = None  # with params.structured_outputs: its matcher (Engine.add_request)

    def __post_init__(self):
        self.detok_prefix, self.detok_read = self.detok_start()

    def detok_start(self) -> tuple[int, int]:
        """The detokenization window at the output's start: the output's text is read after the
        prompt's last DETOK_CONTEXT tokens, as vLLM's detokenizer reads it (a SentencePiece
        decoder drops a sequence's leading space: the first output token decoded alone would
        lose its own)."""
        return max(0, len(self.prompt_ids) - DETOK_CONTEXT), len(self.prompt_ids)

    def sequence(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of the whole sequence: the prompt, then the outputs."""
        n = len(self.prompt_ids)
        if start >= n:
            return self.output_ids[start - n : end - n]
        return self.prompt_ids[start:end] + self.output_ids[: max(0, end - n)]

    @property
    def finished(self) -> bool:
        return self.state is RequestState.FINISHED

    @property
    def prefill_len(self) -> int:
        """Tokens the prefill puts in the cache: the prompt, plus the outputs to recompute."""
        return len(self.prompt_ids) + self.recompute

    def prefill_ids(self, start: int, count: int) -> list[int]:
        """Tokens [start, start + count) of the prefill."""
        n = len(self.prompt_ids)
        if start + count <= n:
            return self.prompt_ids[start : start + count]
        return (self.prompt_ids + self.output_ids[: self.recompute])[start : start + count]

    @property
    def kv_tokens(self) -> int:
        """Positions whose keys and values are in the cache (the prefill's computed tokens, then
        one more per decode step)."""
        return self.num_computed + max(len(self.output_ids) - self.recompute - 1, 0)

    @property
    def context_len(self) -> int:
        """Tokens in the KV cache once the token fed next is in (a decode row's position + 1)."""
        return self.num_computed + len(self.output_ids) - self.recompute

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
    error_cause: ErrorCause | None = None
    logprobs: list[float] | None = None  # of output_ids (with SamplingParams.logprobs)
    # with top_logprobs: the most likely (token, logprob)s at each position of output_ids, best first
    top_logprobs: list[tuple[tuple[int, float], ...]] | None = None
    token_texts: list[str] | None = None  # of output_ids (with logprobs and a tokenizer): Request.output_texts
    # with SamplingParams.prompt_logprobs: per prompt token, None for the first, else (logprob, alternatives, rank)
    prompt_logprobs: list | None = None
    prompt_tokens: int = 0
    ttft_s: float | None = None  # arrival -> first token
    e2e_s: float | None = None  # arrival -> finish (set when finished)
    cold_start: bool = False  # the adapter was not resident when the request arrived
    adapter: str | None = None  # the adapter it named (None: the base model)
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it (vLLM's)
