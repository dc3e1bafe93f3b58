"""vLLM's bad_words: words never generated. Each word is tokenized as it starts a text and, where
that is other tokens of the same count, as it follows a space; a sequence's last token is
banned wherever the output so far ends with the rest of it. Checked against transformers'
NoBadWordsLogitsProcessor step by step, in the sampler and end to end, and through the server
and offline lines."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from test_server_hardening import in_process_server
from transformers.generation.logits_process import NoBadWordsLogitsProcessor

from caraserve.config import AdapterConfig, EngineConfig, LimitsConfig, ServerConfig
from caraserve.engine import Engine
from caraserve.input_checks import bad_words_ids
from caraserve.model.tiny import tiny_paths
from caraserve.offline import parse_line
from caraserve.request import RequestError, SamplingParams
from caraserve.sampler import adjust_logits


def banned_by_hf(ids, sequence: list[int], vocab: int) -> set[int]:
    """The tokens transformers' processor bans after `sequence` (it reads the whole sequence)."""
    scores = NoBadWordsLogitsProcessor([list(w) for w in ids])(torch.tensor([sequence]), torch.zeros(1, vocab))
    return set(torch.nonzero(torch.isinf(scores[0])).flatten().tolist())


def test_the_sampler_bans_what_transformers_bans_after_the_output():
    ids = ((7,), (3, 4), (1, 2, 5), (9, 9))
    p = SamplingParams(bad_words_token_ids=ids)
    g = torch.Generator().manual_seed(0)
    for output in ([], [3], [1, 2], [0, 1, 2], [9], [9, 9], [2, 5, 3], [4, 1, 2, 3]):
        logits = torch.randn(2, 12, generator=g)
        got = adjust_logits(logits, [p, SamplingParams()], [([3], output), ([3], output)])
        banned = set(torch.nonzero(torch.isinf(got[0])).flatten().tolist())
        # a sentinel before the output: the prompt is not read (vLLM's), transformers reads all
        assert banned == banned_by_hf(ids, [11, *output], 12), output
        assert torch.equal(got[1], logits[1]) and torch.equal(got[0][~torch.isinf(got[0])],
                                                              logits[0][~torch.isinf(got[0])])


@pytest.fixture(scope="module")
def engine():
    return Engine(EngineConfig(device="cpu", compile="false", adapters=AdapterConfig(dir="demo", preload="host")))


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_paths()[0]), dtype=torch.float32).eval()


def test_words_are_tokenized_as_vllm_does(engine):
    tok = engine.tokenizer
    enc = lambda text: tuple(tok.encode(text, add_special_tokens=False))  # noqa: E731
    assert bad_words_ids(["return"], tok) == (enc("return"), enc(" return"))  # one token each, different
    assert bad_words_ids(["  return"], tok) == (enc("return"), enc(" return"))  # leading spaces dropped
    fib = bad_words_ids(["fib"], tok)
    assert fib[0] == enc("fib") and (len(fib) == 2) == (len(enc(" fib")) == len(enc("fib")) and
                                                       enc(" fib")[0] != enc("fib")[0])
    with pytest.raises(RequestError, match="tokenizer"):
        bad_words_ids(["x"], None)


def greedy_with_hf(model, prompt: list[int], ids, n: int) -> list[int]:
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([prompt + out])).logits[0, -1]
            for t in banned_by_hf(ids, prompt + out, logits.shape[-1]):
                logits[t] = float("-inf")
            out.append(int(logits.argmax()))
    return out


@pytest.mark.parametrize("adapter", [None, "demo-r32"])
def test_greedy_tokens_equal_transformers_with_the_same_bans(engine, hf_model, adapter):
    """Words taken from the plain output (one token, and two): the output avoids them and equals
    transformers' greedy loop with its processor over the same token sequences."""
    prompt = engine.encode("def fibonacci(n):")
    plain = engine.generate([prompt], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True), adapter)[0]
    tok = engine.tokenizer
    words = [tok.decode([plain.output_ids[1]]), tok.decode(plain.output_ids[4:6])]
    ids = bad_words_ids(words, tok)
    assert prompt[-1] not in {w[0] for w in ids if len(w) > 1}  # (transformers reads the prompt too)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, bad_words=words)
    got = engine.generate([prompt], params, adapter)[0].output_ids
    assert got != plain.output_ids
    for w in ids:
        assert not any(tuple(got[i:i + len(w)]) == w for i in range(len(got))), w
    if adapter is None:
        assert got == greedy_with_hf(hf_model, prompt, ids, 30)
    # the same bans given as token ids
    by_ids = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, bad_words_token_ids=ids)
    assert engine.generate([prompt], by_ids, adapter)[0].output_ids == got


