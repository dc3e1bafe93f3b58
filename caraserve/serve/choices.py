"""From a request's engine outputs to one choice of an API answer: its streamed chunks and its
non-streamed form, with OpenAI's logprobs.

Completions: {"tokens": [each token's text], "token_logprobs": [...], "top_logprobs": [{text:
logprob} per token] or None, "text_offset": [where each token's text starts in the choice's
text]}. Chat: {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob",
"bytes"}, ...]}, ...]}. A token's text is its own decoding (a byte-level token inside a multi-byte
character reads U+FFFD, as vLLM's do), so the texts of the tokens add up to the choice's text
except where a stop string cut it. A streamed chunk carries the logprobs of every token since the
previous chunk (a token whose text is held back, a partial character or the start of a stop
string, sends its logprobs with the chunk that sends its text).
"""

from __future__ import annotations

from caraserve.request import RequestOutput
from caraserve.serve import protocol as proto


class TokenTexts:
    """Token id -> its text (its own decoding), remembered per id; str(id) without a tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, ids) -> list[str]:
        out = []
        for t in ids:
            text = self._texts.get(t)
            if text is None:
                text = self.tokenizer.decode([t]) if self.tokenizer is not None else str(t)
                if len(self._texts) < 1 << 17:
                    self._texts[t] = text
            out.append(text)
        return out


def _tokens(texts: TokenTexts, out: RequestOutput, start: int):
    """(texts, logprobs, top alternatives as (text, logprob)s or None) of out's tokens [start:]."""
    tokens = texts(out.output_ids[start:])
    tops = None
    if out.top_logprobs is not None:
        tops = [list(zip(texts([t for t, _ in top]), [lp for _, lp in top])) for top in out.top_logprobs[start:]]
    return tokens, out.logprobs[start:], tops


def _prompt_tokens(texts: TokenTexts, prompt_ids: list[int], out: RequestOutput):
    """_tokens' form of an echoed prompt's tokens (the first has no logprob and no alternatives)."""
    entries = out.prompt_logprobs or [None] * len(prompt_ids)
    logprobs = [None if e is None else e[0] for e in entries]
    tops = [None if e is None else list(zip(texts([t for t, _ in e[1]]), [lp for _, lp in e[1]])) for e in entries]
    return texts(prompt_ids), logprobs, tops


def completion_logprobs(texts: TokenTexts, out: RequestOutput, start: int = 0, offset: int = 0,
                        prompt_ids: list[int] | None = None) -> dict | None:
    """The completion logprobs of out's tokens [start:], their text offsets counted from `offset`
    (None when the request did not ask for logprobs); with `prompt_ids` (echo), the prompt's
    tokens first, from the request's prompt logprobs. As OpenAI's, each position's alternatives
    hold the chosen token too: up to `logprobs` + 1 of them."""
    if out.logprobs is None:
        return None
    tokens, logprobs, tops = _tokens(texts, out, start)
    if tops is None:
        tops = [[]] * len(tokens)
    if prompt_ids is not None:
        p_tokens, p_logprobs, p_tops = _prompt_tokens(texts, prompt_ids, out)
        tokens, logprobs, tops = p_tokens + tokens, p_logprobs + logprobs, p_tops + tops
    offsets, alternatives = [], []
    for t, lp, top in zip(tokens, logprobs, tops):
        offsets.append(offset)
        offset += len(t)
        if top is None:  # the prompt's first token
            alternatives.append(None)
            continue
        top = dict(top)
        top.setdefault(t, lp)
        alternatives.append(top)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": alternatives, "text_offset": offsets}


def _entry(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "surrogatepass"))}


def chat_logprobs(texts: TokenTexts, out: RequestOutput, start: int = 0) -> dict | None:
    """The chat logprobs of out's tokens [start:] (None when the request did not ask for them)."""
    if out.logprobs is None:
        return None
    tokens, logprobs, tops = _tokens(texts, out, start)
    return {"content": [{**_entry(t, lp), "top_logprobs": [_entry(*alt) for alt in (tops[i] if tops else ())]}
                        for i, (t, lp) in enumerate(zip(tokens, logprobs))]}


def completion_chunker(rid: str, model: str, texts: TokenTexts, echoed: str, prompt_ids: list[int] | None = None):
    """streaming.Chunker of a completion: choice index -> its chunk function. The first chunk of
    a choice carries the echoed prompt (`echoed`, "" without echo) and, with `prompt_ids`, the
    logprobs of its tokens."""
    def chunker(index: int):
        state = {"echo": echoed, "sent": 0, "offset": 0 if prompt_ids is not None else len(echoed),
                 "prompt": prompt_ids}

        def chunk(out: RequestOutput | None, finish: str | None) -> dict | None:
            if out is None:
                return proto.completion_chunk(rid, model, "", None, index)
            if not (out.new_text or out.finished):
                return None
            text, state["echo"] = state["echo"] + out.new_text, ""
            logprobs = completion_logprobs(texts, out, state["sent"], state["offset"], state["prompt"])
            state["prompt"] = None
            if logprobs is not None:
                state["offset"] += sum(map(len, logprobs["tokens"]))
            state["sent"] = len(out.output_ids)
            return proto.completion_chunk(rid, model, text, finish, index, logprobs)
        return chunk
    return chunker


def chat_chunker(rid: str, model: str, texts: TokenTexts):
    """streaming.Chunker of a chat completion: the first chunk of a choice names the role."""
    def chunker(index: int):
        state = {"first": True, "sent": 0}

        def chunk(out: RequestOutput | None, finish: str | None) -> dict | None:
            if out is None:
                return proto.chat_chunk(rid, model, {}, None, index)
            if not (out.new_text or out.finished):
                return None
            text = out.new_text
            delta = {"role": "assistant", "content": text} if state["first"] else ({"content": text} if text else {})
            state["first"] = False
            logprobs = chat_logprobs(texts, out, state["sent"])
            state["sent"] = len(out.output_ids)
            return proto.chat_chunk(rid, model, delta, finish, index, logprobs)
        return chunk
    return chunker
