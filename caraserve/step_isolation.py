"""Fault isolation inside a step: a request whose own forward or sampling raises fails alone.

When the batched forward raises, each request runs again alone and eagerly (writing the same KV
entries again is harmless), so only the requests whose own forward raises fail. When the
batched sampler raises, the rows are sampled one by one from the generators' states before the
batched attempt, so the requests that do not fail get the tokens they would have got without the
others. When no row is left (every row fails alone, or a step's only request fails), a probe
decides whose fault it is: one row of the step's kind (a prompt token or a decode row) of the
base model through the same forward, or a greedy and a sampled row through the sampler. The
probe runs: those requests' own faults, and the engine serves on. The probe fails too: the
engine's fault, EngineDeadError. A probe runs less than a real step does (no adapter, one
position), so many steps in a row with no row left are the engine's fault as well.
"""

from __future__ import annotations

import logging

import torch

from caraserve.request import Request, RequestState, SamplingParams
from caraserve.sampler import NonFiniteLogits, sample
from caraserve.scheduler import ScheduledBatch
from caraserve.structured_output import CONFLICT, GrammarConflict

log = logging.getLogger(__name__)

# Steps in a row with no row left, each probe passing, none with a row between them, that make a
# fault the engine's: a fault on a path the probe does not take (the requests' own faults are
# rarely that many in a row).
FAILED_STEPS_FATAL = 8

# Why a request whose logits are not finite fails (its own fault, not the engine's)
NONFINITE = "the model's logits for it are NaN or infinite (an adapter whose weights or scaling overflow gives them)"


class EngineDeadError(RuntimeError):
    """A step failed in a way no single request explains: the engine cannot serve any more."""


def who(req: Request, is_decode: bool | None = None) -> str:
    """A request as its failure's log line names it: id, adapter, and the step's kind."""
    step = "" if is_decode is None else ", a decode step" if is_decode else ", a prefill step"
    return f"{req.request_id} (adapter {req.adapter or 'none'}{step})"


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


