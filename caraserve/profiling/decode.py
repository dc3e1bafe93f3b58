"""The latency sweep behind scripts/profile_decode.py: decode-step and prefill times of the real
engine over batch size x rank mix (x prompt tokens for prefill), each request with an adapter
of its own (distinct adapters, the costly case for the batched kernels)."""

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
    """Rows {kind: decode|prefill, mix, batch_size, ranks, max_rank, sum_ranks, prompt_tokens, seconds}."""
    rows, registered = [], set()
    for mix_name, mix in rank_mixes(ranks).items():
        for bs in batch_sizes:
            names = _adapters_for(engine, mix, bs, registered)
            for tokens in prompt_tokens:
                params = SamplingParams(max_tokens=decode_steps + 2, temperature=0, ignore_eos=True)
                for i, n in enumerate(names):
                    engine.add_request([10 + (i + j) % 500 for j in range(tokens)], params, n)
                t0 = time.perf_counter()
                engine.step()  # all prompts fit one prefill step (max_tokens_per_step permitting)
                seconds = time.perf_counter() - t0
                rows.append({"kind": "prefill", "mix": mix_name, **_features(engine, names, tokens * bs),
                             "tokens_per_request": tokens, "seconds": seconds})
                times = []
                while engine.has_unfinished():
                    t0 = time.perf_counter()
                    outs = engine.step()
                    if outs and len(outs) == bs:
                        times.append(time.perf_counter() - t0)
                if tokens == prompt_tokens[0] and times:
                    rows.append({"kind": "decode", "mix": mix_name, **_features(engine, names, 0),
                                 "seconds": statistics.median(times[1:] or times)})
                if progress is not None:
                    progress.update(1)
    return rows
