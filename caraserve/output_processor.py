"""OutputProcessor: from sampled tokens to request progress.

Appends each request's new token, detokenizes incrementally (one batched call per step), decides
when a request ends (EOS, a stop token, its length, a stop string in its text) and builds the
RequestOutput snapshots the engine hands to its callers.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable

from caraserve.request import FinishReason, Request, RequestOutput

log = logging.getLogger(__name__)


class OutputProcessor:
    def __init__(self, tokenizer, eos_ids: set[int], max_seq_len: int):
        self.tokenizer = tokenizer  # None: token ids only, no text
        self.eos_ids = eos_ids
        self.max_seq_len = max_seq_len
        self._decode_batch = self._batch_decoder(tokenizer)
        # request id -> the outputs made for it, in order, for a reader other than the stepping
        # caller (Engine.stream): whoever's step makes an output, its stream gets it
        self.watched: dict[str, collections.deque] = {}

    @staticmethod
    def _batch_decoder(tokenizer):
        """(lists of ids, and per list whether to skip special tokens) -> texts, without
        transformers' space clean-up (" ," read as ","), which vLLM's detokenizer never applies
        either (a tokenizer may ask for it: Llama 3's does). A fast tokenizer's own Rust decoder,
        one window at a time: the same text without the per-id Python conversions of
        `batch_decode`, and without `decode_batch`'s thread pool, whose hand-off costs more than
        a step's windows of a token or two take to decode. A window of one token (most
        previous-text windows) is decoded once per vocabulary id and remembered."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            decode = backend.decode
            singles: dict[tuple[int, bool], str] = {}  # a one-token window's text, per (id, skip)

            def window(ids: list[int], skip: bool) -> str:
                if len(ids) != 1:
                    return decode(ids, skip_special_tokens=skip) if ids else ""
                text = singles.get((ids[0], skip))
                if text is None:
                    text = singles[ids[0], skip] = decode(ids, skip_special_tokens=skip)
                return text

            return lambda windows, skips: [window(w, k) for w, k in zip(windows, skips)]
        return lambda windows, skips: [tokenizer.decode(w, skip_special_tokens=k, clean_up_tokenization_spaces=False)
                                       for w, k in zip(windows, skips)]

    @staticmethod
    def add_token(req: Request, token: int, logprob: float, top: tuple, now: float) -> None:
        req.output_ids.append(token)
        if req.grammar is not None and not req.grammar.accept(token):  # (the sampler allowed only its tokens)
            log.error("request %s: token %d is not one its structured output allows", req.request_id, token)
        if req.params.logprobs:
            req.output_logprobs.append(logprob)
            if req.params.top_logprobs:
                req.output_top_logprobs.append(top)
        if req.first_token_s is None:
            req.first_token_s = now

    def end_reason(self, req: Request) -> FinishReason | None:
        """Why the request ends with its last token (EOS, a stop token, its length), or None. A stop
        token id is recorded as the request's stop_reason."""
        p, token = req.params, req.output_ids[-1]
        if token in self.eos_ids and (not p.ignore_eos or req.grammar is not None and req.grammar.terminated):
            return FinishReason.EOS  # (a complete structured output allows nothing after its EOS)
        if token in p.stop_token_ids:
            req.stop_reason = token
            return FinishReason.STOP
        if len(req.output_ids) >= p.max_tokens or req.context_len >= self.max_seq_len:
            return FinishReason.LENGTH
        return None

    def text_end(self, req: Request, reason: FinishReason | None) -> int:
        """How many of the request's output tokens its text covers: all but the last when that
        token ends it as EOS or a stop token id, unless include_stop_str_in_output (as vLLM's
        detokenizer, the stop token's own text is not part of the output)."""
        n = len(req.output_ids)
        if reason in (FinishReason.EOS, FinishReason.STOP) and not req.params.include_stop_str_in_output:
            return n - 1
        return n

    def detokenize(self, reqs: list[Request]) -> list[str]:
        """Appends to each request's text the newly complete characters of its last token (none
        for a token that ends it as EOS or a stop token id: `text_end`).

        Each token's text is read in a window of the tokens before it (the prompt's last ones for
        the first), as vLLM's detokenizer reads it, so a decoder that drops a sequence's leading
        space keeps the output's. Byte-level tokens can end inside a UTF-8 character; such a tail
        is held back until a later token completes it (a request that ends first leaves it out,
        as vLLM's detokenizer does). Only a short
        window is decoded per token, so the cost does not grow with the output length, and every
        request of the step is decoded in one batched call.
        """
        if self.tokenizer is None:
            return [""] * len(reqs)
        reasons = [self.end_reason(r) for r in reqs]
        decoded = self._decode_batch(
            [r.sequence(r.detok_prefix, r.detok_read) for r in reqs]
            + [r.sequence(r.detok_prefix, len(r.prompt_ids) + self.text_end(r, why)) for r, why in zip(reqs, reasons)],
            [r.params.skip_special_tokens for r in reqs] * 2)
        return [_advance(r, prefix, full) for r, prefix, full in zip(reqs, decoded[: len(reqs)], decoded[len(reqs) :])]

    def step_outputs(self, reqs: list[Request], tokens: list[int],
                     finish: Callable[[Request, FinishReason], None]) -> list[RequestOutput]:
        """The outputs of the requests that got `tokens` this step (added already), ending those
        whose last token ends them (`finish(req, reason)`): each streamed request's output, and
        those of final-only requests that end now, with every token and the whole text (decoded
        now, `decode_all`, unless stop strings made it grow token by token)."""
        watched = [r for r in reqs if not r.final_only or r.params.stop]
        texts = iter(self.detokenize(watched) if watched else ())
        outs = []
        for r, t in zip(reqs, tokens):
            if r.final_only and not r.params.stop:
                reason = self.end_reason(r)
                if reason is not None:
                    self.decode_all(r, reason)
                    finish(r, reason)
                    outs.append(self.output(r, list(r.output_ids), r.text))
                continue
            reason, new_text = self.stop(r, next(texts))
            if reason is not None:
                finish(r, reason)
            if not r.final_only:
                outs.append(self.output(r, [t], new_text))
            elif r.finished:
                outs.append(self.output(r, list(r.output_ids), r.text))
        return outs

    def aborted(self, req: Request) -> RequestOutput:
        """The output of a request just aborted: what it has, as its last output; a final-only
        request's (whose text was not decoded as it went) with all its tokens and its text."""
        if not req.final_only:
            return self.output(req, [], "")
        if not req.params.stop:
            self.decode_all(req, FinishReason.ABORT)
        return self.output(req, list(req.output_ids), req.text)

    def decode_all(self, req: Request, reason: FinishReason) -> None:
        """Sets the text of a request that was not detokenized token by token and ends for
        `reason`: the windows `detokenize` would have read, token after token, so its text is
        the same as a streamed request's (decoding the output in one go is not: it keeps a broken
        last character as U+FFFD, and a byte-fallback decoder makes every byte of a broken run
        U+FFFD, whole characters before it included)."""
        if self.tokenizer is None:
            return
        start, n, skips = len(req.prompt_ids), len(req.output_ids), [req.params.skip_special_tokens] * 2
        req.detok_prefix, req.detok_read = req.detok_start()
        req.text, req.output_texts = "", []
        for j in range(1, n + 1):  # as the step that added output token j - 1 read it
            end = start + (j if j < n else self.text_end(req, reason))
            prefix, full = self._decode_batch([req.sequence(req.detok_prefix, req.detok_read),
                                               req.sequence(req.detok_prefix, end)], skips)
            _advance(req, prefix, full, start + j)

    def stop(self, req: Request, new_text: str) -> tuple[FinishReason | None, str]:
        """(why the request ends now or None, the text to stream now). A stop string found in the
        text cuts req.text before it (after it with include_stop_str_in_output). With stop
        strings, the text streamed is what no stop string can still claim: while the request
        runs, the longest tail of its text that begins a stop string is held back (a later token
        may complete the stop string, sent only if it stays in the text); when it ends, the rest
        up to the cut. As vLLM's, stop strings count only where they end in the text of a token
        past the first min_tokens (the new text)."""
        reason = self.end_reason(req)
        stops = req.params.stop
        if not stops:
            return reason, new_text
        if new_text and len(req.output_ids) > req.params.min_tokens:
            new_from = len(req.text) - len(new_text)
            hits = [(i, -len(s)) for s, i in ((s, req.text.find(s, max(0, new_from - len(s) + 1))) for s in stops)
                    if i >= 0]
            if hits:  # the first match; at one place, the longest stop string
                at, minus_len = min(hits)
                req.stop_reason = req.text[at : at - minus_len]
                req.text = req.text[: at - minus_len if req.params.include_stop_str_in_output else at]
                reason = FinishReason.STOP
        end = len(req.text) if reason is not None else \
            len(req.text) - stop_prefix_len(req.text, stops, len(req.text) - req.text_sent)
        sent, req.text_sent = req.text_sent, max(req.text_sent, end)
        return reason, req.text[sent:end]

    def output(self, req: Request, new_ids: list[int], new_text: str) -> RequestOutput:
        out = RequestOutput(
            req.request_id, new_ids, list(req.output_ids), req.finished, req.finish_reason, req.text, new_text,
            error=req.error, error_cause=req.error_cause,
            logprobs=list(req.output_logprobs) if req.params.logprobs else None,
            top_logprobs=list(req.output_top_logprobs) if req.params.top_logprobs else None,
            token_texts=list(req.output_texts) if req.params.logprobs and self.tokenizer is not None else None,
            prompt_logprobs=list(req.prompt_logprobs) if req.params.prompt_logprobs is not None else None,
            prompt_tokens=len(req.prompt_ids),
            ttft_s=None if req.first_token_s is None else req.first_token_s - req.arrival_s,
            e2e_s=None if req.finish_s is None else req.finish_s - req.arrival_s,
            cold_start=req.cold_start, adapter=req.adapter,
            cached_tokens=req.cached_tokens,
            stop_reason=req.stop_reason,
        )
        watcher = self.watched.get(req.request_id)
        if watcher is not None:
            watcher.append(out)
            if out.finished:  # the last one: the watch ends even if its reader stops asking here
                self.watched.pop(req.request_id, None)  # (or its reader, closing, ended it already)
        return out


