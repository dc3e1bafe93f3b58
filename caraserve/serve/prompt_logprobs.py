"""vLLM's `prompt_logprobs: k`: each prompt token's log-probability given the tokens before it,
with its rank and the k most likely tokens there, in vLLM's form: a list over the prompt's tokens,
None for the first (nothing precedes it), then {token id (a string, as JSON keys are): {"logprob",
"rank", "decoded_token"}} holding the prompt's token (its rank among the vocabulary, 1 the most
likely) and the k alternatives (ranks 1..k). A completion's choice carries its prompt's; a chat
answer carries its prompt's once, at the top level. Not with stream: true (as vLLM's)."""

from __future__ import annotations

from caraserve.request import RequestOutput
from caraserve.serve.choices import TokenTexts


def entries(texts: TokenTexts, prompt_ids: list[int], out: RequestOutput, k: int) -> list[dict | None]:
    """out's prompt logprobs (the engine's (logprob, alternatives, rank) per prompt token) in
    vLLM's form, each token read after the prompt's tokens before it; k: the alternatives asked
    for (the engine may hold more, when echo with logprobs asked for more)."""
    result: list[dict | None] = []
    for p, entry in enumerate(out.prompt_logprobs or ()):
        if entry is None:
            result.append(None)
            continue
        logprob, alternatives, rank = entry
        before, at_start = tuple(prompt_ids[max(0, p - texts.CONTEXT) : p]), p <= texts.CONTEXT
        ranked = [(prompt_ids[p], logprob, rank)] + [(t, v, r) for r, (t, v) in enumerate(alternatives[:k], 1)]
        scored: dict[str, dict] = {}
        for token, lp, r in ranked:  # (the prompt's token among the alternatives: once)
            text = texts.one(before, token, at_start)
            scored.setdefault(str(token), {"logprob": lp, "rank": r, "decoded_token": text})
        result.append(scored)
    return result
