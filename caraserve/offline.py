"""Offline batch generation: JSONL requests in, JSONL results out, in input order.

Input line: {"id", "prompt" | "prompt_token_ids", "adapter", and sampling fields named as in the
OpenAI API (max_tokens, temperature, top_p, seed, stop, logprobs, n, ...) plus vLLM's (top_k,
min_p, ignore_eos, stop_token_ids, include_stop_str_in_output, ...): `SAMPLING_FIELDS`; a
structured output as the server takes it: response_format, structured_outputs, guided_*}. Output
line: {"id", "text", "token_ids", "finish_reason", "stop_reason"} (with n > 1: {"id", "choices":
[one such object without "id" per completion]}) or {"id", "error"}.
One bad line yields an error line and never stops the others; a blank line is skipped and counted.
Lines are numbered from 1, in messages and as the id of a line that gives none.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from types import SimpleNamespace

from caraserve.lora.checkpoint import AdapterError
from caraserve.model.generation_config import with_defaults
from caraserve.request import RequestError, SamplingParams, choice_params
from caraserve.serve.constraints import structured_outputs

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
                   "include_stop_str_in_output", "skip_special_tokens", "ignore_eos", "n", "logprobs", "top_logprobs",
                   "prompt_logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens",
                   "logit_bias", "allowed_token_ids", "priority", "bad_words")
# a structured output, in any of the server's forms (caraserve.serve.constraints): at most one
CONSTRAINT_FIELDS = ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                     "guided_grammar", "guided_decoding_backend")
KNOWN_FIELDS = {"id", "prompt", "prompt_token_ids", "adapter", *SAMPLING_FIELDS, *CONSTRAINT_FIELDS}


@dataclass
class OfflineSummary:
    requests: int
    errors: int
    output_tokens: int
    seconds: float
    blank_lines: int = 0  # skipped, not requests
    interrupted: bool = False  # stopped by KeyboardInterrupt (Ctrl-C, or SIGTERM as generate.py maps it)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds > 0 else 0.0


def line_id(obj, number: int):
    """The user's id of a parsed line as it was given (any JSON value but null), else its 1-based
    line number as a string (as in error messages)."""
    if isinstance(obj, dict) and obj.get("id") is not None and _utf8(obj["id"]):
        return obj["id"]
    return str(number)


def _utf8(value) -> bool:
    """Whether a JSON value holds text UTF-8 can carry (a "\\udc80" escape reads as a lone
    surrogate, which strict JSON parsers refuse in the output)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def parse_json_line(line: str, number: int):
    """The line's JSON value: NaN and Infinity (which Python's json reads) are refused, and so is
    a number beyond float range, as strict JSON parsers refuse what they would write back."""
    try:
        obj = json.loads(line, parse_constant=_constant)
        if _has_infinity(obj):
            raise ValueError("a number beyond float64's range")
        return obj
    except (ValueError, RecursionError) as e:
        try:
            line.encode("utf-8")
        except UnicodeEncodeError as u:
            raise LineError(str(number), f"line {number} is not UTF-8 ({_bad_char(line, u.start)})") from None
        raise LineError(str(number), f"line {number} is not valid JSON: {e}") from None


