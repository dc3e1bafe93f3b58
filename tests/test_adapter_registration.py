"""Adapter registration: names, folders, whole directories with broken members, legacy .bin
files, and PEFT's targeting rules (what it applies, ignores or cannot mean)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from adapter_cases import ALL, BIN, CASES, ST, VALUE_CASES, msg, same, snapshot, to_bin
from helpers import copy_adapter, edit_config, peft_logits

from caraserve.config import AdapterConfig, ConfigError, EngineConfig, ModelConfig
from caraserve.engine import Engine
from caraserve.lora.adapter_files import AdapterReadError
from caraserve.lora.checkpoint import AdapterError, load_adapter
from caraserve.request import SamplingParams


@pytest.mark.parametrize("name", ["../x", "a/b", "/abs", "..", ".", "", "x/../y", "a\\b", "..x", "x..y", "a b"])
def test_name_with_path_separator_or_dotdot_refused(adapter_env, adapter_store, name):
    _, src, args = adapter_env
    with pytest.raises(AdapterError, match=rf"adapter name {re.escape(repr(name))} is not a plain name"):
        adapter_store.register(name, src / "good")
    if name:  # load_adapter falls back to the folder's name when given none
        with pytest.raises(AdapterError, match="is not a plain name"):
            load_adapter(src / "good", args, name)
    assert adapter_store.names() == ["keep"]


def test_name_with_trailing_newline_refused(adapter_env, adapter_store):
    _, src, _ = adapter_env
    with pytest.raises(AdapterError, match="is not a plain name"):
        adapter_store.register("x\n", src / "good")


def test_duplicate_name_refused(adapter_env, adapter_store):
    _, src, _ = adapter_env
    snap = snapshot(adapter_store.get("keep"))
    with pytest.raises(AdapterError, match=r"adapter 'keep' is already registered"):
        adapter_store.register("keep", src / "good2")
    assert adapter_store.info("keep").rank == 8 and same(adapter_store.get("keep"), snap)


def test_missing_folder_refused(adapter_env, adapter_store, tmp_path):
    with pytest.raises(AdapterError, match=msg("ghost", r"folder .*ghost does not exist")):
        adapter_store.register("ghost", tmp_path / "ghost")
    (tmp_path / "adapter_config.json").write_text("{}")  # a path to the adapter's config, not its folder
    with pytest.raises(AdapterError, match=msg("file", r"adapter_config\.json is a file, not an adapter's folder")):
        adapter_store.register("file", tmp_path / "adapter_config.json")
    assert adapter_store.names() == ["keep"]


def test_register_dir_keeps_good_and_reports_broken(adapter_env, adapter_store, tmp_path):
    _, src, args = adapter_env
    d = tmp_path / "adapters"
    copy_adapter(src / "good", d / "good-a")
    copy_adapter(src / "good2", d / "good-b")
    copy_adapter(src / "good", d / "keep")  # already registered in the store
    copy_adapter(src / "good", d / "bad name")  # not a plain name
    copy_adapter(src / "good", d / ".hidden")  # skipped
    (d / "README.txt").write_text("not an adapter")  # skipped
    broken = ["bad-json", "missing-weights", "target-c-attn", "shape-hidden32", "dora-peft"]
    for case in broken:
        CASES[case][0](src, d / case)
    VALUE_CASES["nan-in-b"][0](src, d / "nan-in-b")  # registers: refused on first read

    ok, bad = adapter_store.register_dir(d)

    assert ok == ["good-a", "good-b", "nan-in-b"]
    assert sorted(bad) == sorted(broken + ["keep", "bad name"])
    for case in broken:
        assert re.search(msg(case, CASES[case][1]), bad[case]), bad[case]
    assert re.search(r"adapter 'keep' is already registered", bad["keep"])
    assert re.search(r"adapter name 'bad name' is not a plain name", bad["bad name"])
    assert adapter_store.names() == ["good-a", "good-b", "keep", "nan-in-b"]
    with pytest.raises(AdapterError, match=msg("nan-in-b", VALUE_CASES["nan-in-b"][1])):
        adapter_store.get("nan-in-b")
    assert same(adapter_store.get("good-a"), snapshot(load_adapter(src / "good", args)))
    assert same(adapter_store.get("good-b"), snapshot(load_adapter(src / "good2", args)))
    assert adapter_store.info("keep").path == str(src / "good")


def test_register_dir_missing_root(adapter_env, adapter_store, tmp_path):
    """adapters.dir naming no folder is a configuration error (an entry point says it in one line)."""
    with pytest.raises(ConfigError, match="adapters.dir: .*nowhere does not exist"):
        adapter_store.register_dir(tmp_path / "nowhere")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        adapter_store.register_dir(tmp_path / "a-file")
    one = adapter_env[1] / "good"  # one adapter's own folder, a newcomer's mistake: it would register none
    with pytest.raises(ConfigError, match=r"is an adapter's own folder .*give the folder that holds"):
        adapter_store.register_dir(one)


@pytest.mark.parametrize("src_name", ["good", "good2"])
def test_bin_checkpoint_equals_safetensors(adapter_env, adapter_store, tmp_path, src_name):
    _, src, _ = adapter_env
    d = copy_adapter(src / src_name, tmp_path / f"{src_name}-bin")
    to_bin(d)
    assert not (d / ST).exists() and (d / BIN).is_file()
    adapter_store.register("st", src / src_name)
    adapter_store.register("pt", d)
    a, b = adapter_store.get("st"), adapter_store.get("pt")
    assert (a.rank, a.scale, a.targets) == (b.rank, b.scale, b.targets)
    assert same(b, snapshot(a))
    assert adapter_store.info("pt").nbytes == adapter_store.info("st").nbytes


def test_a_truncated_bin_is_the_adapters_fault_not_a_passing_read_error(adapter_env, tmp_path):
    """A .bin torch cannot parse stays broken (a read that may pass is tried again each use)."""
    _, src, args = adapter_env
    d = copy_adapter(src / "good", tmp_path / "cut")
    to_bin(d)
    (d / BIN).write_bytes((d / BIN).read_bytes()[:1000])
    with pytest.raises(AdapterError, match="not a whole PyTorch checkpoint") as e:
        load_adapter(d, args)
    assert not isinstance(e.value, AdapterReadError)


def test_running_out_of_memory_reading_a_bin_is_a_read_that_may_pass(adapter_env, tmp_path, monkeypatch):
    _, src, args = adapter_env
    d = copy_adapter(src / "good", tmp_path / "oom")
    to_bin(d)
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(MemoryError()))
    with pytest.raises(AdapterReadError, match="cannot read"):
        load_adapter(d, args)
    monkeypatch.setattr(torch, "load", real)
    assert load_adapter(d, args).rank == 8


def test_fan_in_fan_out_true_is_accepted_with_same_weights(adapter_env, adapter_store, tmp_path):
    root, src, _ = adapter_env
    d = copy_adapter(src / "good", tmp_path / "fifo")
    edit_config(d, fan_in_fan_out=True)
    info = adapter_store.register("fifo", d)
    assert info.rank == 8 and info.targets == ("q_proj", "v_proj")
    assert same(adapter_store.get("fifo"), snapshot(adapter_store.get("keep")))
    # the premise: PEFT itself ignores fan_in_fan_out for Linear targets
    tokens = [3, 14, 15, 92, 65]
    assert torch.allclose(peft_logits(root / "base", d, tokens), peft_logits(root / "base", src / "good", tokens))


def test_target_modules_the_model_lacks_are_ignored_beside_ones_it_has(adapter_env, adapter_store, tmp_path):
    """As PEFT: a config listing a module the model lacks (shared across architectures) loads
    with the ones it has; the weights and PEFT's logits are those of the adapter without it."""
    root, src, _ = adapter_env
    d = copy_adapter(src / "good", tmp_path / "extra")
    edit_config(d, target_modules=["q_proj", "v_proj", "c_attn"])
    info = adapter_store.register("extra", d)
    assert info.targets == ("q_proj", "v_proj")
    assert same(adapter_store.get("extra"), snapshot(adapter_store.get("keep")))
    tokens = [3, 14, 15, 92, 65]
    assert torch.allclose(peft_logits(root / "base", d, tokens), peft_logits(root / "base", src / "good", tokens))


