"""What the ingress, the request router and the replicas pass each other through Ray Serve."""

from __future__ import annotations

from dataclasses import dataclass

from caraserve.serve import protocol as proto


@dataclass(frozen=True)
class RouteHint:
    """The first argument of every call to a replica: what the request router reads
    (`pending_request.args[0]`). adapter: the requested model name (an adapter or the base
    model; the router looks its rank up in the replicas' states). request_id: the engine's id
    for the request; attempt: 0, then 1, 2... for retries of the same request (the router keeps
    them off replicas already tried). covered: for calls that go to every replica in turn
    (adapter loads, model lists), the replicas already done (their unique ids). target: the one
    replica the call must reach when it is up (a runtime adapter re-loaded onto a replica that
    Serve started after the adapter was loaded, and the request retried there). rank: the
    adapter's rank where the ingress knows it (loaded through it), for the polls that do not
    list the adapter yet. origin: the id of the request's first attempt (retries have ids of their
    own, the replicas already tried are kept under this one). requests: the engine requests the
    call makes (n completions of each prompt), each of prompt_tokens."""

    adapter: str = ""
    prompt_tokens: int = 1
    max_tokens: int = 16
    request_id: str = ""
    attempt: int = 0
    origin: str = ""
    requests: int = 1
    covered: frozenset[str] | None = None
    target: str = ""
    rank: int = 0


@dataclass(frozen=True)
class Head:
    """A replica's first answer to a call: a complete JSON answer (body; an error when status is
    not 200, with the headers the client must see), or, with body None, the start of a stream
    (SSE lines follow). replica: the unique id of the replica that answered."""

    status: int = 200
    body: dict | None = None
    headers: dict[str, str] | None = None
    replica: str = ""
    skipped: bool = False  # a fan-out call that reached a replica already covered: nothing was done


def estimate_prompt_tokens(body) -> int:
    """The ingress has no tokenizer: token ids are counted, text is taken at ~4 bytes a token."""
    if isinstance(body, proto.ChatCompletionRequest):
        return max(1, sum(len(m.text().encode()) + 16 for m in body.messages) // 4)  # + role and template
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):  # a list of prompts: all of them
        return sum(_prompt_tokens(p) for p in prompt)
    return _prompt_tokens(prompt)


def _prompt_tokens(prompt) -> int:
    if isinstance(prompt, list):
        return max(1, len(prompt))
    return max(1, len(str(prompt or "").encode()) // 4)
