"""From a request's engine outputs to one choice of an API answer: its streamed chunks and its
non-streamed form, with OpenAI's logprobs.

Completions: {"tokens": [each token's text], "token_logprobs": [...], "top_logprobs": [{text:
logprob} per token] or None, "text_offset": [where each token's text starts in the choice's
text]}. Chat: {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob",
"bytes"}, ...]}, ...]}. A token's text is what it adds after the token before it (TokenTexts;
special tokens add nothing), so the texts of the tokens add up to the choice's text except where
a stop string cut it or a character is split between tokens. A streamed chunk carries the
logprobs of every token since the previous chunk (a token whose text is held back, a partial
character or the start of a stop string, sends its logprobs with the chunk that sends its text).
"""

from __future__ import annotations

from caraserve.request import RequestOutput
from caraserve.serve import protocol as proto


class TokenTexts:
    """A token's text as it reads after the token before it: decode([prev, t]) less decode([prev]),
    special tokens skipped. A SentencePiece tokenizer drops a sequence's leading space, so a token
    decoded alone would lose its own; a byte-level one gives the same text either way. Where the
    pair does not extend the previous token's text (a character split between them), the token's
    own decoding. Remembered per pair, up to a bound; str(id) without a tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._texts: dict[tuple[int | None, int], str] = {}

    def one(self, prev: int | None, t: int) -> str:
        text = self._texts.get((prev, t))
        if text is None:
            text = self._decode(prev, t)
            if len(self._texts) < 1 << 17:
                self._texts[(prev, t)] = text
        return text

    def _decode(self, prev: int | None, t: int) -> str:
        tok = self.tokenizer
        if tok is None:
            return str(t)
        if prev is None:
            return tok.decode([t], skip_special_tokens=True)
        base, both = (tok.decode(ids, skip_special_tokens=True) for ids in ([prev], [prev, t]))
        return both[len(base):] if both.startswith(base) else tok.decode([t], skip_special_tokens=True)

    def __call__(self, ids, prev: int | None = None) -> list[str]:
        """The texts of a run of tokens `ids` that follows token `prev` (None: nothing before)."""
        out = []
        for t in ids:
            out.append(self.one(prev, t))
            prev = t
        return out


def _tokens(texts: TokenTexts, out: RequestOutput, start: int, before: int | None):
    """(texts, logprobs, top alternatives as (text, logprob)s or None) of out's tokens [start:];
    `before`: the token before the first of them."""
    ids = out.output_ids[start:]
    tokens = texts(ids, before)
    tops = None
    if out.top_logprobs is not None:
        prevs = [before, *ids[:-1]]
        tops = [[(texts.one(p, t), lp) for t, lp in top] for p, top in zip(prevs, out.top_logprobs[start:])]
    return tokens, out.logprobs[start:], tops


def _prompt_tokens(texts: TokenTexts, prompt_ids: list[int], out: RequestOutput):
    """_tokens' form of an echoed prompt's tokens (the first has no logprob and no alternatives)."""
    entries = out.prompt_logprobs or [None] * len(prompt_ids)
    logprobs = [None if e is None else e[0] for e in entries]
    prevs = [None, *prompt_ids[:-1]]
    tops = [None if e is None else [(texts.one(p, t), lp) for t, lp in e[1]] for p, e in zip(prevs, entries)]
    return texts(prompt_ids), logprobs, tops


def _before(out: RequestOutput, start: int, prompt_ids: list[int]) -> int | None:
    """The token before out's token `start`: its previous output, else the prompt's last."""
    return out.output_ids[start - 1] if start else (prompt_ids[-1] if prompt_ids else None)


def completion_logprobs(texts: TokenTexts, out: RequestOutput, prompt_ids: list[int], start: int = 0,
                        offset: int = 0, echo: bool = False) -> dict | None:
    """The completion logprobs of out's tokens [start:], their text offsets counted from `offset`
    (None when the request did not ask for logprobs); with `echo`, the prompt's tokens first,
    from the request's prompt logprobs. As OpenAI's, each position's alternatives hold the chosen
    token too: up to `logprobs` + 1 of them."""
    if out.logprobs is None:
        return None
    tokens, logprobs, tops = _tokens(texts, out, start, _before(out, start, prompt_ids))
    if tops is None:
        tops = [[]] * len(tokens)
    if echo:
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


def chat_logprobs(texts: TokenTexts, out: RequestOutput, prompt_ids: list[int], start: int = 0) -> dict | None:
    """The chat logprobs of out's tokens [start:] (None when the request did not ask for them)."""
    if out.logprobs is None:
        return None
    tokens, logprobs, tops = _tokens(texts, out, start, _before(out, start, prompt_ids))
    return {"content": [{**_entry(t, lp), "top_logprobs": [_entry(*alt) for alt in (tops[i] if tops else ())]}
                        for i, (t, lp) in enumerate(zip(tokens, logprobs))]}


def completion_chunker(rid: str, model: str, texts: TokenTexts, prompt_ids: list[int], echoed: str,
                       scored: bool = False):
    """streaming.Chunker of a completion: choice index -> its chunk function. The first chunk of
    a choice carries the echoed prompt (`echoed`, "" without echo) and, when `scored`, the
    logprobs of its tokens."""
    def chunker(index: int):
        state = {"echo": echoed, "sent": 0, "offset": 0 if scored else len(echoed), "scored": scored}

        def chunk(out: RequestOutput | None, finish: str | None) -> dict | None:
            if out is None:
                return proto.completion_chunk(rid, model, "", None, index)
            if not (out.new_text or out.finished):
                return None
            text, state["echo"] = state["echo"] + out.new_text, ""
            logprobs = completion_logprobs(texts, out, prompt_ids, state["sent"], state["offset"], state["scored"])
            state["scored"] = False
            if logprobs is not None:
                state["offset"] += sum(map(len, logprobs["tokens"]))
            state["sent"] = len(out.output_ids)
            return proto.completion_chunk(rid, model, text, finish, index, logprobs)
        return chunk
    return chunker


def chat_chunker(rid: str, model: str, texts: TokenTexts, prompt_ids: list[int]):
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
            logprobs = chat_logprobs(texts, out, prompt_ids, state["sent"])
            state["sent"] = len(out.output_ids)
            return proto.chat_chunk(rid, model, delta, finish, index, logprobs)
        return chunk
    return chunker
