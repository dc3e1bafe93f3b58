"""bad_words cases beyond the main tests': each limit taken at its
bound and refused past it, allowed_token_ids refused only for tokens banned outright, words and
token ids given together both banned, and vLLM's rule for a word's spaced form."""

from __future__ import annotations

import pytest
from test_bad_words import engine  # noqa: F401  (the module's engine fixture)

from caraserve.config import AdapterConfig, EngineConfig, LimitsConfig
from caraserve.engine import Engine
from caraserve.input_checks import bad_words_ids
from caraserve.request import RequestError, SamplingParams


@pytest.fixture(scope="module")
def small():
    """Limits small enough to reach: 2 words (4 token sequences), 8 characters, 3 tokens each."""
    return Engine(EngineConfig(device="cpu", compile="false", adapters=AdapterConfig(dir="none"),
                               limits=LimitsConfig(max_bad_words=2, max_stop_chars=8, max_stop_token_ids=3)))


def one_token(small, **kw):
    return small.generate(["x"], SamplingParams(max_tokens=1, temperature=0, **kw))[0]


def test_each_limit_is_taken_at_its_bound_and_refused_past_it(small):
    enc = lambda text: small.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    word = next(w for w in ("abcdefgh", "fibonacc", "returned") if len(enc(w)) <= 3 and len(enc(" " + w)) <= 3)
    assert len(word) == 8
    one_token(small, bad_words=[word, "ab"])  # 2 words of up to 8 characters
    one_token(small, bad_words_token_ids=[[5], [6], [7], [8]])  # 4 sequences: twice the words
    one_token(small, bad_words_token_ids=[[5, 6, 7]])  # 3 tokens
    for kw, says in ((dict(bad_words=["a", "b", "c"]), r"bad_words: at most 2"),
                     (dict(bad_words_token_ids=[[5], [6], [7], [8], [9]]), r"bad_words_token_ids: at most 4"),
                     (dict(bad_words=[word + "x"]), "each at most 8 characters"),
                     (dict(bad_words_token_ids=[[5, 6, 7, 8]]), "each at most 3 tokens")):
        with pytest.raises(RequestError, match=says):
            small.add_request("x", SamplingParams(**kw))
    assert not small.has_unfinished()


def test_the_default_limits_take_twice_as_many_sequences_as_words(engine):  # noqa: F811
    ids = [[t] for t in range(100, 100 + 2 * engine.config.limits.max_bad_words)]
    out = engine.generate(["x"], SamplingParams(max_tokens=2, temperature=0, bad_words_token_ids=ids))[0]
    assert not set(out.output_ids) & {w[0] for w in ids}
    with pytest.raises(RequestError, match="at most 128"):
        engine.add_request("x", SamplingParams(bad_words_token_ids=ids + [[99]]))


def test_allowed_token_ids_are_refused_only_for_tokens_banned_outright(engine):  # noqa: F811
    """[7, 6] bans 6 only after 7, which allowed_token_ids rules out: 6 stays sampleable."""
    out = engine.generate(["x"], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True,
                                                allowed_token_ids=[5, 6], bad_words_token_ids=[[5], [7, 6]]))[0]
    assert out.output_ids == [6, 6, 6, 6]


def test_words_and_token_ids_given_together_are_both_banned(engine):  # noqa: F811
    prompt = engine.encode("def fibonacci(n):")
    sp = dict(max_tokens=12, temperature=0, ignore_eos=True)
    plain = engine.generate([prompt], SamplingParams(**sp))[0].output_ids
    words = [engine.tokenizer.decode(plain[3:5])]
    given = ((plain[0],),)
    both = engine.generate([prompt], SamplingParams(**sp, bad_words=words, bad_words_token_ids=given))[0].output_ids
    assert both[0] != plain[0]
    want = engine.generate([prompt], SamplingParams(**sp, bad_words_token_ids=given + bad_words_ids(
        words, engine.tokenizer)))[0].output_ids
    assert both == want
    words_only = engine.generate([prompt], SamplingParams(**sp, bad_words=words))[0].output_ids
    assert words_only[0] == plain[0]


def test_a_spaced_form_of_another_length_is_not_banned(engine):  # noqa: F811
    """vLLM's: a word's spaced form counts only when it has as many tokens as the word alone."""
    enc = lambda text: tuple(engine.tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    for word in ("cat", "123"):
        assert len(enc(" " + word)) != len(enc(word)) and enc(" " + word)[0] != enc(word)[0]
        assert bad_words_ids([word], engine.tokenizer) == (enc(word),)


class SpaceBlind:
    """A tokenizer that reads " word" as it reads "word" (as some SentencePiece ones do)."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text.lstrip()]


def test_a_spaced_form_with_the_same_first_token_is_not_added():
    assert bad_words_ids(["ab", " c"], SpaceBlind()) == ((97, 98), (99,))