# Tokens a character's text may wait for: a UTF-8 character is at most 4 bytes, so text held back
# over more tokens than this is broken bytes, not a character still to complete (twice that: a
# run of broken bytes just before a character split over tokens still lets it complete)
HELD_TOKENS = 8


def _advance(req: Request, prefix: str, full: str, read: int | None = None) -> str:
    """The text the token at `read` - 1 of the sequence (default: the last) adds to the request's
    (also appended to req.text): `full`, its window decoded through it, less `prefix`, the
    window's tokens already text; the window then moves on to start at the tokens just read.
    Nothing while the window's text ends inside a character (U+FFFD): a later token may complete
    it, and a request that ends first leaves it out of its text, as vLLM's detokenizer does (the
    text never ends in a broken character; its token ids still hold the bytes). Past HELD_TOKENS
    tokens held back, the text is let out as it reads (broken bytes as U+FFFD), so no window grows
    without bound (a run of broken bytes, or of special tokens, which read as nothing, would make
    every later token's window, and a final-only request's replay, as long as the run)."""
    read = len(req.prompt_ids) + len(req.output_ids) if read is None else read
    if read - req.detok_read <= HELD_TOKENS and (len(full) <= len(prefix) or full.endswith("\ufffd")):
        new_text = ""
    else:
        new_text = full[len(prefix) :]
        req.detok_prefix, req.detok_read = req.detok_read, read
        req.text += new_text
    if req.params.logprobs:
        req.output_texts.append(new_text)
    return new_text


def stop_prefix_len(text: str, stops, unsent: int | None = None) -> int:
    """Length of the longest tail of `text` that is the beginning (not the whole) of a stop string,
    among tails of at most `unsent` characters (text already streamed never begins one: it was
    held back while it might), longest first: a token costs the text it added, not the stop
    strings' lengths."""
    most = len(text) if unsent is None else unsent
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, most), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
