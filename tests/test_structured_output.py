"""Structured outputs (OpenAI's response_format, vLLM's structured_outputs and guided_*): the
spec's checks, the grammar mask against a plain loop over transformers' model (+ peft) that
reads an independent matcher's bitmask bit by bit, the end at a complete grammar, conflicts with
a request's other settings, preemption, and the API forms of the server and of offline lines."""

from __future__ import annotations

import json
import re

import httpx
import pytest
import torch
import xgrammar as xgr
from test_server_hardening import in_process_server

from caraserve.config import AdapterConfig, EngineConfig, ServerConfig
from caraserve.engine import Engine
from caraserve.model.tiny import tiny_paths
from caraserve.offline import run_offline
from caraserve.request import ErrorCause, FinishReason, RequestError, SamplingParams
from caraserve.sampler import NonFiniteLogits, sample
from caraserve.structured_output import GrammarConflict, StructuredOutputs, choice_grammar, mask_logits

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
          "required": ["ok", "n"], "additionalProperties": False}
GRAMMAR = 'root ::= ("ab" | "cd") ("!" | "?")'
SPECS = {
    "json": StructuredOutputs(json=SCHEMA, disable_any_whitespace=True),
    "regex": StructuredOutputs(regex=r"[a-z]{3}-\d{2}"),
    "choice": StructuredOutputs(choice=("yes", "no", 'mañana "x"')),
    "grammar": StructuredOutputs(grammar=GRAMMAR),
}


def valid(kind: str, text: str) -> bool:
    if kind == "json":
        value = json.loads(text)
        return set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and value["n"] in (1, 2, 3)
    if kind == "regex":
        return re.fullmatch(r"[a-z]{3}-\d{2}", text) is not None
    if kind == "choice":
        return text in SPECS["choice"].choice
    return re.fullmatch(r"(ab|cd)[!?]", text) is not None


@pytest.fixture(scope="module")
def engine():
    return Engine(EngineConfig(device="cpu", compile="false", adapters=AdapterConfig(dir="demo")))


@pytest.fixture(scope="module")
def hf_models():
    """transformers' base model and the demo-r16 adapter on it through peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir, adapter_dir = tiny_paths()

    def base():
        return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()

    return {None: base(), "demo-r16": PeftModel.from_pretrained(base(), str(adapter_dir / "demo-r16")).eval()}


def reference_matcher(engine: Engine, spec: StructuredOutputs) -> xgr.GrammarMatcher:
    info = xgr.TokenizerInfo.from_huggingface(engine.tokenizer, vocab_size=engine.model.args.vocab_size,
                                              stop_token_ids=sorted(engine._eos_ids))
    compiler = xgr.GrammarCompiler(info)
    if spec.json is not None:
        return xgr.GrammarMatcher(compiler.compile_json_schema(spec.json, any_whitespace=False))
    if spec.regex is not None:
        return xgr.GrammarMatcher(compiler.compile_regex(spec.regex))
    return xgr.GrammarMatcher(compiler.compile_grammar(spec.grammar or choice_grammar(spec.choice)))


def allowed(matcher: xgr.GrammarMatcher, vocab: int) -> torch.Tensor:
    """[V] bool: the matcher's next tokens, read bit by bit from its bitmask (bit t % 32 of word t // 32)."""
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    matcher.fill_next_token_bitmask(bitmask)
    return ((bitmask[0, :, None] >> torch.arange(32)) & 1).bool().flatten()[:vocab]


def reference_greedy(model, engine: Engine, prompt: list[int], spec: StructuredOutputs, max_tokens: int) -> list[int]:
    """Greedy tokens of a plain loop: the whole sequence through `model`, logits of the tokens
    the matcher does not allow at -inf, argmax, until an EOS token or max_tokens."""
    matcher, vocab, out = reference_matcher(engine, spec), engine.model.args.vocab_size, []
    with torch.no_grad():
        while len(out) < max_tokens and (not out or out[-1] not in engine._eos_ids):
            logits = model(torch.tensor([prompt + out])).logits[0, -1]
            token = int(torch.where(allowed(matcher, vocab), logits, float("-inf")).argmax())
            assert matcher.accept_token(token)
            out.append(token)
    return out


