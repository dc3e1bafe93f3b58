"""What an answer carries beside its text when the call asks (vLLM's fields).

return_token_ids: a completion's choice has `prompt_token_ids` (its prompt's) and `token_ids`
(those it generated); a chat answer has `prompt_token_ids` once, at its top level, and each choice
its `token_ids`. Streamed, the prompt's ids come with each choice's first chunk (chat: its role
chunk, at the top level), and each chunk has the ids of the tokens generated since the choice's
previous chunk, so they add up to the whole answer's (as vLLM's).

prompt_logprobs: k (caraserve.serve.prompt_logprobs): a completion's choice has its prompt's, a
chat answer its prompt's once, at its top level (not streamed).
"""

from __future__ import annotations

from collections.abc import Callable

from caraserve.request import RequestOutput
from caraserve.serve import prompt_logprobs
from caraserve.serve.choices import TokenTexts
from caraserve.serve.streaming import Chunker, bodies


def add(answer: dict, outs: list[RequestOutput], body, texts: TokenTexts, prompt_ids: Callable[[int], list[int]],
        chat: bool) -> dict:
    """The non-streamed answer with what `body` asks beside the text; prompt_ids(choice index):
    that choice's prompt's."""
    for c, (choice, out) in enumerate(zip(answer["choices"], outs)):
        where = answer if chat else choice  # (a chat answer has one prompt: its fields at the top)
        if body.return_token_ids:
            where["prompt_token_ids"] = list(prompt_ids(c))
            choice["token_ids"] = list(out.output_ids)
        if body.prompt_logprobs is not None:
            where["prompt_logprobs"] = prompt_logprobs.entries(texts, prompt_ids(c), out, body.prompt_logprobs)
    return answer


def streamed(chunker: Chunker, prompt_ids: Callable[[int], list[int]], chat: bool) -> Chunker:
    """chunker's chunks with the ids (a chunk without a choice, the usage chunk, has none)."""

    def with_ids(index: int):
        chunk, state, first = chunker(index), {"sent": 0}, {"first": True}

        def chunk_ids(out: RequestOutput | None, finish: str | None):
            answer = chunk(out, finish)
            for body in bodies(answer):
                if not body["choices"]:
                    continue
                choice = body["choices"][0]
                if first["first"]:
                    (body if chat else choice)["prompt_token_ids"] = list(prompt_ids(index))
                    first["first"] = False
                choice["token_ids"] = [] if out is None else list(out.output_ids[state["sent"]:])
                state["sent"] = state["sent"] if out is None else len(out.output_ids)
            return answer
        return chunk_ids
    return with_ids
