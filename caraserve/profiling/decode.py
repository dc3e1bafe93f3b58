"""The latency sweep behind scripts/profile_decode.py: decode-step, prefill and mixed-step times
of the real engine over batch size x rank mix (x prompt tokens for prefill and mixed steps), each
request with an adapter of its own (distinct adapters, the costly case for the batched kernels).
A mixed step is a decode step of the batch that also prefills one new prompt whole. The engine
must run without prefix caching (every prompt computed) and with mixed steps."""

from __future__ import annotations

import statistics
import time

from caraserve.lora.synthetic import random_lora
from caraserve.request import SamplingParams

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def rank_mixes(ranks: list[int]) -> dict[str, list[int]]:
    """Homogeneous mixes, one per rank, plus one mixed over all of them (and base only)."""
    mixes = {f"r{r}": [r] for r in ranks}
    mixes["mixed"] = list(ranks)
    mixes["base"] = [0]
    return mixes


def _adapters_for(engine, ranks: list[int], count: int, registered: set) -> list[str | None]:
    names = []
    for i in range(count):
        r = ranks[i % len(ranks)]
        if r == 0:
            names.append(None)
            continue
        name = f"profile-r{r}-{i}"
        if name not in registered:
            engine.store.add(random_lora(name, r, engine.model.args, TARGETS, seed=1000 * r + i))
            registered.add(name)
        names.append(name)
    return names


def _features(engine, names, prompt_tokens) -> dict:
    ranks = [engine.store.info(n).rank if n else 0 for n in names]
    return {"batch_size": len(names), "ranks": ranks, "max_rank": max(ranks), "sum_ranks": sum(ranks),
            "prompt_tokens": prompt_tokens}


def sweep(engine, batch_sizes: list[int], ranks: list[int], prompt_tokens: list[int], decode_steps: int,
          progress=None) -> list[dict]:
    """Rows {kind: decode|prefill|mixed, mix, batch_size, ranks, max_rank, sum_ranks, prompt_tokens,
    seconds}; mixed rows also {prefill_tokens, chunk_rank} of the prompt the decode step carried."""
    cfg = engine.config
    if cfg.prefix_caching or not cfg.scheduler.mixed_steps or cfg.scheduler.slo_ms > 0:
        raise ValueError("the latency sweep needs engine.prefix_caching=false, scheduler.mixed_steps=true and no "
                         "scheduler.slo_ms (every prompt computed whole, in the step it is timed in)")
    need = max(max(batch_sizes) * max(prompt_tokens), max(batch_sizes) + max(prompt_tokens))
    if cfg.max_tokens_per_step < need:
        raise ValueError(f"the latency sweep needs engine.max_tokens_per_step >= {need} (a batch's prompts, or a "
                         "batch's decode rows and one prompt, in one step)")
    rows, registered = [], set()
    for mix_name, mix in rank_mixes(ranks).items():
        for bs in batch_sizes:
            names = _adapters_for(engine, mix, bs, registered)
            for tokens in prompt_tokens:
                first = tokens == prompt_tokens[0]  # decode and mixed steps: once per batch
                params = SamplingParams(max_tokens=decode_steps + 2 + (len(prompt_tokens) if first else 0),
                                        temperature=0, ignore_eos=True)
                for i, n in enumerate(names):
                    engine.add_request([10 + (i + j) % 500 for j in range(tokens)], params, n)
                t0 = time.perf_counter()
                engine.step()  # all prompts fit one prefill step (max_tokens_per_step permitting)
                seconds = time.perf_counter() - t0
                rows.append({"kind": "prefill", "mix": mix_name, **_features(engine, names, tokens * bs),
                             "tokens_per_request": tokens, "seconds": seconds})
                times = [_timed_step(engine, bs) for _ in range(decode_steps)]
                times = [t for t in times if t is not None]
                if first and times:
                    rows.append({"kind": "decode", "mix": mix_name, **_features(engine, names, 0),
                                 "seconds": statistics.median(times[1:] or times)})
                if first:
                    rows += _mixed_rows(engine, mix_name, names, prompt_tokens)
                while engine.has_unfinished():
                    engine.step()
                if progress is not None:
                    progress.update(1)
    return rows


def _timed_step(engine, outputs: int) -> float | None:
    """Seconds of one step, None unless it gave `outputs` outputs (e.g. a request finished early)."""
    t0 = time.perf_counter()
    outs = engine.step()
    return time.perf_counter() - t0 if len(outs) == outputs else None


def _mixed_rows(engine, mix_name: str, names: list[str | None], prompt_tokens: list[int]) -> list[dict]:
    """One mixed step per prompt length: the running batch decodes while a new prompt (of the
    first adapter of the batch, one output token) is prefilled whole in the same step."""
    rows = []
    once = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    for k, tokens in enumerate(prompt_tokens):
        engine.add_request([600 + (k * 131 + j) % 400 for j in range(tokens)], once, names[0])
        seconds = _timed_step(engine, len(names) + 1)  # every decode row and the new prompt
        if seconds is not None:
            chunk_rank = engine.store.info(names[0]).rank if names[0] else 0
            rows.append({"kind": "mixed", "mix": mix_name, **_features(engine, names, 0),
                         "prefill_tokens": tokens, "chunk_rank": chunk_rank, "seconds": seconds})
    return rows