def test_greedy_outputs_match_the_reference_in_a_batch_with_free_rows_and_adapters(engine, hf_models):
    prompt = engine.encode("def parse(line):")
    cases = [(kind, adapter) for kind in SPECS for adapter in (None, "demo-r16")]
    params = [SamplingParams(max_tokens=40, temperature=0, structured_outputs=SPECS[k]) for k, _ in cases]
    free = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    reqs = engine.generate([prompt] * (len(cases) + 2), params + [free, free],
                           [a for _, a in cases] + ["demo-r64", None])
    for (kind, adapter), req in zip(cases, reqs):
        assert req.output_ids == reference_greedy(hf_models[adapter], engine, prompt, SPECS[kind], 40), kind
        assert req.finish_reason is FinishReason.EOS and valid(kind, req.text), (kind, adapter, req.text)
    alone = engine.generate([prompt] * 2, free, ["demo-r64", None])
    assert [r.output_ids for r in reqs[-2:]] == [r.output_ids for r in alone]  # free rows: untouched


def test_sampled_outputs_match_their_grammar(engine):
    prompt = engine.encode("x = ")
    for kind, spec in SPECS.items():
        for seed in range(3):
            req = engine.generate([prompt], SamplingParams(max_tokens=40, temperature=1.0, seed=seed,
                                                           structured_outputs=spec), "demo-r32")[0]
            assert req.finish_reason is FinishReason.EOS and valid(kind, req.text), (kind, seed, req.text)


def test_a_complete_grammar_ends_the_request_even_with_ignore_eos(engine):
    req = engine.generate(["a"], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                                structured_outputs=SPECS["choice"]))[0]
    assert req.finish_reason is FinishReason.EOS and req.text in SPECS["choice"].choice
    assert len(req.output_ids) < 30


def test_a_grammar_the_other_settings_rule_out_fails_that_request_only(engine):
    prompt = engine.encode("a")
    only_space = engine.encode(" ")[-1:]  # no choice starts with a space
    bad = SamplingParams(max_tokens=8, temperature=0, allowed_token_ids=only_space,
                         structured_outputs=SPECS["choice"])
    free = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    failed, ok = engine.generate([prompt, prompt], [bad, free])
    assert failed.finish_reason is FinishReason.ERROR and "structured output" in failed.error
    assert failed.error_cause is ErrorCause.PARAMS  # the caller's settings: a 400
    assert ok.finish_reason is FinishReason.LENGTH and len(ok.output_ids) == 8


def test_a_complete_grammar_ends_the_request_before_min_tokens(engine):
    """min_tokens bans EOS, but a complete grammar allows nothing else: its end wins, as over ignore_eos."""
    req = engine.generate(["a"], SamplingParams(max_tokens=30, temperature=0, min_tokens=20,
                                                structured_outputs=SPECS["choice"]))[0]
    assert req.finish_reason is FinishReason.EOS and req.text in SPECS["choice"].choice


def test_json_keys_come_in_the_schemas_order(engine):
    schema = {"type": "object", "properties": {"zeta": {"type": "boolean"}, "alpha": {"type": "boolean"}},
              "required": ["zeta", "alpha"], "additionalProperties": False}
    for spec in (StructuredOutputs(json=schema, disable_any_whitespace=True),
                 StructuredOutputs(json=json.dumps(schema), disable_any_whitespace=True)):
        req = engine.generate(["a"], SamplingParams(max_tokens=30, temperature=0, structured_outputs=spec))[0]
        assert list(json.loads(req.text)) == ["zeta", "alpha"], req.text


@pytest.mark.parametrize("choices", [
    ("yes", "no", "y", "yes!", "ye"),  # choices that are prefixes of others
    tuple(f"option-{i}" for i in range(300)),
    ('a "quoted" \\ line\n', "tab\there", "émoji 😀", "a", "a"),  # escapes, unicode, a duplicate
    tuple("a" * k for k in range(1, 90)),  # a prefix tree deeper than CHOICE_DEPTH: the flat form
])
def test_a_choice_grammar_takes_exactly_the_choices(engine, choices):
    import random

    compiled = engine.grammars.compile(StructuredOutputs(choice=choices))
    members = set(choices)
    rng = random.Random(0)
    probes = list(members) + [c[:-1] for c in choices if c[:-1]] + [c + "x" for c in choices] + \
        ["".join(rng.choice("aeynos-0123") for _ in range(rng.randint(1, 6))) for _ in range(200)]
    for text in probes:
        m = xgr.GrammarMatcher(compiled)
        taken = m.accept_string(text)
        assert (taken and m.is_completed()) == (text in members), text


