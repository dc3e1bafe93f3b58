"""`use_beam_search: true` (vLLM's) on completions and chat: the call's n is the beam width and
its n choices are the best beams, best first (caraserve.beam_search). Each search step is one
batch of one-token engine requests, as other calls' requests are (ids `{id}-beam{step}`). Of the
fields, max_tokens, length_penalty, ignore_eos, include_stop_str_in_output, skip_special_tokens,
priority and cache_salt apply, and a chat's reasoning parser; temperature and seed are taken and
change nothing (the ranking reads the model's own log-probabilities, as vLLM's). Any other field
that would change the answer is refused by name (a 400), as is `stream`, rather than ignored;
a value that changes nothing (an empty list, top_k -1 or 0, logprobs false, response_format
text) is taken. Usage reports no cached tokens."""

from __future__ import annotations

from dataclasses import replace

from caraserve.beam_search import Beam, BeamSearch, BeamSearchParams, advance, check_width, pending, step_fit
from caraserve.request import RequestError
from caraserve.serve import choices
from caraserve.serve import protocol as proto
from caraserve.serve.http import BadRequest, ClientClosed

# fields that change the answer and that a beam search does not read
NOT_WITH_BEAMS = ("stream", "stop", "stop_token_ids", "logprobs", "top_logprobs", "prompt_logprobs", "echo",
                  "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "min_tokens", "min_p",
                  "top_p", "top_k", "allowed_token_ids", "bad_words", "response_format", "structured_outputs",
                  "guided_json", "guided_regex", "guided_choice", "guided_grammar", "tools", "functions",
                  "return_token_ids", "return_tokens_as_token_ids")
NEUTRAL = {"top_k": (0, -1), "response_format": ({"type": "text"},)}  # beyond each field's default, None, empty


def _neutral(name: str, value, default) -> bool:
    """Whether a field's value changes nothing: its default, None, false, empty, or NEUTRAL's."""
    return value is None or value is False or value == default or value in ([], {}, "") or value in NEUTRAL.get(
        name, ())


def check(body: proto._Sampling) -> None:
    """BadRequest naming a field set to something a beam search does not serve."""
    fields = type(body).model_fields
    for name in NOT_WITH_BEAMS:
        if name in fields and name in body.model_fields_set and not _neutral(name, getattr(body, name),
                                                                              fields[name].default):
            raise BadRequest(f"{name} is not served with use_beam_search (a beam search reads n, max_tokens, "
                             "length_penalty, ignore_eos, include_stop_str_in_output, skip_special_tokens, "
                             "priority and cache_salt)")


def params_of(service, body: proto._Sampling, max_tokens: int) -> BeamSearchParams:
    try:
        params = BeamSearchParams(beam_width=body.n, max_tokens=max_tokens, ignore_eos=body.ignore_eos,
                                  temperature=body.temperature if body.temperature is not None else 0.0,
                                  length_penalty=body.length_penalty,
                                  include_stop_str_in_output=body.include_stop_str_in_output)
        check_width(params, service.limits.max_logprobs)
        return params
    except RequestError as e:
        raise BadRequest(str(e)) from e


async def search(service, prompts: list[list[int]], params: BeamSearchParams, body: proto._Sampling, adapter,
                 rid: str, disconnected) -> list[list[Beam]]:
    """Each prompt's best beams; the searches step together, one batch of requests a step."""
    engine = service.engine
    for k, ids in enumerate(prompts):
        try:
            engine.check_fits(len(ids), step_fit(params))
        except RequestError as e:
            raise BadRequest(str(e) if len(prompts) == 1 else f"prompt {k}: {e}") from e
    searches = [BeamSearch(ids, params, frozenset(engine.outputs.eos_ids)) for ids in prompts]
    step_params = replace(searches[0].step_params(), priority=body.priority, cache_salt=body.cache_salt)
    step = 0
    while not all(s.finished for s in searches):
        # a step's requests are short: the caller's leaving is seen here, not in their wait
        if step and disconnected is not None and await disconnected():
            raise ClientClosed("client disconnected", admitted=True)
        # admitted once, at its widest (every prompt's beams), so no later step of a search under
        # way is refused for a queue that filled after it began
        runs = await service.runs.start_prompts(pending(searches), step_params, adapter, f"{rid}-beam{step}", 1,
                                                True, call_size=len(prompts) * params.beam_width,
                                                joins_call=step > 0)
        outs = await service.runs.all_of(runs, disconnected)
        advance(searches, [o.top_logprobs[0] for o in outs])
        step += 1
    return [s.best() for s in searches]


def _texts(service, beams: list[Beam], prompt: list[int], skip_special_tokens: bool) -> list[tuple]:
    """(text, finish reason, generated tokens) of each beam."""
    tok = service.engine.tokenizer
    out = []
    for b in beams:
        gen = b.tokens[len(prompt):]
        text = choices.decode(tok, gen, skip_special_tokens) if tok is not None else ""
        out.append((text, b.finish_reason, gen))
    return out


async def completion(service, body: proto.CompletionRequest, prompts: list[list[int]], max_tokens: int, adapter,
                     rid: str, disconnected) -> dict:
    check(body)
    params = params_of(service, body, max_tokens)
    found = await search(service, prompts, params, body, adapter, rid, disconnected)
    answers, generated = [], 0
    for beams, prompt in zip(found, prompts):
        for text, finish, gen in _texts(service, beams, prompt, body.skip_special_tokens):
            answers.append((text, finish, None, None))
            generated += len(gen)
    return proto.completion_response(rid, body.model, answers, sum(map(len, prompts)), generated)


async def chat(service, body: proto.ChatCompletionRequest, ids: list[int], max_tokens: int, adapter, rid: str,
               disconnected) -> dict:
    check(body)
    params = params_of(service, body, max_tokens)
    [beams] = await search(service, [ids], params, body, adapter, rid, disconnected)
    thinks = service.reasoning
    thinks = thinks.hidden() if thinks is not None and not body.include_reasoning else thinks
    answers = [(choices.chat_message(text, reasoning=thinks)[0], finish, None, None) for text, finish, _ in
               _texts(service, beams, ids, body.skip_special_tokens)]
    return proto.chat_response(rid, body.model, answers, len(ids), sum(len(b.tokens) - len(ids) for b in beams))