class StepIsolation:
    """Runs a step's forward and sampling through `runner`, isolating per-request faults."""

    def __init__(self, runner):
        self.runner = runner  # runner.run(batch, eager=...) -> (logits [B, V], row order)
        self._failed_steps = 0  # steps in a row with no row left (FAILED_STEPS_FATAL)

    def forward(self, batch: ScheduledBatch) -> tuple[torch.Tensor | None, list[Request], list[tuple[Request, str]]]:
        """(logits [R, V] or None when no row is left, the request of each row, [(request, why it failed)])."""
        try:
            logits, order = self.runner.run(batch)
            self._failed_steps = 0
            return logits, [batch.requests[i] for i in order], []
        except Exception as e:
            if len(batch.requests) == 1:
                log.exception("step failed on request %s", who(batch.requests[0], batch.is_decode))
                failed = [(batch.requests[0], describe(e))]
                self._probe_forward(failed, batch.is_decode)
                return None, [], failed
            log.warning("a step of %d requests failed (%s): running each alone", len(batch.requests), describe(e))
        rows, reqs, failed = [], [], []
        for req, n in zip(batch.requests, batch.chunk_lens):
            try:
                rows.append(self.runner.run(ScheduledBatch(batch.is_decode, [req], [n]), eager=True)[0])
                reqs.append(req)
            except Exception as e:
                log.exception("step failed on request %s", who(req, batch.is_decode))
                failed.append((req, describe(e)))
        if not rows:
            self._probe_forward(failed, batch.is_decode)
            return None, [], failed
        self._failed_steps = 0
        return torch.cat(rows), reqs, failed

    def _probe_forward(self, failed: list[tuple[Request, str]], is_decode: bool) -> None:
        """Every row of a step failed: runs one row of the base model of the step's kind (a
        prompt token, or a decode row) at position 0 of the KV cache's scratch block (block 0,
        which no request holds), eagerly. EngineDeadError when that fails too, or when
        FAILED_STEPS_FATAL steps in a row have failed so; otherwise the rows' faults were their own."""
        probe = Request("probe", [0], SamplingParams(max_tokens=1), output_ids=[0] if is_decode else [],
                        state=RequestState.DECODE if is_decode else RequestState.PREFILL, block_table=[0])
        try:
            self.runner.run(ScheduledBatch(is_decode, [probe], [1], num_decode=int(is_decode)), eager=True)
        except Exception as e:
            raise EngineDeadError(f"a step's every request failed ({failed[0][1]}), and so does a one-row "
                                  f"forward of the base model ({describe(e)})") from e
        self._failed_steps += 1
        if self._failed_steps >= FAILED_STEPS_FATAL:
            raise EngineDeadError(f"{self._failed_steps} steps in a row failed on every request, the last with "
                                  f"{failed[0][1]}")

    @staticmethod
    def sample(logits: torch.Tensor, reqs: list[Request], generators: list[torch.Generator | None],
               eos_ids=()) -> tuple[list[int], list[float], list[tuple], dict[int, str]]:
        """(token per row, logprob per row, top logprobs per row, {row: why it failed}) for
        logits [R, V] (caraserve.sampler.sample)."""
        params = [r.params for r in reqs]
        histories = [(r.prompt_ids, r.output_ids) for r in reqs]
        grammars = [r.grammar for r in reqs]
        states = {i: g.get_state() for i, g in enumerate(generators) if g is not None}
        try:
            tokens, logprobs, tops = sample(logits, params, generators, histories, eos_ids, grammars)
            return tokens, logprobs, tops, {}
        except (NonFiniteLogits, GrammarConflict) as e:  # those requests' own: the others are sampled as one batch
            bad = {i: NONFINITE if isinstance(e, NonFiniteLogits) else CONFLICT for i in e.rows}
            keep = [i for i in range(len(reqs)) if i not in bad]
            tokens, logprobs, tops = [0] * len(reqs), [0.0] * len(reqs), [()] * len(reqs)
            if keep:
                *kept, kept_bad = StepIsolation.sample(logits[torch.tensor(keep, device=logits.device)],
                                                       [reqs[i] for i in keep], [generators[i] for i in keep],
                                                       eos_ids)
                for values, out in zip(kept, (tokens, logprobs, tops)):
                    for i, v in zip(keep, values):
                        out[i] = v
                bad.update({keep[j]: why for j, why in kept_bad.items()})
            return tokens, logprobs, tops, bad
        except Exception as e:
            log.warning("sampling %d rows failed (%s): sampling each alone", len(reqs), describe(e))
        tokens, logprobs, tops, bad = [0] * len(reqs), [0.0] * len(reqs), [()] * len(reqs), {}
        for i in range(len(reqs)):
            if i in states:
                generators[i].set_state(states[i])
            try:
                (tokens[i],), (logprobs[i],), (tops[i],) = sample(
                    logits[i : i + 1], params[i : i + 1], generators[i : i + 1], histories[i : i + 1], eos_ids,
                    grammars[i : i + 1])
            except Exception as e:
                log.exception("sampling failed on request %s", who(reqs[i]))
                bad[i] = describe(e)
        if len(bad) == len(reqs) > 1:
            StepIsolation._probe_sampler(logits, bad[0])
        return tokens, logprobs, tops, bad

    @staticmethod
    def _probe_sampler(logits: torch.Tensor, why: str) -> None:
        """Sampling failed on every row: samples a greedy and a seeded sampled row of zeros like the
        step's logits. EngineDeadError when that fails too; otherwise the rows' faults were their own."""
        params = [SamplingParams(max_tokens=1, temperature=0),
                  SamplingParams(max_tokens=1, temperature=1.0, top_k=5, top_p=0.9, seed=0)]
        gens = [None, torch.Generator(device=logits.device).manual_seed(0)]
        try:
            sample(logits.new_zeros(2, logits.shape[-1]), params, gens, [([], []), ([], [])])
        except Exception as e:
            raise EngineDeadError(f"sampling failed on a step's every row ({why}), and on a greedy and a sampled row "
                                  f"of zeros ({describe(e)})") from e
