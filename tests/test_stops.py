"""Stop strings, stop token ids and EOS: where a request ends, what its text keeps (the stop
token's text only with include_stop_str_in_output, as vLLM's), min_tokens, and streamed pieces
that never send text a stop string later claims."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from caraserve.config import AdapterConfig, EngineConfig, ModelConfig
from caraserve.engine import Engine
from caraserve.model.loader import ModelLoadError
from caraserve.model.tiny import tiny_paths
from caraserve.output_processor import OutputProcessor
from caraserve.request import FinishReason, Request, SamplingParams


def make_engine() -> Engine:
    """The embedded default (a fresh one: some tests change its EOS ids)."""
    return Engine(EngineConfig(compile="false", adapters=AdapterConfig(dir="demo", preload="host")))


def test_stop_string_and_stop_token_and_eos():
    engine = make_engine()
    free = engine.generate(["def main():"], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    stop_text = free.text[5:8]
    assert stop_text
    stopped = engine.generate(["def main():"], SamplingParams(max_tokens=20, temperature=0, stop=[stop_text]))[0]
    assert stopped.finish_reason is FinishReason.STOP
    assert stop_text not in stopped.text and free.text.startswith(stopped.text)
    sp = SamplingParams(max_tokens=20, temperature=0, stop=[stop_text, "\x00"], include_stop_str_in_output=True)
    kept = engine.generate(["def main():"], sp)[0]
    assert kept.finish_reason is FinishReason.STOP and kept.text == stopped.text + stop_text
    assert "".join(o.new_text for o in engine.stream("def main():", sp)) == kept.text
    tok = free.output_ids[4]
    by_id = engine.generate(["def main():"], SamplingParams(max_tokens=20, temperature=0,
                                                            stop_token_ids=[tok], ignore_eos=True))[0]
    assert by_id.finish_reason is FinishReason.STOP and by_id.output_ids[-1] == tok
    assert len(by_id.output_ids) == free.output_ids.index(tok) + 1
    # The stop token's own text is not output (as vLLM's), unless include_stop_str_in_output;
    # final-only, streamed and with a stop string (token by token) alike.
    decode = engine.outputs.tokenizer.decode
    before, through = decode(by_id.output_ids[:-1]), decode(by_id.output_ids)
    assert by_id.text == before != through
    for extra in ({}, {"stop": ["\x00"]}):
        for keep in (False, True):
            sp = SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[tok], ignore_eos=True,
                                include_stop_str_in_output=keep, **extra)
            streamed = list(engine.stream("def main():", sp))
            final = engine.generate(["def main():"], sp)[0]
            # (a broken character the stop token leaves at the end is left out, as vLLM's detokenizer does)
            assert final.text == "".join(o.new_text for o in streamed) == (through.rstrip("\ufffd") if keep else before)
    first = engine.generate(["def main():"], SamplingParams(max_tokens=20, temperature=0,
                                                            stop_token_ids=[free.output_ids[0]]))[0]
    assert first.output_ids == free.output_ids[:1] and first.text == ""
    engine.outputs.eos_ids = {free.output_ids[2]}
    eos = engine.generate(["def main():"], SamplingParams(max_tokens=20, temperature=0))[0]
    assert eos.finish_reason is FinishReason.EOS
    assert len(eos.output_ids) == free.output_ids.index(free.output_ids[2]) + 1


def test_stop_strings_count_once_min_tokens_are_out():
    """As vLLM's: a stop string that ends in the text of the first min_tokens tokens does not end
    the request; one ending in a later token's text does."""
    engine = make_engine()
    free = engine.generate(["def main():"], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    decode = engine.outputs.tokenizer.decode
    stop = free.text[len(decode(free.output_ids[:1])):][:2]  # in the second token's text (or the third's)
    assert stop and free.text.count(stop) == 1
    at = next(k for k in range(1, 21) if stop in decode(free.output_ids[:k]))  # the token completing it
    early = engine.generate(["def main():"], SamplingParams(max_tokens=20, temperature=0, stop=[stop]))[0]
    assert early.finish_reason is FinishReason.STOP and len(early.output_ids) == at
    sp = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=[stop], min_tokens=at)
    late = engine.generate(["def main():"], sp)[0]
    assert late.finish_reason is FinishReason.LENGTH and late.output_ids == free.output_ids
    assert late.text == free.text
    sp = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=[stop], min_tokens=at - 1)
    assert engine.generate(["def main():"], sp)[0].output_ids == early.output_ids


