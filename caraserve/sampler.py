"""Batched token sampling: logit adjustments (penalties, logit_bias, min_tokens) and structured
outputs' grammar masks, then greedy, temperature, min-p, top-k, top-p, per-request seeds."""

from __future__ import annotations

import numpy as np
import torch

from caraserve.request import SamplingParams
from caraserve.structured_output import GrammarConflict, conflicts, mask_logits


def _filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """logits [B, V] float32 (already divided by temperature); top_k [B] int64 (0 = off);
    top_p [B] float32; min_p [B] float32 (0 = off) -> logits at -inf for the tokens less likely
    than min_p times the most likely one, then outside top-k, then outside the top-p nucleus of
    what is left (the most likely token always stays)."""
    if bool((min_p > 0).any()):  # p_t < min_p * p_max  <=>  logit_t < logit_max + log(min_p)
        floor = logits.max(-1, keepdim=True).values + torch.log(min_p)[:, None]
        logits = logits.masked_fill(logits < floor, float("-inf"))
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))
    drop = ranks >= k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    before = probs.cumsum(-1) - probs  # mass strictly before each token: keep while < top_p
    # top_p 1 is off: the float32 running sum reaches 1.0 before the tail of a large vocabulary
    drop |= (before >= top_p[:, None]) & (top_p < 1)[:, None]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def adjust_logits(
    logits: torch.Tensor,  # [B, V] float32
    params: list[SamplingParams],
    histories: list[tuple[list[int], list[int]]],  # (prompt ids, output ids so far) per row
    eos_ids=(),
) -> torch.Tensor:
    """Semantics, for each row whose params adjust (a new tensor; other rows are unchanged):
        logits[t] = -inf                                            for t not in allowed_token_ids
                                                                    (when given)
        logits[t] += logit_bias[t]                                  for t in logit_bias
        logits[t] = logits[t] / r if logits[t] > 0 else logits[t] * r   for t in prompt or output
                                                                    (r = repetition_penalty, vLLM's;
                                                                    a finite logit stays finite, also
                                                                    divided by the temperature)
        logits[t] -= frequency_penalty * count(t in output) + presence_penalty * (t in output)
        logits[t] = -inf  for t in stop_token_ids and (unless ignore_eos) eos_ids,
                          while fewer than min_tokens tokens are out
        logits[w[-1]] = -inf  for w in bad_words_token_ids whose other tokens end the output
                              (always for a one-token w; vLLM's: the prompt is not read)
    in that order. Token ids past the vocabulary are ignored."""
    rows = [i for i, p in enumerate(params) if p.adjusts]
    if not rows:
        return logits
    logits = logits.clone()
    vocab = logits.shape[-1]
    dev = logits.device
    for i in rows:
        p, (prompt, output) = params[i], histories[i]
        row = logits[i]
        if p.allowed_token_ids is not None:
            keep = torch.zeros(vocab, dtype=torch.bool, device=dev)
            keep[torch.tensor([t for t in p.allowed_token_ids if t < vocab], dtype=torch.int64, device=dev)] = True
            row.masked_fill_(~keep, float("-inf"))
        bias = [(t, b) for t, b in p.logit_bias if t < vocab]
        if bias:
            row.index_add_(0, torch.tensor([t for t, _ in bias], device=dev),
                           torch.tensor([b for _, b in bias], dtype=row.dtype, device=dev))
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted({t for t in prompt if t < vocab} | {t for t in output if t < vocab}),
                                dtype=torch.int64, device=dev)
            v = row[seen]
            # a small penalty divides a large logit past float's range: a value that stays finite
            # when the temperature divides it too ranks the token as the infinity would, and
            # leaves the row sampleable
            big = torch.finfo(row.dtype).max * min(p.temperature or 1.0, 1.0)
            # and a penalty below the dtype's smallest normal would be 0 there: -inf (a token
            # allowed_token_ids masked) times 0 is NaN, so it is taken at that smallest normal
            r = max(p.repetition_penalty, torch.finfo(row.dtype).tiny)
            penalized = torch.where(v > 0, v / r, v * r)
            row[seen] = torch.where(torch.isfinite(v), penalized.clamp(-big, big), penalized)
        if (p.frequency_penalty or p.presence_penalty) and output:
            counts = torch.bincount(torch.tensor(output, device=dev), minlength=vocab)[:vocab].to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
        if len(output) < p.min_tokens:
            banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_ids))
            banned = sorted(t for t in banned if t < vocab)
            if banned:
                row[torch.tensor(banned, device=dev)] = float("-inf")
        bad = sorted({w[-1] for w in p.bad_words_token_ids if w[-1] < vocab and len(output) >= len(w) - 1
                      and tuple(output[len(output) - len(w) + 1:]) == w[:-1]})
        if bad:
            row[torch.tensor(bad, device=dev)] = float("-inf")
    return logits