def test_preempted_requests_keep_their_grammar(engine):
    roomy = Engine(EngineConfig(device="cpu", compile="false", adapters=AdapterConfig(dir="none")))
    tight = Engine(EngineConfig(device="cpu", compile="false", adapters=AdapterConfig(dir="none"),
                                kv_block_size=4, num_kv_blocks=14, max_batch_size=8))
    prompts = [engine.encode(f"value_{i} = ") for i in range(6)]
    params = SamplingParams(max_tokens=24, temperature=0, structured_outputs=SPECS["json"])
    want = [r.output_ids for r in roomy.generate(prompts, params)]
    got = tight.generate(prompts, params)
    assert tight.scheduler.num_preemptions > 0
    assert [r.output_ids for r in got] == want and all(valid("json", r.text) for r in got)


def test_mask_logits_masks_only_the_rows_with_a_grammar(engine):
    g = engine.grammars.matcher(SPECS["choice"])
    logits = torch.randn(3, engine.model.args.vocab_size)
    before = logits.clone()
    out = mask_logits(logits, [None, g, None])
    assert out is logits and torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    keep = allowed(reference_matcher(engine, SPECS["choice"]), logits.shape[1])
    assert torch.equal(torch.isfinite(logits[1]), keep) and torch.equal(logits[1][keep], before[1][keep])
    emptied = torch.where(keep, float("-inf"), 0.0).repeat(2, 1)  # row 1: every token its grammar allows banned
    params = [SamplingParams(temperature=0)] * 2
    with pytest.raises(GrammarConflict, match="allows no token") as conflict:
        sample(emptied, params, [None, None], grammars=[None, g])
    assert conflict.value.rows == [1]
    nan = emptied.clone()
    nan[1] = float("nan")
    with pytest.raises(NonFiniteLogits):  # NaN logits are not the grammar's doing
        sample(nan, params, [None, None], grammars=[None, g])
    strided = before.t().contiguous().t()  # not contiguous: xgrammar's own form of the mask
    assert not strided.is_contiguous()
    assert torch.equal(mask_logits(strided, [None, g, None]), logits)


@pytest.mark.parametrize("kw, says", [
    ({}, "exactly one"), ({"regex": "a", "choice": ["a"]}, "regex, choice"), ({"json": "{"}, "not JSON"),
    ({"json": "[1]"}, "JSON schema"), ({"json": 3}, "JSON schema"), ({"choice": []}, "choice"),
    ({"choice": "ab"}, "choice"), ({"choice": ["a", ""]}, "choice"), ({"regex": ""}, "regex"),
    ({"json_object": 1}, "json_object"), ({"json_object": True, "disable_any_whitespace": "yes"}, "whitespace"),
    ({"grammar": "x" * (1 << 20 + 1)}, "characters"),
])
def test_bad_specs_are_refused_by_name(kw, says):
    with pytest.raises(RequestError, match=says):
        StructuredOutputs(**kw)


def test_specs_from_mappings():
    assert StructuredOutputs.of({"json": {"b": 1, "a": 2}}).json == '{"b": 1, "a": 2}'  # in its order
    assert SamplingParams(structured_outputs={"choice": ["x"]}).structured_outputs == StructuredOutputs(choice=("x",))
    with pytest.raises(RequestError, match="whitespace_pattern"):
        StructuredOutputs.of({"regex": "a", "whitespace_pattern": " "})
    with pytest.raises(RequestError, match="object"):
        SamplingParams(structured_outputs="a+")


@pytest.mark.parametrize("spec, says", [
    (StructuredOutputs(json={"type": "nosuchtype"}), "json does not compile"),
    (StructuredOutputs(regex="([a-z]"), "regex does not compile"),
    (StructuredOutputs(grammar="root ::= "), "grammar does not compile"),
    (StructuredOutputs(grammar='start ::= "a"'), "grammar does not compile"),
])
def test_specs_that_do_not_compile_are_the_callers_error(engine, spec, says):
    params = SamplingParams(max_tokens=4, structured_outputs=spec)
    with pytest.raises(RequestError, match=says):
        engine.add_request("a", params)
    assert not engine.has_unfinished()


@pytest.fixture(scope="module")
def live():
    engine = Engine(EngineConfig(compile="false", max_batch_size=4, max_seq_len=256,
                                 adapters=AdapterConfig(dir="demo")))
    with httpx.Client(timeout=60) as client, in_process_server(engine, ServerConfig()) as (base, _):
        yield lambda path, body: client.post(base + path, json=body), base


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Answer in JSON"}], "max_tokens": 40,
        "temperature": 0}


