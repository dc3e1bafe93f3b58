"""From a request's engine outputs to one choice of an API answer: its streamed chunks and its
non-streamed form, with OpenAI's logprobs.

Completions: {"tokens": [each token's text], "token_logprobs": [...], "top_logprobs": [{text:
logprob} per token] or None, "text_offset": [where each token's text starts in the choice's
text]}. Chat: {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob",
"bytes"}, ...]}, ...]}. A token's text is what it adds after the tokens before it (TokenTexts:
special tokens add nothing, part of a character waits for the token completing it), so the
tokens' texts add up to the choice's text except where a stop string or a stop token cut it. A
streamed chunk carries the logprobs of every token since the previous chunk (a token whose text
is held back, a partial character or the start of a stop string, sends its logprobs with the
chunk that sends its text).
"""

from __future__ import annotations

import time
from dataclasses import replace

from caraserve.request import FinishReason, RequestOutput
from caraserve.serve import protocol as proto
from caraserve.serve.reasoning import OutputSplitter
from caraserve.serve.tool_parsers import ToolParser


def decode(tokenizer, ids: list[int], skip_special_tokens: bool = True) -> str:
    """ids' text without transformers' space clean-up, and (by default) without special tokens,
    as the engine's output text is decoded (OutputProcessor._batch_decoder)."""
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)


class TokenTexts:
    """A token's text as it reads after the tokens before it: decode(before + [t]) less
    decode(before), special tokens skipped (unless skip_special_tokens is false: then they read as
    their own text, as in a request's output text), with up to CONTEXT tokens before it. A SentencePiece
    tokenizer drops a sequence's leading space, so a token decoded alone would lose its own; a
    token holding part of a character (a byte-level or byte-fallback piece) adds nothing until
    the token that completes the character, which adds all of it. So a run of tokens' texts adds
    up to the run's decoded text. Remembered per (tokens before, token), up to a bound; str(id)
    without a tokenizer."""

    CONTEXT = 4  # a character is at most 4 UTF-8 bytes, so at most 4 tokens
    ENGINE_TEXTS = True  # a chosen output token reads as the engine's detokenizer read it (_tokens)

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self._texts: dict[tuple, str] = {}

    def one(self, before: tuple[int, ...], t: int, at_start: bool = False) -> str:
        """t's text after `before`; at_start: `before` is all the sequence holds before t."""
        key = (before, t, at_start)
        text = self._texts.get(key)
        if text is None:
            text = self._decode(before, t, at_start)
            if len(self._texts) < 1 << 17:
                self._texts[key] = text
        return text

    def _decode(self, before: tuple[int, ...], t: int, at_start: bool) -> str:
        tok = self.tokenizer
        if tok is None:
            return str(t)
        # A window cut from a longer sequence may begin inside a character (its first tokens the
        # tail bytes of one): it starts at the first token from which the text reads without a
        # broken character first. A sequence that itself begins so keeps them: its decoded text
        # holds their U+FFFD, and so do its tokens' texts.
        for i in range(1 if at_start else len(before) + 1):
            full = decode(tok, [*before[i:], t], self.skip_special_tokens)
            if not full.startswith("\ufffd"):
                break
        before = before[i:]
        if full.endswith("\ufffd"):  # a character still incomplete: it comes with the token completing it
            return ""
        base = decode(tok, list(before), self.skip_special_tokens).rstrip("\ufffd") if before else ""
        return full[len(base):] if full.startswith(base) else decode(tok, [t], self.skip_special_tokens)

    def __call__(self, ids, before=(), at: int | None = None) -> list[str]:
        """The texts of a run of tokens `ids` that follows the tokens `before` (oldest first);
        at: where ids[0] stands in its sequence (default: `before` is all that comes before it)."""
        ctx = tuple(before)[-self.CONTEXT:]
        seen = len(before) if at is None else at
        out = []
        for t in ids:
            out.append(self.one(ctx, t, seen <= self.CONTEXT))
            ctx = (*ctx, t)[-self.CONTEXT:]
            seen += 1
        return out


class TokenIds(TokenTexts):
    """vLLM's return_tokens_as_token_ids: every token named "token_id:{id}", so tokens that read
    alike (special ones, pieces of a character) stay apart."""

    ENGINE_TEXTS = False

    def __init__(self):
        super().__init__(None)

    def one(self, before: tuple[int, ...], t: int, at_start: bool = False) -> str:
        return f"token_id:{t}"