class NonFiniteLogits(ValueError):
    """Rows whose logits hold NaN or an infinity where a token would be chosen: no token can be
    sampled from them (an adapter whose weights or scaling overflow float32 gives them). Raised
    before any generator is used, so the other rows can be sampled again as they were."""

    def __init__(self, rows: list[int]):
        super().__init__(f"rows {rows}: the logits are not finite (NaN or infinite)")
        self.rows = rows


def sample(
    logits: torch.Tensor,  # [B, V] any float dtype
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    histories: list[tuple[list[int], list[int]]] | None = None,  # per row, for the adjustments
    eos_ids=(),
    grammars: list | None = None,  # per row, its structured output's Grammar or None
) -> tuple[list[int], list[float], list[tuple[tuple[int, float], ...]]]:
    """(token per row, logprob per row, top logprobs per row): one token per row, chosen from the
    adjusted logits (`adjust_logits`, then `structured_output.mask_logits`: only tokens a row's
    grammar allows); its log-probability under the model's own (unadjusted, untempered)
    distribution (0.0 for rows whose params do not ask for logprobs: that pass over the
    vocabulary is skipped); and the params' top_logprobs most likely (token, logprob) pairs of
    that distribution, best first (() where not asked)."""
    raw = logits = logits.float()
    if histories is not None:
        logits = adjust_logits(logits, params, histories, eos_ids)
    if grammars is not None and any(g is not None for g in grammars):
        logits = mask_logits(logits.clone() if logits is raw else logits, grammars, raw)
    try:
        return _choose(logits, raw, params, generators)
    except NonFiniteLogits as e:  # rows with nothing to sample: those a grammar emptied are the caller's
        emptied = conflicts(logits, grammars, e.rows)
        if emptied:
            raise GrammarConflict(emptied) from None
        raise


def _choose(logits: torch.Tensor, raw: torch.Tensor, params: list[SamplingParams],
            generators: list[torch.Generator | None]) -> tuple[list[int], list[float], list[tuple]]:
    """`sample` from logits ready to sample (raw: the model's own, for the logprobs)."""
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    wanted = [i for i, p in enumerate(params) if p.logprobs]
    if not sampled and not wanted and logits.device.type == "cpu":
        return _greedy_cpu(logits)
    tokens = _argmax(logits)
    # A row holding NaN has it as its maximum (numpy's argmax and torch's both pick a NaN), so
    # checking the chosen values finds every such row, and rows of +inf or of nothing but -inf.
    # Before sampling from them (on CUDA a NaN probability is a device-side assert); with greedy
    # rows only, the check is read back with the tokens (no extra wait on a GPU).
    finite = torch.isfinite(logits.gather(1, tokens[:, None].to(logits.device))[:, 0])
    if sampled and not bool(finite.all()):
        raise NonFiniteLogits(torch.nonzero(~finite)[:, 0].tolist())
    if sampled:
        idx = torch.tensor(sampled, device=logits.device)
        temps = torch.tensor([params[i].temperature for i in sampled], device=logits.device)
        vocab = logits.shape[-1]  # a top_k past the vocabulary keeps every token, as off does
        top_k = torch.tensor([min(max(params[i].top_k, 0), vocab) for i in sampled], device=logits.device)
        top_p = torch.tensor([params[i].top_p for i in sampled], device=logits.device)
        min_p = torch.tensor([params[i].min_p for i in sampled], device=logits.device)
        probs = _filter(logits[idx] / temps[:, None], top_k, top_p, min_p).softmax(-1)
        for row, i in enumerate(sampled):
            tokens[i] = torch.multinomial(probs[row], 1, generator=generators[i])[0]
    chosen = [0.0] * len(params)
    tops: list[tuple[tuple[int, float], ...]] = [()] * len(params)
    if wanted:
        idx = torch.tensor(wanted, device=logits.device)
        lps, alts = token_logprobs(raw[idx], tokens[idx], [params[i].top_logprobs for i in wanted])
        for row, i in enumerate(wanted):
            chosen[i], tops[i] = lps[row], alts[row]
    tokens, ok = torch.stack((tokens.to(finite.device), finite.to(torch.int64))).tolist()
    if not all(ok):
        raise NonFiniteLogits([i for i, v in enumerate(ok) if not v])
    return tokens, chosen, tops


