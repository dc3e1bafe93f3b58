"""Offline batch generation: JSONL requests in, JSONL results out, in input order.

Input line: {"id", "prompt" | "prompt_token_ids", "adapter", and sampling fields named as in the
OpenAI API (max_tokens, temperature, top_p, seed, stop) plus vLLM's top_k, ignore_eos,
stop_token_ids}. Output line: {"id", "text", "token_ids", "finish_reason"} or {"id", "error"}.
One bad line yields an error line and never stops the others.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass

from caraserve.lora.checkpoint import AdapterError
from caraserve.request import RequestError, SamplingParams

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
                   "ignore_eos", "n", "logprobs")
KNOWN_FIELDS = {"id", "prompt", "prompt_token_ids", "adapter", *SAMPLING_FIELDS}


@dataclass
class OfflineSummary:
    requests: int
    errors: int
    output_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds > 0 else 0.0


def parse_line(line: str, index: int) -> tuple[str, dict]:
    """(id, kwargs for Engine.add_request); raises RequestError naming what is wrong."""
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise RequestError(f"line {index + 1} is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise RequestError(f"line {index + 1} must be a JSON object")
    rid = str(obj.get("id", index))
    unknown = sorted(set(obj) - KNOWN_FIELDS)
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}")
    if ("prompt" in obj) == ("prompt_token_ids" in obj):
        raise RequestError("give exactly one of 'prompt' (text) or 'prompt_token_ids' (list of ints)")
    prompt = obj.get("prompt", obj.get("prompt_token_ids"))
    if "prompt" in obj and not isinstance(prompt, str):
        raise RequestError("'prompt' must be a string")
    if "prompt_token_ids" in obj and not isinstance(prompt, list):
        raise RequestError("'prompt_token_ids' must be a list of integers")
    adapter = obj.get("adapter")
    if adapter is not None and not isinstance(adapter, str):
        raise RequestError("'adapter' must be a name or null")
    kwargs = {k: obj[k] for k in SAMPLING_FIELDS if k in obj and obj[k] is not None}
    try:
        params = SamplingParams(**kwargs)
    except TypeError as e:
        raise RequestError(str(e)) from e
    return rid, {"prompt": prompt, "params": params, "adapter": adapter}


def run_offline(engine, lines: Iterable[str], progress=None) -> tuple[list[dict], OfflineSummary]:
    """Runs every line through the engine at once (continuous batching does the rest)."""
    results: list[dict | None] = []
    pending: dict[str, tuple[int, str]] = {}  # engine request id -> (output index, user id)
    t0 = time.perf_counter()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        user_id = str(i)
        try:
            user_id, kwargs = parse_line(line, i)
            rid = engine.add_request(**kwargs)
            pending[rid] = (len(results), user_id)
            results.append(None)
        except (RequestError, AdapterError) as e:
            results.append({"id": user_id, "error": str(e)})
    if progress is not None:
        progress.reset(total=len(results))
        progress.update(len(results) - len(pending))
    tokens = 0
    while pending:
        for out in engine.step():
            if not out.finished or out.request_id not in pending:
                continue
            pos, user_id = pending.pop(out.request_id)
            results[pos] = {"id": user_id, "text": out.text, "token_ids": out.output_ids,
                            "finish_reason": out.finish_reason.openai}
            if out.logprobs is not None:
                results[pos]["logprobs"] = out.logprobs
            tokens += len(out.output_ids)
            if progress is not None:
                progress.update(1)
        if pending and not engine.has_unfinished():
            raise RuntimeError("engine stopped with requests pending")
    errors = sum(1 for r in results if "error" in r)
    return results, OfflineSummary(len(results), errors, tokens, time.perf_counter() - t0)