@pytest.mark.parametrize("field, value, kind", [
    ("response_format", {"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA, "strict": True}},
     "json_any_space"),
    ("guided_choice", ["yes", "no", 'mañana "x"'], "choice"),
    ("guided_regex", r"[a-z]{3}-\d{2}", "regex"),
    ("guided_grammar", GRAMMAR, "grammar"),
    ("structured_outputs", {"json": SCHEMA, "disable_any_whitespace": True}, "json"),
    ("guided_json", json.dumps(SCHEMA), "json_any_space"),
])
def test_the_api_forms_constrain_chat_and_completions(live, field, value, kind):
    post, _ = live
    check = "json" if kind == "json_any_space" else kind
    chat = post("/v1/chat/completions", {**CHAT, "model": "demo-r8", field: value, "max_tokens": 200})
    assert chat.status_code == 200, chat.text
    choice = chat.json()["choices"][0]
    if kind != "json_any_space" or choice["finish_reason"] == "stop":  # (JSON may take spaces to its length)
        assert choice["finish_reason"] == "stop" and valid(check, choice["message"]["content"]), choice
    else:
        assert choice["message"]["content"].startswith("{")
    completion = post("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 40, "temperature": 0,
                                          "n": 2, "seed": 3, field: value})
    assert completion.status_code == 200, completion.text
    for c in completion.json()["choices"]:
        assert c["text"].lstrip().startswith("{") if kind == "json_any_space" else valid(check, c["text"])


def test_json_object_mode_and_streaming(live):
    post, base = live
    body = {**CHAT, "response_format": {"type": "json_object"}, "stream": True}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.startswith("{")
    whole = post("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}}).json()
    assert whole["choices"][0]["message"]["content"] == text


@pytest.mark.parametrize("extra, says", [
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "response_format, guided_regex"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "json_schema.schema"),
    ({"response_format": {"type": "grammar"}}, "'grammar' is not supported"),
    ({"guided_regex": "([a"}, "regex does not compile"),
    ({"guided_json": {"type": "nosuchtype"}}, "json does not compile"),
    ({"guided_choice": []}, "choice"),
    ({"structured_outputs": {"regex": "a", "backend": "outlines"}}, "backend"),
])
def test_bad_structured_outputs_are_a_400_naming_the_problem(live, extra, says):
    post, _ = live
    r = post("/v1/chat/completions", {**CHAT, **extra})
    assert r.status_code == 400 and says in r.json()["error"]["message"], r.text


def test_offline_lines_take_structured_outputs(engine):
    lines = [json.dumps({"id": "a", "prompt": "x", "max_tokens": 30, "temperature": 0,
                         "structured_outputs": {"choice": ["yes", "no"]}}),
             json.dumps({"id": "b", "prompt": "x", "max_tokens": 30, "structured_outputs": {"regex": "("}}),
             json.dumps({"id": "c", "prompt": "x", "max_tokens": 30,
                         "structured_outputs": {"regex": "a", "json": "{}"}})]
    lines += [json.dumps({"id": "d", "prompt": "x", "max_tokens": 30, "temperature": 0, "guided_choice": ["ab", "cd"]}),
              json.dumps({"id": "e", "prompt": "x", "max_tokens": 30, "temperature": 0,
                          "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}},
                          "guided_regex": "a"}),
              json.dumps({"id": "f", "prompt": "x", "max_tokens": 30, "response_format": "json"})]
    results, _ = run_offline(engine, lines)
    by_id = {r["id"]: r for r in results}
    assert by_id["a"]["text"] in ("yes", "no") and by_id["a"]["finish_reason"] == "stop"
    assert "regex does not compile" in by_id["b"]["error"] and "exactly one" in by_id["c"]["error"]
    assert by_id["d"]["text"] in ("ab", "cd")  # the server's forms too
    assert "response_format, guided_regex" in by_id["e"]["error"] and "must be an object" in by_id["f"]["error"]


def test_without_xgrammar_a_structured_request_says_why(engine, monkeypatch):
    import sys

    from caraserve.structured_output import Grammars

    monkeypatch.setitem(sys.modules, "xgrammar", None)  # import xgrammar raises ImportError
    grammars = Grammars(engine.tokenizer, engine.model.args.vocab_size, engine._eos_ids)
    with pytest.raises(RequestError, match="need the xgrammar package"):
        grammars.compile(SPECS["regex"])


def test_settings_that_leave_the_grammar_nothing_are_a_400(live):
    post, _ = live
    space = post("/tokenize", {"model": "tiny", "prompt": " ", "add_special_tokens": False}).json()["tokens"]
    r = post("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 5, "guided_choice": ["yes", "no"],
                                 "allowed_token_ids": space})
    assert r.status_code == 400 and "allows no token" in r.json()["error"]["message"], r.text