# ---------------------------------------------------------------- malformed configs and PEFT's targeting rules

MALFORMED = {
    "target-modules-not-strings": dict(target_modules=[1]),
    "layers-to-transform-string": dict(layers_to_transform="1"),
    "rank-pattern-list": dict(rank_pattern=["q_proj"]),
    "rank-pattern-bad-regex": dict(rank_pattern={"(": 4}),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_config_values_raise_adapter_error(adapter_env, adapter_store, tmp_path, case):
    _, src, _ = adapter_env
    d = copy_adapter(src / "good", tmp_path / case)
    edit_config(d, **MALFORMED[case])
    with pytest.raises(AdapterError, match=msg(case, "")):
        adapter_store.register(case, d)


def test_register_dir_survives_malformed_config(adapter_env, adapter_store, tmp_path):
    _, src, _ = adapter_env
    d = tmp_path / "adapters"
    copy_adapter(src / "good", d / "a-good")
    edit_config(copy_adapter(src / "good", d / "b-weird"), target_modules=[1])
    copy_adapter(src / "good2", d / "c-good")
    ok, bad = adapter_store.register_dir(d)
    assert ok == ["a-good", "c-good"] and list(bad) == ["b-weird"]


def test_tensors_outside_target_modules_not_applied(adapter_env, adapter_store, tmp_path):
    _, src, _ = adapter_env
    d = copy_adapter(src / "good", tmp_path / "q-only")
    edit_config(d, target_modules=["q_proj"])  # the file still holds v_proj tensors
    try:
        adapter_store.register("q-only", d)
    except AdapterError:
        return  # refusing is fine too
    assert "v_proj" not in adapter_store.get("q-only").a


def test_string_target_modules_matching_nothing_refused(adapter_env, adapter_store, tmp_path):
    _, src, _ = adapter_env
    d = copy_adapter(src / "good", tmp_path / "str-target")
    edit_config(d, target_modules="c_attn")
    with pytest.raises(AdapterError, match=msg("str-target", "c_attn")):
        adapter_store.register("str-target", d)


def test_alora_refused(adapter_env, adapter_store, tmp_path):
    _, src, _ = adapter_env
    d = copy_adapter(src / "good", tmp_path / "alora")
    edit_config(d, alora_invocation_tokens=[9, 33])
    with pytest.raises(AdapterError, match=msg("alora", "alora")):
        adapter_store.register("alora", d)


def _without(key: str):
    def fn(d):
        cfg = json.loads((d / "adapter_config.json").read_text())
        del cfg[key]
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    return fn


# configs whose meaning comes from PEFT's defaults or rules (each from good2: r=4, lora_alpha 8,
# all seven modules), served as PEFT loads them
PEFT_RULES = {
    "no-alpha": _without("lora_alpha"),  # LoraConfig's default lora_alpha 8: scale 8 / 4, not 4 / 4
    "null-targets": lambda d: edit_config(d, target_modules=None),  # Llama's default: q_proj, v_proj
    "all-linear": lambda d: edit_config(d, target_modules="all-linear"),
    # (a rank_pattern entry for an excluded module allocates nothing: no rank bucket cap applies)
    "exclude-list": lambda d: edit_config(d, exclude_modules=["k_proj", "layers.1.mlp.down_proj"],
                                          rank_pattern={"layers.1.mlp.down_proj": 4096}),
    "exclude-regex": lambda d: edit_config(d, exclude_modules=r".*\.0\.self_attn\.(q|o)_proj"),
}


def test_config_defaults_and_exclusions_served_as_peft_loads_them(adapter_env, tmp_path):
    root, src, _ = adapter_env
    d = tmp_path / "adapters"
    for case, edit in PEFT_RULES.items():
        edit(copy_adapter(src / "good2", d / case))
    engine = Engine(EngineConfig(compile="false", model=ModelConfig(path=str(root / "base")),
                                 adapters=AdapterConfig(dir=str(d))))
    assert engine.store.info("no-alpha").scale == 2.0
    assert engine.store.info("null-targets").targets == ("q_proj", "v_proj")
    assert engine.store.info("all-linear").targets == tuple(ALL)
    tokens = [3, 14, 15, 92, 65, 35, 89, 79]
    sp = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    got = engine.generate([tokens] * len(PEFT_RULES), sp, adapters=list(PEFT_RULES))
    full = peft_logits(root / "base", src / "good2", tokens).log_softmax(-1)
    for case, out in zip(PEFT_RULES, got):
        ref = peft_logits(root / "base", d / case, tokens).log_softmax(-1)
        want = [ref[p, tokens[p + 1]].item() for p in range(len(tokens) - 1)]
        assert [e[0] for e in out.prompt_logprobs[1:]] == pytest.approx(want, abs=2e-5), case
        if case not in ("all-linear", "no-alpha"):  # the premise: the config changes what PEFT computes
            assert not torch.allclose(ref, full, atol=1e-4), case