LOGPROB_ROWS = 256  # rows of float32 log-softmax made at once


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: list[int]
                   ) -> tuple[list[float], list[tuple[tuple[int, float], ...]]]:
    """For logits [R, V] (the model's own) and tokens [R]: each token's log-probability and the
    top[r] most likely (token, logprob) pairs of row r, best first."""
    lps: list[float] = []
    alts: list[tuple[tuple[int, float], ...]] = []
    k = min(max(top, default=0), logits.shape[-1])
    for r0 in range(0, len(logits), LOGPROB_ROWS):  # a prompt's rows a slice at a time: bounded memory
        rows = logits[r0 : r0 + LOGPROB_ROWS].float().log_softmax(-1)
        lps += rows.gather(-1, tokens[r0 : r0 + LOGPROB_ROWS].to(rows.device)[:, None])[:, 0].tolist()
        if k:
            values, ids = rows.topk(k, -1)
            values, ids = values.tolist(), ids.tolist()
            alts += [tuple(zip(ids[r][:n], values[r][:n])) for r, n in enumerate(top[r0 : r0 + LOGPROB_ROWS])]
        else:
            alts += [()] * len(rows)
    return lps, alts


def token_ranks(logits: torch.Tensor, tokens: torch.Tensor) -> list[int]:
    """For logits [R, V] and tokens [R]: each token's rank in its row, 1 for the most likely (ties
    share the better rank), as vLLM reports a prompt token's."""
    ranks: list[int] = []
    for r0 in range(0, len(logits), LOGPROB_ROWS):
        rows = logits[r0 : r0 + LOGPROB_ROWS].float()
        chosen = rows.gather(-1, tokens[r0 : r0 + LOGPROB_ROWS].to(rows.device)[:, None])
        ranks += ((rows > chosen).sum(-1) + 1).tolist()
    return ranks


def _greedy_cpu(logits: torch.Tensor) -> tuple[list[int], list[float], list[tuple]]:
    """`sample` of CPU logits [B, V] float32 whose rows are all greedy without logprobs, in numpy:
    three array operations where the general path takes eight torch ones (after a step has
    flushed the caches, each op's fixed cost is most of the sampling time)."""
    a = logits.numpy()
    tokens = a.argmax(-1)
    finite = np.isfinite(a[np.arange(len(a)), tokens])  # (as in `sample`: NaN rows pick a NaN)
    if not finite.all():
        raise NonFiniteLogits(np.flatnonzero(~finite).tolist())
    return tokens.tolist(), [0.0] * len(a), [()] * len(a)


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """[B, V] -> [B] int64, the first maximum of each row. On CPU numpy's vectorised argmax is
    much faster than torch's reduction for a vocabulary-wide row; both take the first of ties."""
    if logits.device.type == "cpu":
        return torch.from_numpy(logits.numpy().argmax(-1).astype("int64"))
    return logits.argmax(-1)
