"""vLLM's request fields beyond OpenAI's: those served here do what vLLM's server does with them
(allowed_token_ids, truncate_prompt_tokens, add_special_tokens, the chat template's options,
return_tokens_as_token_ids, cache_salt); those that would change the answer and are not served
are refused by name, never ignored (on an in-process server)."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from test_server_hardening import in_process_server

from caraserve.config import AdapterConfig, EngineConfig, ServerConfig
from caraserve.engine import Engine
from caraserve.request import RequestError, SamplingParams
from caraserve.sampler import adjust_logits

# a template with a variable of its own, as chat models' (e.g. enable_thinking)
TEMPLATE = ("{{ '[' ~ reasoning_effort ~ ']' if reasoning_effort }}"
            "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant{{ ' (' ~ mood ~ ')' if mood }}:{% endif %}")


@pytest.fixture(scope="module")
def live():
    engine = Engine(EngineConfig(compile="false", max_batch_size=4, max_seq_len=256, kv_block_size=16,
                                 adapters=AdapterConfig(dir="none")))
    with in_process_server(engine, ServerConfig(chat_template=TEMPLATE)) as (base, _):
        yield {"base": base, "engine": engine}


def post(live, path: str, body: dict) -> httpx.Response:
    return httpx.post(live["base"] + path, json=body, timeout=60)


def ok(live, path: str, body: dict) -> dict:
    r = post(live, path, body)
    assert r.status_code == 200, r.text
    return r.json()


def refused(live, path: str, body: dict, says: str) -> None:
    r = post(live, path, body)
    assert r.status_code == 400 and says in r.json()["error"]["message"], r.text


BODY = {"model": "tiny", "prompt": "def main():\n    x = 1\n    return x", "max_tokens": 8, "temperature": 0,
        "ignore_eos": True}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 4, "temperature": 0}


@pytest.mark.parametrize("field, value", [
    ("priority", 1),
    ("logits_processors", ["m.f"]),
    ("vllm_xargs", {"a": 1}), ("kv_transfer_params", {"a": 1}), ("mm_processor_kwargs", {"a": 1}),
])
def test_fields_that_would_change_the_answer_are_refused_by_name(live, field, value):
    refused(live, "/v1/completions", {**BODY, field: value}, field)
    refused(live, "/v1/chat/completions", {**CHAT, field: value}, field)


def test_chat_only_fields_not_served_are_refused_and_neutral_values_taken(live):
    refused(live, "/v1/chat/completions", {**CHAT, "chat_template": "{{ x }}"}, "chat_template")
    refused(live, "/v1/chat/completions", {**CHAT, "documents": [{"text": "x"}]}, "documents")
    refused(live, "/v1/chat/completions", {**CHAT, "modalities": ["text", "audio"]}, "modalities")
    refused(live, "/v1/chat/completions", {**CHAT, "audio": {"voice": "x", "format": "wav"}}, "audio")
    refused(live, "/v1/chat/completions", {**CHAT, "web_search_options": {}}, "web_search_options")
    refused(live, "/v1/completions", {**BODY, "prompt_embeds": "AAAA"}, "prompt_embeds")
    refused(live, "/v1/completions", {**BODY, "detokenize": False}, "detokenize")
    neutral = {"bad_words": [], "use_beam_search": False, "priority": 0, "skip_special_tokens": True,
               "return_token_ids": False, "length_penalty": 1.0, "documents": [], "modalities": ["text"],
               "detokenize": True, "prediction": {"type": "content", "content": "x"}}
    want = ok(live, "/v1/chat/completions", CHAT)["choices"][0]["message"]
    assert ok(live, "/v1/chat/completions", {**CHAT, **neutral})["choices"][0]["message"] == want


def test_skip_special_tokens_false_keeps_their_text(live):
    """vLLM's skip_special_tokens: false: a special token's text (here <s>, forced by logit_bias) is
    in the output text, its logprob texts and the stream; by default it reads as nothing."""
    body = {**BODY, "max_tokens": 4, "logit_bias": {"1": 100}, "logprobs": 0}
    skipped = ok(live, "/v1/completions", body)["choices"][0]
    assert skipped["text"] == "" and skipped["logprobs"]["tokens"] == [""] * 4
    kept = ok(live, "/v1/completions", {**body, "skip_special_tokens": False})["choices"][0]
    assert kept["text"] == "<s>" * 4 and kept["logprobs"]["tokens"] == ["<s>"] * 4
    assert kept["logprobs"]["top_logprobs"] == [{"<s>": v} for v in kept["logprobs"]["token_logprobs"]]
    with httpx.stream("POST", live["base"] + "/v1/completions", json={**body, "skip_special_tokens": False,
                                                                      "stream": True}, timeout=60) as r:
        texts = [json.loads(line[6:])["choices"][0]["text"] for line in r.iter_lines()
                 if line.startswith("data: {") and json.loads(line[6:])["choices"]]
    assert "".join(texts) == "<s>" * 4
    from caraserve.offline import parse_line  # offline lines take it too

    assert parse_line(json.dumps({"prompt": "x", "skip_special_tokens": False}), 1)[1]["params"].skip_special_tokens \
        is False


def test_allowed_token_ids_limit_what_is_sampled(live):
    def ids(body: dict) -> list[int]:
        got = ok(live, "/v1/completions", {**body, "logprobs": 0, "return_tokens_as_token_ids": True})
        return [int(t.removeprefix("token_id:")) for t in got["choices"][0]["logprobs"]["tokens"]]

    free = ids(BODY)
    allowed = [11, 57, 300]
    assert not set(free) <= set(allowed)
    for temperature in (0, 1.0):
        got = ids({**BODY, "allowed_token_ids": allowed, "temperature": temperature, "seed": 3})
        assert len(got) == BODY["max_tokens"] and set(got) <= set(allowed)
    refused(live, "/v1/completions", {**BODY, "allowed_token_ids": []}, "allowed_token_ids")
    refused(live, "/v1/completions", {**BODY, "allowed_token_ids": [10**6]}, "allowed_token_ids")
    refused(live, "/v1/completions", {**BODY, "allowed_token_ids": list(range(4097))},
            "allowed_token_ids: at most 4096 ids (limits.max_allowed_token_ids)")
    assert ids({**BODY, "allowed_token_ids": [57] * 5000}) == [57] * BODY["max_tokens"]  # (one id, repeated)
    # nothing left to sample: the model's EOS alone, which min_tokens rules out for a while
    eos = live["engine"].tokenizer.eos_token_id
    refused(live, "/v1/completions", {**BODY, "ignore_eos": False, "allowed_token_ids": [eos], "min_tokens": 2},
            "allowed_token_ids holds only EOS or stop token ids")
    refused(live, "/v1/completions", {**BODY, "allowed_token_ids": [5], "stop_token_ids": [5], "min_tokens": 1},
            "no token could be sampled")


def test_allowed_token_ids_keep_the_best_of_them():
    logits = torch.tensor([[0.0, 5.0, 1.0, 3.0, -2.0]])
    params = [SamplingParams(allowed_token_ids=[0, 3, 4])]
    out = adjust_logits(logits, params, [([1], [])])
    assert out[0].tolist() == [0.0, float("-inf"), float("-inf"), 3.0, -2.0]
    with pytest.raises(RequestError, match="allowed_token_ids must be a non-empty list"):
        SamplingParams(allowed_token_ids=[])


def test_truncate_prompt_tokens_keeps_the_last_tokens(live):
    ids = live["engine"].encode(BODY["prompt"])
    k = 6
    cut = ok(live, "/v1/completions", {**BODY, "truncate_prompt_tokens": k, "echo": True})
    alone = ok(live, "/v1/completions", {**BODY, "prompt": ids[-k:], "echo": True})
    assert cut["usage"]["prompt_tokens"] == k and cut["choices"][0]["text"] == alone["choices"][0]["text"]
    whole = ok(live, "/v1/completions", {**BODY, "truncate_prompt_tokens": -1})
    assert whole["usage"]["prompt_tokens"] == len(ids)
    chat = ok(live, "/v1/chat/completions", {**CHAT, "truncate_prompt_tokens": 3})
    assert chat["usage"]["prompt_tokens"] == 3
    refused(live, "/v1/completions", {**BODY, "truncate_prompt_tokens": 0}, "truncate_prompt_tokens")
    # what it is for: prompts longer than the context (256 here) are cut before they are measured
    long_ids = (ids * 40)[:300]
    cut = ok(live, "/v1/completions", {**BODY, "prompt": long_ids, "truncate_prompt_tokens": 100})
    alone = ok(live, "/v1/completions", {**BODY, "prompt": long_ids[-100:]})
    assert cut["usage"]["prompt_tokens"] == 100 and cut["choices"][0]["text"] == alone["choices"][0]["text"]
    refused(live, "/v1/completions", {**BODY, "prompt": long_ids}, "context length")
    long_chat = {**CHAT, "messages": [{"role": "user", "content": "hi there " * 200}], "max_tokens": 4}
    refused(live, "/v1/chat/completions", long_chat, "context length")
    kept = ok(live, "/v1/chat/completions", {**long_chat, "truncate_prompt_tokens": 200})
    assert kept["usage"]["prompt_tokens"] == 200
    refused(live, "/v1/completions", {**BODY, "truncate_prompt_tokens": 257}, "more than the context length 256")


def test_add_special_tokens_false_leaves_out_the_bos(live):
    engine = live["engine"]
    ids = engine.encode(BODY["prompt"])
    assert ids[0] == engine.tokenizer.bos_token_id
    bare = ok(live, "/v1/completions", {**BODY, "add_special_tokens": False})
    as_ids = ok(live, "/v1/completions", {**BODY, "prompt": ids[1:]})
    assert bare["usage"]["prompt_tokens"] == len(ids) - 1
    assert bare["choices"][0]["text"] == as_ids["choices"][0]["text"]


def test_chat_template_options_render_as_tokenize_renders_them(live):
    tok = live["engine"].tokenizer

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    def prompt_tokens(**extra) -> int:
        return ok(live, "/v1/chat/completions", {**CHAT, **extra})["usage"]["prompt_tokens"]

    assert prompt_tokens() == count("user: hi there\nassistant:")
    assert prompt_tokens(add_generation_prompt=False) == count("user: hi there\n")
    assert prompt_tokens(chat_template_kwargs={"mood": "calm"}) == count("user: hi there\nassistant (calm):")
    assert prompt_tokens(reasoning_effort="low") == count("[low]user: hi there\nassistant:")
    assert prompt_tokens(add_special_tokens=True) == count("user: hi there\nassistant:") + 1  # BOS
    messages = [*CHAT["messages"], {"role": "assistant", "content": "well"}]
    cont = ok(live, "/v1/chat/completions", {**CHAT, "messages": messages, "add_generation_prompt": False,
                                               "continue_final_message": True})
    tokenized = ok(live, "/tokenize", {"model": "tiny", "messages": messages, "add_generation_prompt": False,
                                       "continue_final_message": True})
    assert cont["usage"]["prompt_tokens"] == tokenized["count"] == count("user: hi there\nassistant: well")
    refused(live, "/v1/chat/completions", {**CHAT, "messages": messages, "continue_final_message": True},
            "continue_final_message: true needs add_generation_prompt: false")
    refused(live, "/v1/chat/completions", {**CHAT, "add_generation_prompt": False, "continue_final_message": True},
            "the last message must be the assistant's")
    refused(live, "/v1/chat/completions", {**CHAT, "chat_template_kwargs": {"tokenize": True}},
            "chat_template_kwargs: tokenize cannot be set there")
    refused(live, "/tokenize", {"model": "tiny", "messages": messages, "continue_final_message": True},
            "continue_final_message: true needs add_generation_prompt: false")


def test_return_tokens_as_token_ids_names_each_token_by_its_id(live):
    plain = ok(live, "/v1/completions", {**BODY, "logprobs": 2})["choices"][0]["logprobs"]
    named = ok(live, "/v1/completions", {**BODY, "logprobs": 2, "return_tokens_as_token_ids": True})
    lp = named["choices"][0]["logprobs"]
    tok = live["engine"].tokenizer
    ids = [int(t.removeprefix("token_id:")) for t in lp["tokens"]]
    assert all(t.startswith("token_id:") for t in lp["tokens"])
    assert tok.decode(ids) == named["choices"][0]["text"] and lp["token_logprobs"] == plain["token_logprobs"]
    assert all(k.startswith("token_id:") for top in lp["top_logprobs"] for k in top)
    chat = ok(live, "/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 1,
                                              "return_tokens_as_token_ids": True})
    content = chat["choices"][0]["logprobs"]["content"]
    assert all(e["token"].startswith("token_id:") and e["top_logprobs"][0]["token"].startswith("token_id:")
               for e in content)


def test_cache_salt_shares_prefix_blocks_only_within_one_salt(live):
    body = {**BODY, "prompt": BODY["prompt"] * 4, "max_tokens": 2}  # several full blocks of 16

    def cached(**extra) -> int:
        return ok(live, "/v1/completions", {**body, **extra})["usage"]["prompt_tokens_details"]["cached_tokens"]

    cached(cache_salt="tenant-a")
    assert cached(cache_salt="tenant-a") >= 16
    assert cached(cache_salt="tenant-b") == 0  # the same prompt, another salt
    assert cached() == 0  # no salt: the unsalted blocks are others too
    assert cached() >= 16
    refused(live, "/v1/completions", {**body, "cache_salt": ""}, "cache_salt")
    assert cached(cache_salt="tenant a\n\u00e9") == 0 and cached(cache_salt="tenant a\n\u00e9") >= 16  # any text


def test_an_echoed_token_prompt_reads_as_its_logprob_texts(live):
    """echo of a token-id prompt with logprobs: the echoed text is the prompt's tokens decoded as
    the outputs are (special tokens in with skip_special_tokens false), so the prompt tokens'
    texts add up to it and their offsets point into it."""
    for skip in (True, False):
        body = {**BODY, "prompt": [1, 43, 1675, 1], "max_tokens": 1, "echo": True, "logprobs": 0,
                "skip_special_tokens": skip}
        choice = ok(live, "/v1/completions", body)["choices"][0]
        lp = choice["logprobs"]
        assert choice["text"].startswith("".join(lp["tokens"][:4])) and ("<s>" in choice["text"]) is not skip
        assert lp["text_offset"] == [sum(map(len, lp["tokens"][:i])) for i in range(len(lp["tokens"]))]