def _alternatives(texts: TokenTexts, seq: list[int], start: int, tops, shift: int = 0) -> list:
    """Each position's alternatives as (text, logprob)s, read after the tokens before position
    start + i of `seq`, whose first token is token `shift` of its sequence (None for a position
    without any)."""
    return [None if top is None else [(texts.one(tuple(seq[max(0, p - texts.CONTEXT) : p]), t,
                                                 p + shift <= texts.CONTEXT), lp) for t, lp in top]
            for p, top in enumerate(tops, start)]


def _tokens(texts: TokenTexts, out: RequestOutput, start: int, prompt_ids: list[int]):
    """(texts, logprobs, top alternatives as (text, logprob)s or None) of out's tokens [start:],
    read after the prompt and the outputs before them: the chosen tokens' texts those the
    engine's detokenizer gave them (out.token_texts), which add up to the output's text."""
    seq = [*prompt_ids[-texts.CONTEXT:], *out.output_ids]
    shift = len(prompt_ids) - min(len(prompt_ids), texts.CONTEXT)  # seq[0]'s place in the whole sequence
    at = len(seq) - len(out.output_ids) + start  # out's token `start` in seq
    if texts.ENGINE_TEXTS and out.token_texts is not None:
        tokens = list(out.token_texts[start:])
        ended_on_token = out.finish_reason is FinishReason.EOS or (
            out.finish_reason is FinishReason.STOP and isinstance(out.stop_reason, int))
        if tokens and out.finished and ended_on_token:
            # the token that ended it (EOS, a stop token id) reads as its own text, as among its
            # alternatives, though the output's text leaves it out
            last = len(seq) - 1
            tokens[-1] = texts([seq[last]], seq[max(0, last - texts.CONTEXT) : last], last + shift)[0]
    else:
        tokens = texts(seq[at:], seq[max(0, at - texts.CONTEXT) : at], at + shift)
    tops = None if out.top_logprobs is None else _alternatives(texts, seq, at, out.top_logprobs[start:], shift)
    return tokens, out.logprobs[start:], tops


def _prompt_tokens(texts: TokenTexts, prompt_ids: list[int], out: RequestOutput):
    """_tokens' form of an echoed prompt's tokens (the first has no logprob and no alternatives)."""
    entries = out.prompt_logprobs or [None] * len(prompt_ids)
    logprobs = [None if e is None else e[0] for e in entries]
    tops = _alternatives(texts, prompt_ids, 0, [None if e is None else e[1] for e in entries])
    return texts(prompt_ids), logprobs, tops


def completion_logprobs(texts: TokenTexts, out: RequestOutput, prompt_ids: list[int], start: int = 0,
                        offset: int = 0, echo: bool = False) -> dict | None:
    """The completion logprobs of out's tokens [start:], their text offsets counted from `offset`
    (None when the request did not ask for logprobs); with `echo`, the prompt's tokens first,
    from the request's prompt logprobs. As OpenAI's, each position's alternatives hold the chosen
    token too: up to `logprobs` + 1 of them."""
    if out.logprobs is None:
        return None
    tokens, logprobs, tops = _tokens(texts, out, start, prompt_ids)
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
        # Keyed by text, which tokens may share (byte pieces of a character read ""): each text
        # keeps its most likely token's logprob, and the chosen token's text its own.
        entries: dict[str, float] = {}
        for token, v in top:
            entries.setdefault(token, _logprob(v))
        entries[t] = _logprob(lp)
        alternatives.append(entries)
    logprobs = [None if lp is None else _logprob(lp) for lp in logprobs]
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": alternatives, "text_offset": offsets}


def _logprob(value: float) -> float:
    """A logprob as JSON carries it: -inf (a token the model rules out) as -9999.0, as vLLM's
    API sends it (JSON has no infinities; a NaN, which no finished request's logprobs hold, too)."""
    return value if value >= -9999.0 else -9999.0


