"""The model's generation_config.json as sampling defaults (model.generation_config, vLLM's
`--generation-config`): what a request does not set comes from it, in the server, offline lines
and the Python API; max_new_tokens caps max_tokens."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
from test_server_hardening import in_process_server

from caraserve.config import AdapterConfig, ConfigError, EngineConfig, ModelConfig, ServerConfig
from caraserve.engine import Engine
from caraserve.model.generation_config import sampling_defaults, with_defaults
from caraserve.model.tiny import tiny_paths
from caraserve.offline import parse_line
from caraserve.request import RequestError, SamplingParams


def folder_with(tmp_path, generation: dict | None):
    """A copy of the embedded model's folder with `generation` as its generation_config.json."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_paths()[0], folder)
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


def test_the_sampling_fields_the_file_sets(tmp_path):
    folder = folder_with(tmp_path, {"temperature": 0.6, "top_p": 0.9, "top_k": 50, "do_sample": True,
                                    "max_new_tokens": 7, "eos_token_id": 2, "repetition_penalty": 1.05})
    want = {"temperature": 0.6, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.05, "max_tokens": 7}
    assert sampling_defaults(folder, "auto") == want
    assert sampling_defaults(tmp_path / "elsewhere", str(folder)) == want  # a folder named instead
    assert sampling_defaults(folder, "none") == {}
    assert sampling_defaults(folder_with(tmp_path / "bare", None), "auto") == {}
    assert sampling_defaults(folder_with(tmp_path / "off", {"top_k": 0, "min_p": 0.05}), "auto") == \
        {"top_k": -1, "min_p": 0.05}  # transformers' "no top-k" is 0, ours -1


def test_overrides_go_over_the_file_and_apply_without_one(tmp_path):
    """model.override_generation_config (vLLM's --override-generation-config): its values over the
    file's, also with model.generation_config=none; only sampling defaults may be named."""
    folder = folder_with(tmp_path, {"temperature": 0.6, "top_p": 0.9})
    over = {"temperature": 0.2, "max_new_tokens": 9}
    assert sampling_defaults(folder, "auto", over) == {"temperature": 0.2, "top_p": 0.9, "max_tokens": 9}
    assert sampling_defaults(folder, "none", over) == {"temperature": 0.2, "max_tokens": 9}
    assert sampling_defaults(folder, "auto", {"temperature": None}) == {"top_p": 0.9}  # a null drops the file's
    with pytest.raises(ConfigError, match=r"\['do_sample'\] are not sampling defaults"):
        sampling_defaults(folder, "auto", {"do_sample": False})
    with pytest.raises(ConfigError, match=r"^model.override_generation_config: .*temperature"):
        sampling_defaults(folder, "none", {"temperature": -1})
    with pytest.raises(ConfigError, match=r"^model.override_generation_config: .*top_p"):
        sampling_defaults(folder, "auto", {"top_p": 2})  # blamed on the override, not the file
    assert ModelConfig.from_dict({"override_generation_config": None}).override_generation_config == {}
    assert ModelConfig.from_dict({"override_generation_config": {"top_k": 5}}).override_generation_config == \
        {"top_k": 5}


@pytest.mark.parametrize("generation,says", [
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ("not json {", "cannot be read"),
])
def test_a_bad_generation_config_is_a_config_error_naming_it(tmp_path, generation, says):
    folder = folder_with(tmp_path, {})
    text = generation if isinstance(generation, str) else json.dumps(generation)
    (folder / "generation_config.json").write_text(text)
    with pytest.raises(ConfigError, match=says):
        sampling_defaults(folder, "auto")
    with pytest.raises(ConfigError, match="no generation_config.json"):
        sampling_defaults(folder, str(tmp_path / "missing"))


