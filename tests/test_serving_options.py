"""server.chat_template, echo and vLLM's sampling extensions, on an in-process server."""

from __future__ import annotations

import httpx
import pytest
from test_server_hardening import in_process_server

from caraserve.config import AdapterConfig, ConfigError, EngineConfig, ServerConfig
from caraserve.engine import Engine

TEMPLATE = "{% for m in messages %}<{{ m.role }}> {{ m.content }}\n{% endfor %}<assistant>"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    folder = tmp_path_factory.mktemp("template")
    (folder / "chat.jinja").write_text(TEMPLATE)
    engine = Engine(EngineConfig(compile="false", max_batch_size=4, max_seq_len=256,
                                 adapters=AdapterConfig(dir="none")))
    with in_process_server(engine, ServerConfig(chat_template=str(folder / "chat.jinja"))) as (base, _):
        yield {"base": base, "engine": engine}


def test_chat_template_from_a_file_is_used(live):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def main():"}]
    r = httpx.post(live["base"] + "/v1/chat/completions", timeout=60,
                   json={"model": "tiny", "messages": messages, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    tok = live["engine"].tokenizer
    rendered = "<system> Be brief.\n<user> def main():\n<assistant>"
    assert r.json()["usage"]["prompt_tokens"] == len(tok(rendered, add_special_tokens=False)["input_ids"])
    # the same prompt through completions gives the same tokens
    c = httpx.post(live["base"] + "/v1/completions", timeout=60,
                   json={"model": "tiny", "prompt": tok(rendered, add_special_tokens=False)["input_ids"],
                         "max_tokens": 4, "temperature": 0})
    assert c.json()["choices"][0]["text"] == r.json()["choices"][0]["message"]["content"]


def test_echo_puts_the_prompt_before_the_completion(live):
    body = {"model": "tiny", "prompt": "import os\n", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    plain = httpx.post(live["base"] + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    echoed = httpx.post(live["base"] + "/v1/completions", json={**body, "echo": True}, timeout=60).json()
    assert echoed["choices"][0]["text"] == "import os\n" + plain
    with httpx.stream("POST", live["base"] + "/v1/completions", json={**body, "echo": True, "stream": True},
                      timeout=60) as r:
        import json

        texts = [json.loads(line[6:])["choices"][0]["text"] for line in r.iter_lines()
                 if line.startswith("data: {")]
    assert texts[0].startswith("import os\n") and "".join(texts) == "import os\n" + plain


def test_a_chat_template_that_is_neither_file_nor_template_is_refused():
    with pytest.raises(ConfigError, match="server.chat_template"):
        ServerConfig(chat_template="/no/such/file.jinja")
    assert ServerConfig(chat_template=TEMPLATE).chat_template == TEMPLATE


def test_n_completions_share_the_prompt_and_differ_by_seed(live):
    prompt = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 6, "ignore_eos": True, "n": 3, "seed": 11,
            "temperature": 1.0}
    r = httpx.post(live["base"] + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2] and out["usage"]["completion_tokens"] == 18
    assert len({c["text"] for c in out["choices"]}) > 1  # seeds 11, 12, 13
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # the 2nd and 3rd reused the 1st's blocks
    again = httpx.post(live["base"] + "/v1/completions", json=body, timeout=60).json()
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in out["choices"]]  # reproducible
    one = httpx.post(live["base"] + "/v1/completions", json={**body, "n": 1, "seed": 12}, timeout=60).json()
    assert one["choices"][0]["text"] == out["choices"][1]["text"]  # choice i is the seed + i request
    chat = httpx.post(live["base"] + "/v1/chat/completions", timeout=60,
                      json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                            "n": 2, "temperature": 0})
    assert chat.status_code == 200 and [c["index"] for c in chat.json()["choices"]] == [0, 1]
    assert chat.json()["choices"][0]["message"] == chat.json()["choices"][1]["message"]  # greedy: the same


def _events(base: str, path: str, body: dict) -> list[dict]:
    import json

    with httpx.stream("POST", base + path, json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_streamed_n_completions_are_the_non_streamed_choices(live):
    body = {"model": "tiny", "prompt": "class Stack:\n", "max_tokens": 6, "ignore_eos": True, "n": 3, "seed": 5,
            "temperature": 1.0, "echo": True}
    whole = httpx.post(live["base"] + "/v1/completions", json=body, timeout=60).json()
    events = _events(live["base"], "/v1/completions",
                     {**body, "stream": True, "stream_options": {"include_usage": True}})
    texts, finishes = ["", "", ""], {}
    for e in events[:-1]:
        (c,) = e["choices"]
        texts[c["index"]] += c["text"]
        if c["finish_reason"] is not None:
            finishes[c["index"]] = c["finish_reason"]
    assert texts == [c["text"] for c in whole["choices"]]  # each starts with the echoed prompt once
    assert all(t.startswith("class Stack:\n") for t in texts) and finishes == {0: "length", 1: "length", 2: "length"}
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 18
    # chat: every choice's first delta carries the role, and the choices are the non-streamed ones
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "n": 2,
            "seed": 3, "temperature": 1.0, "ignore_eos": True}
    whole = httpx.post(live["base"] + "/v1/chat/completions", json=chat, timeout=60).json()
    deltas: dict[int, list[dict]] = {0: [], 1: []}
    for e in _events(live["base"], "/v1/chat/completions", {**chat, "stream": True}):
        (c,) = e["choices"]
        deltas[c["index"]].append(c["delta"])
    for i in (0, 1):
        assert deltas[i][0]["role"] == "assistant" and all("role" not in d for d in deltas[i][1:])
        assert "".join(d.get("content", "") for d in deltas[i]) == whole["choices"][i]["message"]["content"]


def test_a_list_of_prompts_gives_each_prompt_its_n_choices(live):
    """OpenAI's batched completions: prompt k's completion j is choice k * n + j, each as the
    prompt alone gives it (seeded: completion j of a prompt samples with seed + j), streamed or
    not; usage counts each prompt once."""
    prompts = ["def main():", "x = [1, 2]", "import os\n"]
    body = {"model": "tiny", "prompt": prompts, "max_tokens": 5, "ignore_eos": True, "n": 2, "seed": 7,
            "temperature": 1.0, "echo": True, "logprobs": 1}
    r = httpx.post(live["base"] + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [c["index"] for c in out["choices"]] == list(range(6))
    alone = [httpx.post(live["base"] + "/v1/completions", json={**body, "prompt": p}, timeout=60).json()
             for p in prompts]
    for k, one in enumerate(alone):
        for j in range(2):
            mine = out["choices"][k * 2 + j]
            assert (mine["text"], mine["logprobs"]) == (one["choices"][j]["text"], one["choices"][j]["logprobs"])
    assert out["usage"]["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in alone)
    assert out["usage"]["completion_tokens"] == 30
    events = _events(live["base"], "/v1/completions",
                     {**body, "stream": True, "stream_options": {"include_usage": True}})
    texts = [""] * 6
    for e in events[:-1]:
        (c,) = e["choices"]
        texts[c["index"]] += c["text"]
    assert texts == [c["text"] for c in out["choices"]]
    assert events[-1]["usage"] == out["usage"]
    too_many = httpx.post(live["base"] + "/v1/completions", timeout=60,
                          json={"model": "tiny", "prompt": ["x"] * 65, "max_tokens": 1})
    assert too_many.status_code == 400 and "limits.max_prompts" in too_many.json()["error"]["message"]
    ids = httpx.post(live["base"] + "/v1/completions", timeout=60,
                     json={"model": "tiny", "prompt": [[1, 445, 596], [1, 43]], "max_tokens": 2, "temperature": 0})
    assert ids.status_code == 200 and len(ids.json()["choices"]) == 2, ids.text
    for prompt in (["x", [1, 2]], [[1, 2], [10**7]]):  # text and token ids mixed (as OpenAI's API); a bad id
        bad = httpx.post(live["base"] + "/v1/completions", timeout=60,
                         json={"model": "tiny", "prompt": prompt, "max_tokens": 1})
        assert bad.status_code == 400, bad.text


def test_a_list_of_prompts_is_refused_whole_before_any_starts(live):
    """A later prompt that cannot fit (or holds a bad token id) refuses the call with a 400 naming
    it, before the first prompt starts: it is counted as a refusal, not as an aborted request."""
    def count(status: str) -> float:
        text = httpx.get(live["base"] + "/metrics", timeout=10).text
        line = f'caraserve_requests_total{{status="{status}"}} '
        return next((float(x[len(line):]) for x in text.splitlines() if x.startswith(line)), 0.0)

    before = count("rejected_bad_request"), count("abort")
    for prompt, says in ((["hi", " hello" * 200], "prompt 1: prompt ("), ([[1, 2], [1, 10**7]], "prompt 1: ")):
        r = httpx.post(live["base"] + "/v1/completions", timeout=60,
                       json={"model": "tiny", "prompt": prompt, "max_tokens": 100})
        assert r.status_code == 400 and r.json()["error"]["message"].startswith(says), r.text
    assert (count("rejected_bad_request"), count("abort")) == (before[0] + 2, before[1])


def test_a_non_streamed_call_gets_one_output_a_streamed_one_every_token(live, monkeypatch):
    """A non-streamed completion reads only its last output: its request is final-only, so the
    engine hands over one output for it instead of one per token; the text is the stream's."""
    import collections
    import json

    engine = live["engine"]
    counts, real = collections.Counter(), engine.step

    def step():
        outs = real()
        counts.update(o.request_id for o in outs)
        return outs

    monkeypatch.setattr(engine, "step", step)
    body = {"model": "tiny", "prompt": "class A:", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    plain = httpx.post(live["base"] + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    assert list(counts.values()) == [1]
    with httpx.stream("POST", live["base"] + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        texts = [json.loads(line[6:])["choices"][0]["text"] for line in r.iter_lines() if line.startswith("data: {")]
    assert sorted(counts.values()) == [1, 6] and "".join(texts) == plain != ""


def test_vllm_min_p_and_include_stop_str_in_output(live):
    body = {"model": "tiny", "prompt": "import os\n", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    free = httpx.post(live["base"] + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    stop = free[4:7]
    kept = httpx.post(live["base"] + "/v1/completions", timeout=60,
                      json={**body, "stop": [stop], "include_stop_str_in_output": True}).json()["choices"][0]
    assert kept["finish_reason"] == "stop" and kept["text"] == free[: free.index(stop) + len(stop)]
    # min_p = 1 keeps only the most likely token: sampling at any temperature gives the greedy text
    hot = httpx.post(live["base"] + "/v1/completions", timeout=60,
                     json={**body, "temperature": 1.5, "seed": 4, "min_p": 1.0}).json()["choices"][0]["text"]
    assert hot == free
    bad = httpx.post(live["base"] + "/v1/completions", json={**body, "min_p": 2}, timeout=60)
    assert bad.status_code == 400 and "min_p" in bad.json()["error"]["message"]


def test_tokenize_and_detokenize(live):
    tok = live["engine"].tokenizer
    r = httpx.post(live["base"] + "/tokenize", json={"model": "tiny", "prompt": "import os"}, timeout=60).json()
    assert r["tokens"] == tok("import os")["input_ids"] and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 256
    bare = httpx.post(live["base"] + "/tokenize", timeout=60,
                      json={"model": "tiny", "prompt": "import os", "add_special_tokens": False}).json()
    assert bare["tokens"] == tok("import os", add_special_tokens=False)["input_ids"] != r["tokens"]
    assert r["token_strs"] is None
    strs = httpx.post(live["base"] + "/tokenize", timeout=60,
                      json={"model": "tiny", "prompt": "import os", "return_token_strs": True}).json()
    assert strs["token_strs"] == tok.convert_ids_to_tokens(r["tokens"]) and len(strs["token_strs"]) == r["count"]
    messages = [{"role": "user", "content": "def main():"}]
    chat = httpx.post(live["base"] + "/tokenize", json={"model": "tiny", "messages": messages}, timeout=60).json()
    usage = httpx.post(live["base"] + "/v1/chat/completions", timeout=60,
                       json={"model": "tiny", "messages": messages, "max_tokens": 1}).json()["usage"]
    assert chat["count"] == usage["prompt_tokens"]  # the same template, the same ids
    back = httpx.post(live["base"] + "/detokenize", json={"model": "tiny", "tokens": bare["tokens"]}, timeout=60)
    assert back.json() == {"prompt": "import os"}
    for path, body, status, says in (
            ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "`nope` does not exist"),
            ("/tokenize", {"model": "tiny"}, 400, "either 'prompt' or 'messages'"),
            ("/tokenize", {"model": "tiny", "prompt": "x", "messages": messages}, 400, "either"),
            ("/detokenize", {"model": "tiny", "tokens": [10**9]}, 400, "token ids in [0,"),
            ("/detokenize", {"model": "tiny", "tokens": ["a"]}, 400, "tokens"),
            ("/v1/completions", {"model": "tiny", "prompt": "x", "suffix": "y"}, 400, "suffix is not supported")):
        r = httpx.post(live["base"] + path, json=body, timeout=60)
        assert r.status_code == status and says in r.json()["error"]["message"], r.text
