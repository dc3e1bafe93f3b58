"""Beam search as vLLM's (`LLM.beam_search`, the server's `use_beam_search`), over the engine's
one-token requests: each step asks for the next token of every live beam with its 2 x width most
likely tokens (the prefix cache holds each beam's earlier blocks, so a step computes little
more than the new tokens), extends each beam by each of them, keeps the `width` best-scored and
sets aside those that end in EOS; after `max_tokens` steps (or when no beam lives) the `width`
best of all are the answer.

Semantics (vLLM's):
    score(beam) = cum_logprob / len(prompt + tokens, less a final EOS) ** length_penalty
    live = [(prompt, 0.0)]
    repeat max_tokens times while live:
        new = [(b + t, b.cum + logprob(t | b)) for b in live for t in top_{2 width}(b)]
        done += [c for c in new if c ends in EOS and not ignore_eos]
        live = the width best by score of the others
    answer = the width best by score of done + live
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from caraserve.request import RequestError


@dataclass(frozen=True)
class BeamSearchParams:
    """beam_width: beams kept, and sequences answered. temperature: taken, as vLLM's, and changes
    nothing: the ranking reads the model's own log-probabilities (those vLLM returns by default).
    include_stop_str_in_output: an answer that ended in EOS keeps it in its tokens. A
    length_penalty so large that a length's power overflows scores as its limit (0 or -inf)."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.beam_width) or self.beam_width < 1:
            raise RequestError(f"beam width (n) must be an integer >= 1, got {self.beam_width!r}")
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise RequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        for name in ("temperature", "length_penalty"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v or abs(v) == float("inf"):
                raise RequestError(f"{name} must be a finite number, got {v!r}")
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}")


@dataclass
class Beam:
    tokens: list[int]  # the prompt's, then the generated ones
    cum_logprob: float = 0.0
    logprobs: list[tuple[tuple[int, float], ...]] = field(default_factory=list)  # per generated token: the top
    finish_reason: str | None = None  # "stop" (EOS) or "length"


@dataclass
class BeamSearch:
    """One prompt's search: `pending()` are the token lists whose next-token alternatives
    `advance` takes (one tuple of (token, logprob), best first, per pending list)."""

    prompt: list[int]
    params: BeamSearchParams
    eos_ids: frozenset[int] = frozenset()
    live: list[Beam] = field(default_factory=list)
    done: list[Beam] = field(default_factory=list)
    steps: int = 0

    def __post_init__(self):
        self.live = [Beam(list(self.prompt))]

    def score(self, beam: Beam) -> float:
        n = len(beam.tokens) - (1 if beam.tokens and beam.tokens[-1] in self.eos_ids else 0)
        try:
            length = float(max(n, 1)) ** self.params.length_penalty
        except OverflowError:
            length = math.inf
        if length == 0.0:  # (a negative penalty past the float range)
            return -math.inf if beam.cum_logprob < 0 else 0.0
        return beam.cum_logprob / length

    def pending(self) -> list[list[int]]:
        return [b.tokens for b in self.live] if self.steps < self.params.max_tokens else []

    def advance(self, tops: list[tuple[tuple[int, float], ...]]) -> None:
        if len(tops) != len(self.live):
            raise ValueError(f"{len(tops)} alternatives for {len(self.live)} beams")
        grown = []
        for beam, top in zip(self.live, tops):
            for token, logprob in top:
                new = Beam(beam.tokens + [token], beam.cum_logprob + logprob, beam.logprobs + [top])
                if token in self.eos_ids and not self.params.ignore_eos:
                    new.finish_reason = "stop"
                    self.done.append(new)
                else:
                    grown.append(new)
        self.live = sorted(grown, key=self.score, reverse=True)[: self.params.beam_width]
        self.steps += 1

    @property
    def finished(self) -> bool:
        return not self.pending()

    def best(self) -> list[Beam]:
        """The answer: the width best of the ended and the live beams, best first (a live one
        ended by length). An EOS that ended one stays in its tokens with include_stop_str_in_output."""
        for beam in self.live:
            beam.finish_reason = "length"
        ranked = sorted(self.done + self.live, key=self.score, reverse=True)[: self.params.beam_width]
        if not self.params.include_stop_str_in_output:
            for beam in ranked:
                if beam.finish_reason == "stop":
                    beam.tokens = beam.tokens[:-1]
        return ranked

    def step_params(self):
        """The one-token request of each pending list: its 2 x width most likely next tokens."""
        from caraserve.request import SamplingParams

        return SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, logprobs=True,
                              top_logprobs=2 * self.params.beam_width)


def beam_search(engine, prompts, params: BeamSearchParams, adapter: str | None = None) -> list[list[Beam]]:
    """vLLM's LLM.beam_search on an Engine: each prompt's (text or token ids) best beams, best
    first; a beam's tokens hold its prompt's first. The searches step together, each step one
    batch of one-token requests."""
    prompts = [prompts] if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)) else prompts
    check_width(params, engine.config.limits.max_logprobs)
    searches = []
    for p in prompts:
        ids = engine.encode(p)
        engine.check_fits(len(ids), step_fit(params))
        searches.append(BeamSearch(ids, params, frozenset(engine.outputs.eos_ids)))
    while not all(s.finished for s in searches):
        reqs = engine.generate(pending(searches), searches[0].step_params(), adapter)
        advance(searches, [r.output_top_logprobs[0] for r in reqs])
    return [s.best() for s in searches]


def pending(searches: list[BeamSearch]) -> list[list[int]]:
    """The token lists of a step of searches that step together: each search's pending, in order."""
    return [t for s in searches for t in s.pending()]


def advance(searches: list[BeamSearch], tops: list[tuple[tuple[int, float], ...]]) -> None:
    """Advances each search by the alternatives of its pending lists (`tops`, one per list of
    `pending(searches)`, in its order)."""
    at = 0
    for s in searches:
        k = len(s.pending())
        if k:
            s.advance(tops[at: at + k])
            at += k


def check_width(params: BeamSearchParams, max_logprobs: int) -> None:
    """A step asks for 2 x width alternatives, within limits.max_logprobs."""
    if 2 * params.beam_width > max_logprobs:
        raise RequestError(f"beam width (n) {params.beam_width}: at most {max_logprobs // 2} "
                           f"(half of limits.max_logprobs, {max_logprobs}: each step reads 2 x width alternatives)")


def step_fit(params: BeamSearchParams):
    """The params whose check_fits says whether a prompt leaves room for the search's tokens."""
    from caraserve.request import SamplingParams

    return SamplingParams(max_tokens=params.max_tokens)
