"""The SSE stream of a request's n choices (caraserve.serve.streaming), over fake engine queues."""

from __future__ import annotations

import asyncio
import json

from caraserve.request import ErrorCause, FinishReason, RequestOutput
from caraserve.serve import choices
from caraserve.serve.streaming import events


def out(rid, text, finished=False, reason=None, error=None, n_out=1):
    return RequestOutput(rid, [1], [1] * n_out, finished, reason, new_text=text, error=error,
                         error_cause=ErrorCause.REQUEST if error else None, prompt_tokens=4)


chunker = choices.completion_chunker("r", "m", choices.TokenTexts(None), [1, 2], "")


async def _collect(runs, first, aborted, usage=True, stop_after=None):
    lines = []
    gen = events(runs, first, chunker, usage, lambda rid, queue: aborted.append(rid))
    async for line in gen:
        lines.append(line)
        if stop_after is not None and len(lines) == stop_after:
            await gen.aclose()  # the consumer goes away
            break
    return [json.loads(x[6:]) if x.startswith("data: {") else x.strip() for x in lines]


def test_choices_interleave_by_index_and_usage_counts_them_all():
    async def main():
        q0, q1 = asyncio.Queue(), asyncio.Queue()
        for o in (out("a", " y"), out("a", " z", True, FinishReason.LENGTH, n_out=3)):
            q0.put_nowait(o)
        for o in (out("b", "p"), out("b", "q", True, FinishReason.STOP, n_out=2)):
            q1.put_nowait(o)
        aborted = []
        got = await _collect([("a", q0), ("b", q1)], out("a", "x"), aborted)
        return got, aborted

    got, aborted = asyncio.run(main())
    assert got[-1] == "data: [DONE]" and got[-2]["usage"]["completion_tokens"] == 5 and got[-2]["choices"] == []
    texts = {0: "", 1: ""}
    for e in got[:-2]:
        texts[e["choices"][0]["index"]] += e["choices"][0]["text"]
    assert texts == {0: "x y z", 1: "pq"} and aborted == []


def test_a_failed_choice_ends_the_stream_and_aborts_the_others():
    async def main():
        q0, q1 = asyncio.Queue(), asyncio.Queue()
        q1.put_nowait(out("b", "", True, FinishReason.ERROR, error="boom"))
        aborted = []
        got = await _collect([("a", q0), ("b", q1)], out("a", "x"), aborted, usage=False)
        return got, aborted

    got, aborted = asyncio.run(main())
    assert got[-2]["error"]["message"] == "boom" and got[-1] == "data: [DONE]"
    assert aborted == ["a"]  # still running when its sibling failed


def test_usage_after_a_failed_choice_counts_the_tokens_every_choice_was_sent():
    async def main():
        q0, q1 = asyncio.Queue(), asyncio.Queue()
        q0.put_nowait(out("a", " y", n_out=3))
        await asyncio.sleep(0)
        q1.put_nowait(out("b", "p", n_out=2))
        q1.put_nowait(out("b", "", True, FinishReason.ERROR, error="boom", n_out=2))
        return await _collect([("a", q0), ("b", q1)], out("a", "x", n_out=2), [])

    got = asyncio.run(main())
    assert got[-3]["error"]["message"] == "boom" and got[-1] == "data: [DONE]"
    assert got[-2]["usage"]["completion_tokens"] == 3 + 2 and got[-2]["usage"]["prompt_tokens"] == 4


def test_a_consumer_going_away_aborts_every_unfinished_choice():
    async def main():
        q0, q1 = asyncio.Queue(), asyncio.Queue()
        aborted = []
        await _collect([("a", q0), ("b", q1)], out("a", "x"), aborted, stop_after=1)
        return aborted

    assert sorted(asyncio.run(main())) == ["a", "b"]


def test_logprobs_of_held_back_tokens_come_with_the_chunk_that_sends_their_text():
    """A token whose text is held back (an incomplete character, the start of a stop string)
    sends nothing; its logprobs go with the next chunk, so the chunks' tokens are every token."""
    def lp_out(new_text, n, finished=False):
        return RequestOutput("a", [n + 10], [11, 12, 13][:n], finished, FinishReason.LENGTH if finished else None,
                             new_text=new_text, logprobs=[-0.5, -1.0, -1.5][:n],
                             top_logprobs=[((11, -0.5),), ((12, -1.0),), ((14, -0.9),)][:n], prompt_tokens=2)

    async def main():
        q = asyncio.Queue()
        for o in (lp_out("", 2), lp_out("yz", 3, True)):
            q.put_nowait(o)
        return await _collect([("a", q)], lp_out("x", 1), [], usage=False)

    got = asyncio.run(main())
    assert [e["choices"][0]["text"] for e in got[:-1]] == ["x", "yz"]
    first, second = (e["choices"][0]["logprobs"] for e in got[:-1])
    assert first == {"tokens": ["11"], "token_logprobs": [-0.5], "top_logprobs": [{"11": -0.5}], "text_offset": [0]}
    assert second["tokens"] == ["12", "13"] and second["token_logprobs"] == [-1.0, -1.5]
    assert second["top_logprobs"] == [{"12": -1.0}, {"14": -0.9, "13": -1.5}] and second["text_offset"] == [2, 4]