def _has_infinity(value) -> bool:
    if isinstance(value, float):
        return math.isinf(value)
    if isinstance(value, dict):
        return any(_has_infinity(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_infinity(v) for v in value)
    return False


def _bad_char(line: str, at: int) -> str:
    """What stops `line` being UTF-8 at `at`: a byte read as a lone surrogate (surrogateescape)."""
    code = ord(line[at])
    return f"byte 0x{code - 0xDC00:02x} at character {at}" if 0xDC80 <= code <= 0xDCFF else \
        f"character {line[at]!r} at character {at}"


def parse_line(line: str, number: int, defaults: dict | None = None) -> tuple[object, dict]:
    """(id, kwargs for Engine.add_request) of the 1-based line `number`; raises LineError (which
    carries the id when the line had one) naming what is wrong. Bytes that are not UTF-8 come in
    as lone surrogates (scripts/generate.py reads with surrogateescape): such a line is refused.
    defaults: the model's sampling defaults (Engine.sampling_defaults), for the fields the line
    does not set."""
    obj = parse_json_line(line, number)
    rid = line_id(obj, number)

    def bad(msg: str) -> LineError:
        return LineError(rid, f"line {number}: {msg}")

    try:
        line.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad(f"is not UTF-8 ({_bad_char(line, e.start)})") from None
    if not isinstance(obj, dict):
        raise bad("must be a JSON object")
    if not _utf8(obj.get("id")):
        raise bad("'id' holds a lone surrogate (a \\ud800-\\udfff escape), which the output cannot carry as "
                  "strict JSON: the line is named by its number")
    unknown = sorted(set(obj) - KNOWN_FIELDS)
    if unknown:
        raise bad(f"unknown field(s) {unknown}")
    if ("prompt" in obj) == ("prompt_token_ids" in obj):
        raise bad("give exactly one of 'prompt' (text) or 'prompt_token_ids' (list of ints)")
    prompt = obj.get("prompt", obj.get("prompt_token_ids"))
    if "prompt" in obj and not isinstance(prompt, str):
        raise bad("'prompt' must be a string")
    if "prompt_token_ids" in obj and not isinstance(prompt, list):
        raise bad("'prompt_token_ids' must be a list of integers")
    adapter = obj.get("adapter")
    if adapter is not None and not isinstance(adapter, str):
        raise bad("'adapter' must be a name or null")
    kwargs = {k: obj[k] for k in SAMPLING_FIELDS if k in obj and obj[k] is not None}
    if any(obj.get(k) is not None for k in CONSTRAINT_FIELDS):
        if obj.get("response_format") is not None and not isinstance(obj["response_format"], dict):
            raise bad("'response_format' must be an object")
        try:
            kwargs["structured_outputs"] = structured_outputs(SimpleNamespace(**{k: obj.get(k) for k in
                                                                                 CONSTRAINT_FIELDS}))
        except RequestError as e:
            raise bad(str(e)) from None
    lp = kwargs.get("logprobs")
    if type(lp) is int:  # the completions API's form: N alternatives with each token
        if kwargs.get("top_logprobs", lp) != lp:
            raise bad(f"logprobs={lp} and top_logprobs={kwargs['top_logprobs']} disagree (give one)")
        kwargs["logprobs"], kwargs["top_logprobs"] = True, lp
    try:
        params = SamplingParams(**with_defaults(kwargs, kwargs, defaults or {}))
    except (RequestError, TypeError) as e:
        raise bad(str(e)) from None
    return rid, {"prompt": prompt, "params": params, "adapter": adapter}


class LineError(ValueError):
    """A line that cannot become a request; `rid` is the id its error line carries."""

    def __init__(self, rid, message: str):
        super().__init__(message)
        self.rid = rid


def run_offline(engine, lines: Iterable[str], progress=None) -> tuple[list[dict], OfflineSummary]:
    """Runs every line through the engine at once (continuous batching does the rest). Every
    non-blank line gets a result line, in input order: a bad line or a request the engine failed
    gets {"id", "error"}, and nothing stops the others. Interrupted (KeyboardInterrupt) while the
    requests run, it returns what finished and an error for the others, and aborts them."""
    results: list[dict | None] = []
    pending: dict[str, tuple[int, int]] = {}  # engine request id -> (output index, completion index)
    parts: dict[int, tuple[object, list[dict | None]]] = {}  # output index -> (user id, its completions)
    blank = 0
    engine.warm_up()  # engine.compile=true compiles here, before the job's clock starts
    t0 = time.perf_counter()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            blank += 1
            continue
        try:
            user_id, kwargs = parse_line(line, number, engine.sampling_defaults)
            rids = _add(engine, kwargs, user_id, number)
            for i, rid in enumerate(rids):
                pending[rid] = (len(results), i)
            parts[len(results)] = (user_id, [None] * len(rids))
            results.append(None)
        except LineError as e:
            results.append({"id": e.rid, "error": str(e)})
    if progress is not None:
        progress.reset(total=len(results))
        progress.update(len(results) - len(parts))
    tokens, interrupted = 0, False
    try:
        while pending:
            try:
                outs = engine.step()
            except Exception as e:  # the engine as a whole failed: every pending request says so
                outs = engine.fail_all(f"engine failed: {type(e).__name__}: {e}")
            if not outs and engine.scheduler.stalled():
                time.sleep(0.001)  # only waiting on adapter reads or copies: leave their threads the cores
            for out in outs:
                if not out.finished or out.request_id not in pending:
                    continue
                pos, i = pending[out.request_id]
                user_id, done = parts[pos]
                done[i] = {"error": out.error} if out.error is not None else _result(out)
                del pending[out.request_id]
                tokens += len(out.output_ids) if out.error is None else 0
                if all(d is not None for d in done):
                    results[pos] = _line_result(user_id, done)
                    if progress is not None:
                        progress.update(1)
            if pending and not engine.has_unfinished():
                for pos, _ in pending.values():
                    results[pos] = {"id": parts[pos][0], "error": "the engine dropped this request"}
                break
    except KeyboardInterrupt:  # wherever it lands: in a step, a wait, or between outputs
        interrupted = True
        _end_interrupted(engine, pending, results, parts)
    errors = sum(1 for r in results if "error" in r)
    return results, OfflineSummary(len(results), errors, tokens, time.perf_counter() - t0, blank, interrupted)


def _add(engine, kwargs: dict, user_id, number: int) -> list[str]:
    """The engine requests of a line: its n completions, as the server makes them (completion i
    samples with seed + i; the others are admitted once the first has prefilled)."""
    params = kwargs["params"]
    max_n = engine.config.limits.max_n
    if params.n > max_n:
        raise LineError(user_id, f"line {number}: n={params.n} is more than limits.max_n={max_n}")
    rids: list[str] = []
    try:
        for i in range(params.n):
            one = choice_params(params, i) if params.n > 1 else params
            rids.append(engine.add_request(kwargs["prompt"], one, kwargs["adapter"], after=rids[0] if rids else None,
                                           final_only=True))  # the results are written at the end
    except Exception as e:  # whatever a line holds, it fails alone
        for rid in rids:
            engine.abort(rid)
        why = str(e) if isinstance(e, (RequestError, AdapterError)) else f"{type(e).__name__}: {e}"
        raise LineError(user_id, f"line {number}: {why}") from None
    return rids


def _result(out) -> dict:
    result = {"text": out.text, "token_ids": out.output_ids, "finish_reason": out.finish_reason.openai,
              "stop_reason": out.stop_reason}
    if out.logprobs is not None:
        result["logprobs"] = out.logprobs
    if out.top_logprobs is not None:  # per token: [[token id, logprob], ...], best first
        result["top_logprobs"] = [[list(alt) for alt in top] for top in out.top_logprobs]
    if out.prompt_logprobs is not None:  # per prompt token: null, then [logprob, [[id, logprob], ...]]
        result["prompt_logprobs"] = [None if e is None else [e[0], [list(a) for a in e[1]]]
                                     for e in out.prompt_logprobs]
    return result


def _line_result(user_id, done: list[dict]) -> dict:
    """A line's output: its one completion's fields, or with n > 1 every completion in
    "choices"; the first error when a completion failed."""
    failed = next((d for d in done if "error" in d), None)
    if failed is not None:
        return {"id": user_id, **failed}
    return {"id": user_id, **done[0]} if len(done) == 1 else {"id": user_id, "choices": done}


def _end_interrupted(engine, pending: dict, results: list, parts: dict) -> None:
    """After an interrupt: the requests still running are aborted, their lines say so. A second
    Ctrl-C meanwhile, as people press it, must not lose the lines that finished."""
    while True:
        try:
            for rid in list(pending):
                engine.abort(rid)
                del pending[rid]
            break
        except KeyboardInterrupt:
            continue
    for pos, r in enumerate(results):
        if r is None:
            results[pos] = {"id": parts[pos][0], "error": "interrupted before it finished"}