def _entry(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": _logprob(logprob), "bytes": list(text.encode("utf-8", "surrogatepass"))}


def chat_logprobs(texts: TokenTexts, out: RequestOutput, prompt_ids: list[int], start: int = 0) -> dict | None:
    """The chat logprobs of out's tokens [start:] (None when the request did not ask for them)."""
    if out.logprobs is None:
        return None
    tokens, logprobs, tops = _tokens(texts, out, start, prompt_ids)
    return {"content": [{**_entry(t, lp), "top_logprobs": [_entry(*alt) for alt in (tops[i] if tops else ())]}
                        for i, (t, lp) in enumerate(zip(tokens, logprobs))]}


def prompt_only(out: RequestOutput) -> RequestOutput:
    """out without its generated tokens: the answer to an echo with max_tokens 0 (as vLLM's and
    OpenAI's legacy completions: the prompt echoed and, with logprobs, scored; nothing
    generated). The engine runs such a request for one token, which this drops."""
    return replace(out, new_token_ids=[], output_ids=[], text="", new_text="", stop_reason=None,
                   finish_reason=FinishReason.LENGTH if out.finished and out.error is None else out.finish_reason,
                   logprobs=None if out.logprobs is None else [],
                   top_logprobs=None if out.top_logprobs is None else [],
                   token_texts=None if out.token_texts is None else [])


def usage_counts(outs: list[RequestOutput | None], per_prompt: int) -> tuple[int, int, int]:
    """(prompt, completion, cached prompt) tokens of a call's last outputs, in choice order with
    `per_prompt` choices per prompt (a stream an error ended gives its choices' last outputs so
    far, None for one that sent nothing): each prompt counted once, as OpenAI's usage counts a
    prompt of n choices."""
    groups = [[o for o in outs[k : k + per_prompt] if o is not None] for k in range(0, len(outs), per_prompt)]
    groups = [g for g in groups if g]
    return (sum(g[0].prompt_tokens for g in groups), sum(len(o.output_ids) for g in groups for o in g),
            sum(max(o.cached_tokens for o in g) for g in groups))


class MappedQueue:
    """A request's output queue whose outputs pass through `fn` on the way out (get() is all the
    server's readers call)."""

    def __init__(self, queue, fn):
        self.queue, self.fn = queue, fn

    async def get(self) -> RequestOutput:
        return self.fn(await self.queue.get())


def completion_chunker(rid: str, model: str, texts: TokenTexts, prompt_ids: list[int], echoed: str,
                       scored: bool = False, created: int | None = None):
    """streaming.Chunker of a completion: choice index -> its chunk function. The first chunk of
    a choice carries the echoed prompt (`echoed`, "" without echo) and, when `scored`, the
    logprobs of its tokens. Every chunk carries `created` (the call's: default now)."""
    created = int(time.time()) if created is None else created

    def chunker(index: int):
        state = {"echo": echoed, "sent": 0, "offset": 0 if scored else len(echoed), "scored": scored}

        def chunk(out: RequestOutput | None, finish: str | None) -> dict | None:
            if out is None:
                return proto.completion_chunk(rid, model, "", None, index, created=created)
            if not (out.new_text or out.finished):
                return None
            text, state["echo"] = state["echo"] + out.new_text, ""
            logprobs = completion_logprobs(texts, out, prompt_ids, state["sent"], state["offset"], state["scored"])
            state["scored"] = False
            if logprobs is not None:
                state["offset"] += sum(map(len, logprobs["tokens"]))
            state["sent"] = len(out.output_ids)
            return proto.completion_chunk(rid, model, text, finish, index, logprobs, created,
                                          out.stop_reason if out.finished else None)
        return chunk
    return chunker


def tool_call_chunker(rid: str, model: str, texts: TokenTexts, prompt_ids: list[int], forced):
    """streaming.Chunker of a chat completion whose output is a forced tool call (ForcedTools),
    in OpenAI's form: a named function's call streams as deltas of its `arguments` (the first
    delta names the call); tool_choice "required"'s calls each in one delta once it is whole;
    the finish reason in a chunk of its own. What is streamed adds up to the whole answer."""
    created = int(time.time())

    def chunker(index: int):
        state = {"sent": 0, "text": "", "calls": 0, "call_id": None}

        def chunk(out: RequestOutput | None, finish: str | None) -> dict | None:
            if out is None:
                return proto.chat_chunk(rid, model, {}, None, index, created=created)
            state["text"] += out.new_text
            calls = []
            if forced.name is not None and (out.new_text or (state["call_id"] is None and out.finished)):
                call = {"index": 0, "function": {"arguments": out.new_text}}
                if state["call_id"] is None:
                    state["call_id"] = forced.new_id()
                    call.update(id=state["call_id"], type="function")
                    call["function"]["name"] = forced.name
                calls = [call]
            elif forced.name is None:
                whole = forced.calls(state["text"])
                calls = [{"index": state["calls"] + i, **c} for i, c in enumerate(whole[state["calls"]:])]
                state["calls"] = len(whole)
            if not calls and not out.finished:
                return None  # (its tokens' logprobs go with the next chunk sent)
            logprobs = chat_logprobs(texts, out, prompt_ids, state["sent"])
            state["sent"] = len(out.output_ids)
            finish = forced.finish_reason(finish) if finish else None
            stop_reason = out.stop_reason if out.finished else None
            if not calls:
                return proto.chat_chunk(rid, model, {}, finish, index, logprobs, created, stop_reason)
            body = proto.chat_chunk(rid, model, {"tool_calls": calls}, None, index, logprobs, created)
            return body if finish is None else [body, proto.chat_chunk(rid, model, {}, finish, index, None, created,
                                                                       stop_reason)]
        return chunk
    return chunker


def parsed_chat_chunker(rid: str, model: str, texts: TokenTexts, prompt_ids: list[int], tools=None, reasoning=None,
                        echoed: str = ""):
    """streaming.Chunker of a chat completion whose text goes through a reasoning parser and/or a
    tool parser (tool_choice "auto"): the reasoning and the content as the parsers tell them (text
    that may begin a marker waits), each call in one delta once whole, and after calls the finish
    reason in a chunk of its own. What is streamed adds up to the whole answer (chat_choice)."""
    created = int(time.time())

    def chunker(index: int):
        split, state = OutputSplitter(reasoning, tools), {"echo": echoed, "sent": 0}

        def chunk(out: RequestOutput | None, finish: str | None) -> dict | list[dict] | None:
            if out is None:
                return proto.chat_chunk(rid, model, {}, None, index, created=created)
            thought, content, calls = split.feed(out.new_text, final=out.finished)
            if not (thought or content or calls or out.finished):
                return None  # (its tokens' logprobs go with the next chunk sent)
            content, state["echo"] = state["echo"] + content, ""
            delta = {"reasoning": thought} if thought else {}
            if content:
                delta["content"] = content
            if calls:
                delta["tool_calls"] = [{"index": split.called - len(calls) + i, **tools.tool_call(c)}
                                       for i, c in enumerate(calls)]
            logprobs = chat_logprobs(texts, out, prompt_ids, state["sent"])
            state["sent"] = len(out.output_ids)
            finish = ToolParser.finish_reason(split.called, finish) if finish else None
            stop_reason = out.stop_reason if out.finished else None
            if not (calls and finish):
                return proto.chat_chunk(rid, model, delta, finish, index, logprobs, created, stop_reason)
            return [proto.chat_chunk(rid, model, delta, None, index, logprobs, created),
                    proto.chat_chunk(rid, model, {}, finish, index, None, created, stop_reason)]
        return chunk
    return chunker


def chat_choice(out: RequestOutput, texts: TokenTexts, prompt_ids: list[int], echoed: str = "", forced=None,
                tools=None, reasoning=None) -> tuple[dict, str, dict | None, str | int | None]:
    """A non-streamed chat choice, as proto.chat_response takes it: (message, finish reason,
    logprobs, stop reason); the message of a forced call (ForcedTools: its calls, no content), of
    text through a reasoning parser ("reasoning", and "content" None when empty) and/or a tool
    parser (tool_choice "auto": the calls the output holds, if any), or of text."""
    logprobs, finish = chat_logprobs(texts, out, prompt_ids), out.finish_reason.openai
    if forced is not None:
        message = {"content": None, "tool_calls": forced.calls(out.text)}
        return message, forced.finish_reason(finish), logprobs, out.stop_reason
    message, calls = chat_message(out.text, echoed, tools, reasoning)
    return message, ToolParser.finish_reason(calls, finish), logprobs, out.stop_reason


def chat_message(text: str, echoed: str = "", tools=None, reasoning=None) -> tuple[dict, int]:
    """(message, tool calls in it) of a whole output's text: through a reasoning parser
    ("reasoning", and "content" None when empty) and/or a tool parser, or the text as it is."""
    if tools is None and reasoning is None:
        return {"content": echoed + text}, 0
    split = OutputSplitter(reasoning, tools)
    thought, content, calls = split.feed(text, final=True)
    message = {"content": echoed + content or (None if calls or split.thought else "")}
    if reasoning is not None:
        message["reasoning"] = thought or None
    if calls:
        message["tool_calls"] = [tools.tool_call(c) for c in calls]
    return message, len(calls)


def chat_chunker(rid: str, model: str, texts: TokenTexts, prompt_ids: list[int], echoed: str = ""):
    """streaming.Chunker of a chat completion: a choice's first text chunk carries `echoed` before
    its text (the role comes in a chunk of its own before it: streaming.events). Every chunk of
    the stream carries the same `created`."""
    created = int(time.time())

    def chunker(index: int):
        state = {"first": True, "sent": 0}

        def chunk(out: RequestOutput | None, finish: str | None) -> dict | None:
            if out is None:
                return proto.chat_chunk(rid, model, {}, None, index, created=created)
            if not (out.new_text or out.finished):
                return None
            text = echoed + out.new_text if state["first"] else out.new_text
            delta = {"content": text} if text or state["first"] else {}
            state["first"] = False
            logprobs = chat_logprobs(texts, out, prompt_ids, state["sent"])
            state["sent"] = len(out.output_ids)
            return proto.chat_chunk(rid, model, delta, finish, index, logprobs, created,
                                    out.stop_reason if out.finished else None)
        return chunk
    return chunker