def test_token_texts_keep_the_spaces_a_sentencepiece_decoder_drops_at_a_sequence_start():
    """A Llama-2-style tokenizer (Metaspace) decodes "▁world" alone as "world": each token's text
    is what it adds after the token before it, so the texts add up to the decoded text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    raw.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    text = "hello world, hello there world of words"
    raw.train_from_iterator([text] * 50, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", unk_token="<unk>")
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    alone = [tok.decode([t], skip_special_tokens=True) for t in ids]
    assert "".join(alone) != text  # the naive form loses the spaces
    texts = choices.TokenTexts(tok)(ids)
    assert texts[0] == "" and "".join(texts) == tok.decode(ids, skip_special_tokens=True) == text


def test_token_texts_of_split_characters_add_up_and_do_not_depend_on_where_a_chunk_starts():
    """Byte-level pieces of a multi-byte character add nothing until the piece completing it, which
    adds the whole character: the texts add up to the decoded text and text offsets hold; a run
    read after the tokens before it (a streamed chunk) gets the texts the whole run gets."""
    from transformers import AutoTokenizer

    from caraserve.model.tiny import tiny_paths

    tok = AutoTokenizer.from_pretrained(str(tiny_paths()[0]))
    text = "café au lait, ünïcödé \U0001F98A 日本語 text"  # 3-byte characters in a row: a 4-token window
    ids = tok(text)["input_ids"]                            # begins inside one of them
    texts = choices.TokenTexts(tok)
    whole = texts(ids)
    assert "".join(whole) == tok.decode(ids, skip_special_tokens=True) == text
    assert "" in whole[1:]  # some character was split between tokens
    for k in range(1, len(ids)):
        assert texts(ids[k:], ids[:k]) == whole[k:]
        assert texts(ids[k:], ids[max(0, k - 4) : k], at=k) == whole[k:]  # read after a window of it
        # a sequence of its own (a token-id prompt, a truncated one) may begin inside a character:
        # its texts keep the broken bytes' U+FFFD, as its decoded text does
        assert "".join(texts(ids[k:])) == tok.decode(ids[k:], skip_special_tokens=True)


def test_logprobs_json_never_holds_an_infinity():
    """A token the model rules out has logprob -inf, which JSON cannot carry: it goes out as
    -9999.0 (as vLLM's API sends it), in both answer forms, and the body serializes strictly."""
    import json
    import math

    o = RequestOutput("a", [11, 12], [11, 12], True, FinishReason.LENGTH, text="", logprobs=[-0.5, -math.inf],
                      top_logprobs=[((11, -0.5), (13, -math.inf)), ((12, -math.inf),)], prompt_tokens=2)
    texts = choices.TokenTexts(None)
    cmpl = choices.completion_logprobs(texts, o, [1, 2])
    assert cmpl["token_logprobs"] == [-0.5, -9999.0] and -9999.0 in cmpl["top_logprobs"][0].values()
    chat = choices.chat_logprobs(texts, o, [1, 2])
    assert [e["logprob"] for e in chat["content"]] == [-0.5, -9999.0]
    json.dumps([cmpl, chat], allow_nan=False)


def test_completion_top_logprobs_keep_each_texts_best_and_the_chosen_tokens_own():
    """Completions key the alternatives by text, which tokens may share: a shared text keeps its
    most likely token's logprob, and the chosen token's text always its own (as token_logprobs)."""

    class SameText:  # tokens 21 and 22 read "a", 23 and 24 read ""
        def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=None):
            return "".join({21: "a", 22: "a", 23: "", 24: "", 25: "b"}.get(t, "?") for t in ids)

    o = RequestOutput("a", [23, 25], [23, 25], True, FinishReason.LENGTH, text="b", logprobs=[-3.5, -0.1],
                      top_logprobs=[((21, -0.2), (22, -0.9), (24, -1.5)), ((25, -0.1), (21, -2.0))],
                      prompt_tokens=1)
    top = choices.completion_logprobs(choices.TokenTexts(SameText()), o, [1])["top_logprobs"]
    assert top == [{"a": -0.2, "": -3.5}, {"b": -0.1, "a": -2.0}]


def test_usage_counts_a_prompt_once_with_the_cache_hits_of_its_best_choice():
    """n choices of one prompt: its tokens once, every choice's output, and the cached prompt
    tokens of the choice that found the most (the first prefills; its siblings share its blocks)."""
    def done(cached, n_out):
        return RequestOutput("r", [], [1] * n_out, True, FinishReason.LENGTH, prompt_tokens=96, cached_tokens=cached)

    assert choices.usage_counts([done(0, 3), done(80, 5), done(64, 2), done(16, 4)], 2) == (192, 14, 144)


def test_a_chunk_that_fails_to_form_ends_the_stream_with_an_error_event():
    def breaking(index):
        chunk = chunker(index)

        def formed(o, finish):
            if o is not None and o.new_text == "boom":
                raise RecursionError("nested too deep")
            return chunk(o, finish)
        return formed

    async def main():
        q0, q1 = asyncio.Queue(), asyncio.Queue()
        q0.put_nowait(out("a", "boom"))
        aborted, lines = [], []
        async for line in events([("a", q0), ("b", q1)], out("a", "x"), breaking, False,
                                     lambda rid, queue: aborted.append(rid)):
            lines.append(line)
        return [json.loads(x[6:]) if x.startswith("data: {") else x.strip() for x in lines], aborted

    got, aborted = asyncio.run(main())
    assert got[0]["choices"][0]["text"] == "x"
    assert got[1]["error"]["code"] == 500 and got[-1] == "data: [DONE]" and sorted(aborted) == ["a", "b"]
