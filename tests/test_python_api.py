"""The Python API as the README shows it: its example runs as written, and `import caraserve`
gives the engine's names without loading torch until one is used."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

from caraserve.request import RequestError

ROOT = Path(__file__).resolve().parents[1]


def test_the_readmes_python_example_runs_as_written():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### From Python"):]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)[:1]
    assert "from caraserve import Engine, EngineConfig, SamplingParams" in code
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {})
    assert printed.getvalue().strip()  # the first completion's text


def test_import_caraserve_loads_no_torch_until_a_name_is_used():
    probe = ("import sys, caraserve; assert 'torch' not in sys.modules; "
             "from caraserve import Engine, EngineConfig, SamplingParams; "
             "from caraserve.engine import Engine as E; assert Engine is E and 'torch' in sys.modules; "
             "from caraserve import StructuredOutputs; from caraserve.structured_output import StructuredOutputs as S; "
             "assert StructuredOutputs is S; "
             "print(sorted(caraserve.__all__))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "['Engine', 'EngineConfig', 'SamplingParams', 'StructuredOutputs']"


CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"},
                {"role": "assistant", "content": "hi"}, {"role": "user", "content": "and again"}]


def test_chat_runs_a_conversation_as_the_server_runs_it():
    """Engine.chat (vLLM's LLM.chat) renders each conversation with the chat template the server
    uses and generates the tokens /v1/chat/completions answers for the same messages."""
    from test_openai_batch import _server_answers

    from caraserve import Engine, EngineConfig, SamplingParams

    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
    with Engine(EngineConfig(compile="false", max_batch_size=4, max_seq_len=256)) as engine:
        one = engine.chat(CONVERSATION, params, adapters="demo-r16")
        two = engine.chat([CONVERSATION, CONVERSATION[:2]], params, adapters=["demo-r16", None])
        custom = engine.chat(CONVERSATION[:2], params, chat_template=template)
        server = _server_answers(engine, [("/v1/chat/completions", {
            "model": m, "messages": c, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "return_token_ids": True})
            for m, c in (("demo-r16", CONVERSATION), ("tiny", CONVERSATION[:2]))])
        assert [len(one), len(two), len(custom)] == [1, 2, 1]
        assert one[0].output_ids == two[0].output_ids == server[0].json()["choices"][0]["token_ids"]
        assert two[1].output_ids == server[1].json()["choices"][0]["token_ids"]
        assert one[0].text == server[0].json()["choices"][0]["message"]["content"]
        assert custom[0].prompt_ids == engine.tokenizer("[system] be brief\n[user] hello there\n[assistant] ",
                                                        add_special_tokens=False)["input_ids"]
        for bad, says in (([{"role": "user", "content": 5}], "conversation 0: messages[0].content"),
                          ([CONVERSATION, [{"content": "x"}]], "conversation 1: messages[0].role: Field required"),
                          ([CONVERSATION, []], "conversation 1 has no messages"),
                          (CONVERSATION[:3], None)):
            if says is None:  # continue_final_message needs the assistant's turn last
                with pytest.raises(RequestError, match="the last message must be the assistant's"):
                    engine.chat(CONVERSATION[:2], continue_final_message=True, add_generation_prompt=False)
                continue
            with pytest.raises(RequestError, match=re.escape(says)):
                engine.chat(bad, params)
        for bad in ("hello", [], None):
            with pytest.raises(TypeError, match="messages must be a conversation"):
                engine.chat(bad)
        assert not engine.has_unfinished()


def test_logprobs_as_a_number_is_vllms_form():
    """SamplingParams(logprobs=N) as vLLM's: each token's logprob and its N most likely."""
    from caraserve import Engine, EngineConfig, SamplingParams

    assert SamplingParams(logprobs=3) == SamplingParams(logprobs=True, top_logprobs=3)
    assert SamplingParams(logprobs=0) == SamplingParams(logprobs=True)
    assert SamplingParams(logprobs=None) == SamplingParams()
    for bad, says in ((dict(logprobs=-1), "logprobs must be true or false, or a number of alternatives >= 0"),
                      (dict(logprobs=2, top_logprobs=3), "logprobs=2 and top_logprobs=3 disagree")):
        with pytest.raises(RequestError, match=re.escape(says)):
            SamplingParams(**bad)
    with Engine(EngineConfig(compile="false", max_batch_size=4, max_seq_len=128)) as engine:
        (out,) = engine.generate("import os", SamplingParams(max_tokens=4, temperature=0, logprobs=2))
        assert len(out.output_logprobs) == 4 and all(len(top) == 2 for top in out.output_top_logprobs)
        assert all(top[0][0] == t for top, t in zip(out.output_top_logprobs, out.output_ids))  # greedy: the best


def test_generate_with_n_gives_each_prompts_completions_in_a_row():
    """n > 1 in Engine.generate: a prompt's n completions one after another, completion i sampled
    with seed + i, so each equals the request of its own params run alone (and the server's)."""
    from caraserve import Engine, EngineConfig, SamplingParams
    from caraserve.request import choice_params

    sampled = SamplingParams(max_tokens=5, temperature=1.0, seed=11, n=3, ignore_eos=True)
    greedy = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    with Engine(EngineConfig(compile="false", max_batch_size=8, max_seq_len=128)) as engine:
        outs = engine.generate(["import os", "def main():"], [sampled, greedy], adapters=["demo-r8", None])
        alone = [engine.generate("import os", choice_params(sampled, i), "demo-r8")[0] for i in range(3)]
        base = engine.generate("def main():", greedy)[0]
    assert len(outs) == 4 and [o.prompt_ids for o in outs[:3]] == [alone[0].prompt_ids] * 3
    assert [o.output_ids for o in outs[:3]] == [o.output_ids for o in alone]
    assert len({tuple(o.output_ids) for o in outs[:3]}) > 1  # the seeds differ, and so do the completions
    assert outs[3].output_ids == base.output_ids and outs[3].adapter is None