def test_streamed_text_never_holds_a_stop_string():
    """With stop strings, the streamed pieces add up to the final text, and no piece sends text
    that a stop string later claims: the tail that begins a stop string waits for the next token
    (here each stop string is the text's next characters: its first ones come a token early)."""
    engine = make_engine()
    free = engine.generate(["def fibonacci(n):"], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
                           ["demo-r16"])[0]
    pieces = [engine.outputs.tokenizer.decode([t]) for t in free.output_ids]
    at = next(i for i in range(3, len(pieces)) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 1)
    cut = len("".join(pieces[:at])) + 1  # a stop string starting inside token `at`, ending in the next
    for stop in (free.text[cut : cut + len(pieces[at])], free.text[cut:cut + 2] + "\x00never"):
        sp = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop])
        outs = list(engine.stream("def fibonacci(n):", sp, "demo-r16"))
        streamed = "".join(o.new_text for o in outs)
        assert streamed == outs[-1].text
        if stop in free.text:
            assert outs[-1].finish_reason is FinishReason.STOP and streamed == free.text[:cut]
        else:  # a stop string that never completes: everything is sent, the held tail at the end
            assert outs[-1].finish_reason is FinishReason.LENGTH and streamed == free.text
        sent = ""
        for o in outs:
            sent += o.new_text
            assert free.text.startswith(sent) and stop not in sent


def test_stop_prefix_len():
    from caraserve.output_processor import stop_prefix_len

    assert stop_prefix_len("abc ##", ["###D"]) == 2
    assert stop_prefix_len("abc #", ["###D", "c #x"]) == 3
    assert stop_prefix_len("abc", ["###D"]) == 0
    assert stop_prefix_len("abc ###D", ["###D"]) == 0  # a whole stop string is a match, not a prefix
    assert stop_prefix_len("", ["ab"]) == 0


def test_generation_config_eos_ends_requests_as_transformers_generate(tmp_path):
    """A chat model lists its end-of-turn token in generation_config.json only (Llama 3
    Instruct's <|eot_id|>): transformers' generate and vLLM stop at it, so the engine does too."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_paths()[0], folder)
    cfg = EngineConfig(compile="false", model=ModelConfig(path=str(folder)), adapters=AdapterConfig(dir=""))
    greedy = SamplingParams(max_tokens=8, temperature=0)
    free = Engine(cfg).generate(["def main():"], greedy)[0]
    turn_end = free.output_ids[2]
    assert turn_end not in free.output_ids[:2]
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, turn_end]}))

    engine = Engine(cfg)
    out = engine.generate(["def main():"], greedy)[0]
    assert out.finish_reason is FinishReason.EOS and out.output_ids == free.output_ids[:3]
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("def main():", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(folder).generate(ids, max_new_tokens=8, do_sample=False)
    assert ref[0, ids.shape[1]:].tolist() == out.output_ids
    ignoring = engine.generate(["def main():"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert ignoring.output_ids == free.output_ids

    (folder / "generation_config.json").write_text("[2]")
    with pytest.raises(ModelLoadError, match=r"generation_config\.json must hold a JSON object"):
        Engine(cfg)


def test_eos_or_a_stop_token_as_the_last_allowed_token_ends_as_itself():
    """A request whose max_tokens-th token is EOS ends as EOS, one whose last is a stop token id as
    STOP with that id as its stop_reason (not as LENGTH: their text leaves the token out)."""
    proc = OutputProcessor(None, {2}, 100)
    eos = Request("a", [1], SamplingParams(max_tokens=3))
    eos.output_ids = [5, 6, 2]
    assert proc.end_reason(eos) is FinishReason.EOS and proc.text_end(eos, FinishReason.EOS) == 2
    stop = Request("b", [1], SamplingParams(max_tokens=2, stop_token_ids=[9]))
    stop.output_ids = [5, 9]
    assert proc.end_reason(stop) is FinishReason.STOP and stop.stop_reason == 9
    ignored = Request("c", [1], SamplingParams(max_tokens=3, ignore_eos=True))
    ignored.output_ids = [5, 6, 2]
    assert proc.end_reason(ignored) is FinishReason.LENGTH


@pytest.mark.parametrize("stops,text,kept,reason", [
    (["world", "hello"], "say hello world", "say ", "hello"),  # the first place a stop string ends the text
    (["\n", "\n\n"], "ab\n\ncd", "ab", "\n\n"),  # at one place, the longest stop string
])
def test_the_first_stop_string_in_the_text_cuts_it(stops, text, kept, reason):
    proc = OutputProcessor(None, {2}, 100)
    req = Request("a", [1], SamplingParams(max_tokens=10, stop=stops))
    req.output_ids, req.text = [5], text
    assert proc.stop(req, text) == (FinishReason.STOP, kept)
    assert req.text == kept and req.stop_reason == reason