def test_bad_values_and_limits_are_refused_by_name(engine):
    for kw, says in ((dict(bad_words="x"), "bad_words must be a list"), (dict(bad_words=[""]), "bad_words must be"),
                     (dict(bad_words=["  "]), "bad_words must be"), (dict(bad_words=[3]), "bad_words must be"),
                     (dict(bad_words_token_ids=[[]]), "non-empty"), (dict(bad_words_token_ids=[[-1]]), "token ids"),
                     (dict(bad_words_token_ids=[3]), "a list of lists")):
        with pytest.raises(RequestError, match=says):
            SamplingParams(**kw)
    lim = LimitsConfig()
    with pytest.raises(RequestError, match=r"at most 64 \(limits.max_bad_words\)"):
        engine.add_request("x", SamplingParams(bad_words=[f"w{i}" for i in range(lim.max_bad_words + 1)]))
    with pytest.raises(RequestError, match=r"in \[0, 8000\)"):
        engine.add_request("x", SamplingParams(bad_words_token_ids=[[8000]]))
    with pytest.raises(RequestError, match="only tokens bad_words bans"):
        engine.add_request("x", SamplingParams(allowed_token_ids=[5, 6], bad_words_token_ids=[[5], [6], [7, 5]]))
    assert not engine.has_unfinished()


def test_the_server_and_offline_lines_take_bad_words(engine):
    body = {"model": "tiny", "prompt": "def fibonacci(n):", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    with in_process_server(engine, ServerConfig()) as (base, _):
        plain = httpx.post(base + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        word = plain.split()[0]
        r = httpx.post(base + "/v1/completions", json={**body, "bad_words": [word]}, timeout=60)
        assert r.status_code == 200, r.text
        assert word not in r.json()["choices"][0]["text"].split() and r.json()["choices"][0]["text"] != plain
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0,
                "bad_words": [word]}
        assert httpx.post(base + "/v1/chat/completions", json=chat, timeout=60).status_code == 200
        r = httpx.post(base + "/v1/completions", json={**body, "bad_words": "x"}, timeout=60)
        assert r.status_code == 400, r.text
        r = httpx.post(base + "/v1/completions", json={**body, "bad_words": ["w"] * 65}, timeout=60)
        assert r.status_code == 400 and "limits.max_bad_words" in r.json()["error"]["message"], r.text
    _, kw = parse_line(json.dumps({"prompt": "x", "bad_words": ["a b", "c"]}), 1)
    assert kw["params"].bad_words == ("a b", "c")


def test_tokenized_words_are_checked_against_allowed_token_ids_and_the_limits(engine):
    """A word's tokens are checked once known: allowed_token_ids holding only what the words ban,
    or a word of more tokens than limits.max_stop_token_ids, is a RequestError (a 400), not a
    failure inside the step."""
    tok = engine.tokenizer
    banned = [t for seq in bad_words_ids(["return"], tok) for t in seq]
    with pytest.raises(RequestError, match="only tokens bad_words bans"):
        engine.add_request("x", SamplingParams(allowed_token_ids=banned, bad_words=["return"]))
    long_word = "".join(f"{i}," for i in range(700))  # within max_stop_chars, past max_stop_token_ids in tokens
    assert len(tok.encode(long_word, add_special_tokens=False)) > engine.config.limits.max_stop_token_ids
    with pytest.raises(RequestError, match=r"bad_words: each at most 256 tokens"):
        engine.add_request("x", SamplingParams(bad_words=[long_word]))
    assert not engine.has_unfinished()
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2, "allowed_token_ids": banned, "bad_words": ["return"]}
    with in_process_server(engine, ServerConfig()) as (base, _):
        r = httpx.post(base + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 400 and "only tokens bad_words bans" in r.json()["error"]["message"], r.text


def test_the_server_tokenizes_the_words_once_per_call_off_the_engine_thread(engine, monkeypatch):
    """The call's n requests reach the engine with the words as token ids (the engine thread
    tokenizes nothing), and generate what the words given so would."""
    import asyncio

    from caraserve.serve import protocol as proto
    from caraserve.serve.async_engine import AsyncEngine
    from caraserve.serve.service import EngineService

    seen, add_request = [], engine.add_request

    def recorded_add(prompt, params=None, *args, **kw):
        seen.append(params)
        return add_request(prompt, params, *args, **kw)

    monkeypatch.setattr(engine, "add_request", recorded_add)
    service = AsyncEngine(engine, max_queue=16)
    service.start()
    try:
        api = EngineService(service, "tiny", [], 1.0)
        body = proto.CompletionRequest(model="tiny", prompt="def fibonacci(n):", n=3, max_tokens=8, temperature=0,
                                       bad_words=["return", "fib"], ignore_eos=True)
        answer = asyncio.run(api.completion(body, "bw", False))
    finally:
        service.stop()
    ids = bad_words_ids(["return", "fib"], engine.tokenizer)
    assert len(seen) == 3 and all(p.bad_words == () and p.bad_words_token_ids == ids for p in seen)
    want = engine.generate(["def fibonacci(n):"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                                                 bad_words_token_ids=ids))[0].text
    assert [c["text"] for c in answer["choices"]] == [want] * 3
