"""A request's input checked against the server's limits (config.LimitsConfig), the model's
vocabulary and its context length, before it reaches the engine: each refusal a RequestError
naming the field."""

from __future__ import annotations

from dataclasses import replace

from caraserve.request import RequestError, SamplingParams


def check_limits(params: SamplingParams, lim, vocab: int, eos_ids=()) -> None:
    """Refuses (RequestError naming the field) sampling parameters beyond the limits `lim`
    (config.LimitsConfig) or a vocabulary of `vocab` tokens, or that leave no token to sample
    (with the model's `eos_ids`); SamplingParams itself has checked their types and ranges."""
    if params.top_logprobs > lim.max_logprobs:
        raise RequestError(f"top_logprobs: at most {lim.max_logprobs} (limits.max_logprobs), got {params.top_logprobs}")
    if (params.prompt_logprobs or 0) > lim.max_logprobs:
        raise RequestError(f"prompt_logprobs: at most {lim.max_logprobs} (limits.max_logprobs), "
                           f"got {params.prompt_logprobs}")
    if len(params.stop) > lim.max_stop_strings:
        raise RequestError(f"stop: at most {lim.max_stop_strings} stop strings, got {len(params.stop)}")
    if sum(map(len, params.stop)) > lim.max_stop_chars:
        raise RequestError(f"stop: the stop strings may total at most {lim.max_stop_chars} characters")
    if len(params.stop_token_ids) > lim.max_stop_token_ids:
        raise RequestError(f"stop_token_ids: at most {lim.max_stop_token_ids} ids, "
                           f"got {len(params.stop_token_ids)}")
    if any(t >= vocab for t in params.stop_token_ids):
        raise RequestError(f"stop_token_ids must be token ids in [0, {vocab})")
    if any(t >= vocab for t, _ in params.logit_bias):
        raise RequestError(f"logit_bias keys must be token ids in [0, {vocab})")
    check_bad_words(params, lim, vocab)
    allowed = params.allowed_token_ids
    if allowed is not None:
        if len(allowed) > lim.max_allowed_token_ids:
            raise RequestError(f"allowed_token_ids: at most {lim.max_allowed_token_ids} ids "
                               f"(limits.max_allowed_token_ids), got {len(allowed)}")
        if any(t >= vocab for t in allowed):
            raise RequestError(f"allowed_token_ids must be token ids in [0, {vocab})")
        banned = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
        if params.min_tokens and set(allowed) <= banned:
            raise RequestError("allowed_token_ids holds only EOS or stop token ids, which min_tokens rules out "
                               "for the first tokens: no token could be sampled")


def check_bad_words(params: SamplingParams, lim, vocab: int) -> None:
    """bad_words and bad_words_token_ids within the limits (check_bad_word_ids for the ids)."""
    for name, words, count in (("bad_words", params.bad_words, lim.max_bad_words),
                               ("bad_words_token_ids", params.bad_words_token_ids, 2 * lim.max_bad_words)):
        if len(words) > count:  # (a word's token sequences: as it starts a text, and after a space)
            raise RequestError(f"{name}: at most {count} (limits.max_bad_words), got {len(words)}")
    if any(len(w) > lim.max_stop_chars for w in params.bad_words):
        raise RequestError(f"bad_words: each at most {lim.max_stop_chars} characters (limits.max_stop_chars)")
    check_bad_word_ids(params, lim, vocab)


def check_bad_word_ids(params: SamplingParams, lim, vocab: int, name: str = "bad_words_token_ids") -> None:
    """The banned token sequences within limits.max_stop_token_ids and the vocabulary; and not
    every token allowed_token_ids leaves banned outright (no token could be sampled). Checked
    again once bad_words are tokenized (with_bad_words_ids): a word may be many tokens."""
    if any(len(w) > lim.max_stop_token_ids for w in params.bad_words_token_ids):
        raise RequestError(f"{name}: each at most {lim.max_stop_token_ids} tokens (limits.max_stop_token_ids)")
    if any(t >= vocab for w in params.bad_words_token_ids for t in w):
        raise RequestError(f"{name} must be token ids in [0, {vocab})")
    banned = {w[0] for w in params.bad_words_token_ids if len(w) == 1}
    if params.allowed_token_ids is not None and banned and set(params.allowed_token_ids) <= banned:
        raise RequestError("allowed_token_ids holds only tokens bad_words bans: no token could be sampled")


def with_bad_words_ids(params: SamplingParams, tokenizer, lim, vocab: int) -> SamplingParams:
    """The params with their bad_words as token sequences (bad_words_ids) beside any given so,
    checked (check_bad_word_ids). The server calls it once per call, off its event loop; the
    engine's add_request finds the words tokenized then."""
    if not params.bad_words:
        return params
    params = replace(params, bad_words=(), bad_words_token_ids=params.bad_words_token_ids
                     + bad_words_ids(params.bad_words, tokenizer))
    check_bad_word_ids(params, lim, vocab, "bad_words")
    return params


def bad_words_ids(words, tokenizer) -> tuple[tuple[int, ...], ...]:
    """vLLM's token sequences of bad_words: each word (leading whitespace dropped) as it starts
    a text, and as it follows a space where that is other tokens of the same count (the word in
    the middle of a text). RequestError without a tokenizer or for a word of no tokens."""
    if tokenizer is None:
        raise RequestError("bad_words needs the model's tokenizer: give bad_words_token_ids")
    seqs = []
    for word in words:
        alone = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if not alone:
            raise RequestError(f"bad_words: {word!r:.40} is no tokens")
        seqs.append(tuple(alone))
        if spaced and spaced[0] != alone[0] and len(spaced) == len(alone):
            seqs.append(tuple(spaced))
    return tuple(seqs)


def check_prompt_text(prompt: str, tokenizer, lim) -> None:
    """RequestError unless a text prompt can be tokenized: a tokenizer, valid Unicode, within
    limits.max_prompt_bytes (checked before tokenizing: the tokenizer's work grows with the text)."""
    limit = lim.max_prompt_bytes
    if tokenizer is None:
        raise RequestError("this model has no tokenizer: send prompt token ids")
    if len(prompt) > limit:  # a character is at least one byte: no need to encode to know
        raise RequestError(f"prompt: longer than {limit} bytes (limits.max_prompt_bytes)")
    try:
        size = len(prompt.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise RequestError(f"prompt is not valid Unicode ({e.reason} at position {e.start})") from None
    if size > limit:
        raise RequestError(f"prompt: {size} bytes is more than {limit} (limits.max_prompt_bytes)")


def prompt_ids(prompt, tokenizer, lim, max_seq_len: int, vocab: int, add_special_tokens: bool = True,
               why: str = "") -> list[int]:
    """Token ids of a prompt (text through `tokenizer`, with its BOS unless not
    add_special_tokens; or token ids); RequestError when it is not one, or past the limits `lim`
    (config.LimitsConfig), the context length (`why` says what sets it, when not the model) or
    the vocabulary."""
    if isinstance(prompt, str):
        check_prompt_text(prompt, tokenizer, lim)
        ids = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
    elif isinstance(prompt, (list, tuple)):
        if len(prompt) > max_seq_len:
            raise RequestError(f"prompt: {len(prompt)} token ids is more than the context length {max_seq_len}{why}")
        ids = list(prompt)
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})")
    else:
        raise RequestError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
    if not ids:
        raise RequestError("prompt is empty")
    return ids