def test_a_request_keeps_what_it_sets_and_max_tokens_is_capped():
    defaults = {"temperature": 0.6, "top_k": 20, "max_tokens": 7}
    values = {"temperature": 1.0, "top_k": -1, "max_tokens": 100, "seed": 3}
    assert with_defaults(values, {"temperature"}, defaults) == {"temperature": 1.0, "top_k": 20, "max_tokens": 7,
                                                               "seed": 3}
    assert with_defaults({"max_tokens": 4}, set(), defaults)["max_tokens"] == 4
    assert with_defaults({}, set(), defaults)["max_tokens"] == 7
    # a cap past the request's own default leaves the default (16, SamplingParams')
    assert with_defaults({}, set(), {"max_tokens": 300})["max_tokens"] == 16
    with pytest.raises(RequestError, match=r"min_tokens=10 is more than max_tokens can be: .* caps it at 7"):
        with_defaults({"max_tokens": 20, "min_tokens": 10}, {"max_tokens", "min_tokens"}, defaults)


@pytest.fixture(scope="module")
def top1(tmp_path_factory):
    """The embedded model whose generation config recommends top_k=1 (sampling that always takes
    the most likely token: greedy) and at most 5 new tokens."""
    folder = folder_with(tmp_path_factory.mktemp("top1"), {"top_k": 1, "max_new_tokens": 5})
    return Engine(EngineConfig(model=ModelConfig(path=str(folder)), compile="false", max_batch_size=4,
                               max_seq_len=256, adapters=AdapterConfig(dir="none")))


PROMPT = [1, 5, 6, 7, 8]
GREEDY5 = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)


def test_the_python_api_without_params_takes_the_defaults(top1):
    """No params: the generation config's (top_k=1: greedy; 5 tokens); params given are used as they are."""
    assert top1.sampling_defaults == {"top_k": 1, "max_tokens": 5}
    want = top1.generate([PROMPT], SamplingParams(max_tokens=5, temperature=0))[0].output_ids
    assert top1.generate([PROMPT])[0].output_ids == want
    assert len(top1.generate([PROMPT], SamplingParams(max_tokens=9, ignore_eos=True))[0].output_ids) == 9


def test_offline_lines_take_the_defaults_for_fields_they_leave_out(top1):
    _, kw = parse_line(json.dumps({"prompt": "x", "temperature": 0.9, "max_tokens": 40}), 1, top1.sampling_defaults)
    assert (kw["params"].top_k, kw["params"].temperature, kw["params"].max_tokens) == (1, 0.9, 5)
    _, kw = parse_line(json.dumps({"prompt": "x", "top_k": 3}), 1, top1.sampling_defaults)
    assert (kw["params"].top_k, kw["params"].max_tokens) == (3, 5)


def test_the_server_fills_in_what_a_body_leaves_out(top1):
    greedy = top1.generate([PROMPT], GREEDY5)[0].output_ids
    with in_process_server(top1, ServerConfig()) as (base, _):
        def complete(**extra):
            r = httpx.post(base + "/v1/completions", timeout=60, json={"prompt": PROMPT, "ignore_eos": True,
                                                                       "logprobs": 0, **extra})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]

        def ids(choice):
            return [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]

        # temperature 1 and no top_k: the model's top_k=1 makes it greedy; max_tokens 20 capped at 5
        chosen = complete(temperature=1.0, max_tokens=20, seed=1, return_tokens_as_token_ids=True)
        assert ids(chosen) == greedy and chosen["finish_reason"] == "length"
        # a body's own top_k (null counts as not set) is its own
        sampled = [ids(complete(temperature=5.0, top_k=-1, seed=s, max_tokens=5, return_tokens_as_token_ids=True))
                   for s in range(3)]
        assert any(s != greedy for s in sampled)
        assert ids(complete(temperature=5.0, top_k=None, seed=0, max_tokens=5, return_tokens_as_token_ids=True)) \
            == greedy


def test_reading_the_file_does_not_say_its_values_may_be_ignored(tmp_path):
    """transformers logs that temperature and top_p without do_sample "may be ignored": here they
    are applied, so the reading keeps that line out of the log (in a fresh process: transformers
    logs it once per process)."""
    import subprocess
    import sys

    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.9}))
    code = ("import sys; from caraserve.model.generation_config import sampling_defaults; "
            f"print(sampling_defaults({str(tmp_path)!r}, 'auto'))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "{'temperature': 0.6, 'top_p': 0.9}"
    assert "may be ignored" not in run.stderr + run.stdout
