"""Broken adapters are refused with an AdapterError naming the adapter and the reason; a refused
adapter leaves nothing behind in the HostStore and the adapters already registered keep working.
What the config and the safetensors header show is refused at registration; bad values (NaN/Inf)
only on the first read of the weights, which marks the adapter broken."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from helpers import copy_adapter, edit_config, peft_logits, save_peft_adapter, save_random_hf_model
from safetensors.torch import load_file, save_file

from caraserve.config import ConfigError
from caraserve.lora.checkpoint import AdapterError, inspect_adapter, load_adapter
from caraserve.lora.host_store import HostStore, UnknownAdapterError
from caraserve.model.loader import load_model

ST, BIN, CFG = "adapter_model.safetensors", "adapter_model.bin", "adapter_config.json"
P = "base_model.model.model.layers"  # PEFT's key prefix for decoder layers
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    save_random_hf_model(root / "base", "llama")  # hidden 64, 2 layers, vocab 128
    save_random_hf_model(root / "base32", "llama", hidden_size=32, intermediate_size=56)
    src = root / "src"
    save_peft_adapter(root / "base", src / "good", seed=1)  # r=8 on q_proj, v_proj
    save_peft_adapter(root / "base", src / "good2", seed=2, r=4, lora_alpha=8, target_modules=ALL)
    save_peft_adapter(root / "base32", src / "hidden32", seed=3)
    # adapters that PEFT itself writes for features we do not serve
    save_peft_adapter(root / "base", src / "peft-dora", seed=4, use_dora=True)
    save_peft_adapter(root / "base", src / "peft-embed", seed=5, target_modules=["embed_tokens"])
    save_peft_adapter(root / "base", src / "peft-lm-head", seed=6, target_modules=["lm_head"])
    save_peft_adapter(root / "base", src / "peft-mts", seed=7, modules_to_save=["lm_head"])
    save_peft_adapter(root / "base", src / "peft-bias", seed=8, bias="all")
    save_peft_adapter(root / "base", src / "peft-lora-bias", seed=9, lora_bias=True)
    model = load_model(root / "base", "float32")
    return root, src, model.args


@pytest.fixture
def store(env):
    """A store holding one good adapter, 'keep'."""
    _, src, args = env
    s = HostStore(args)
    s.register("keep", src / "good")
    return s


# ---------------------------------------------------------------- builders of broken copies


def _edit_tensors(d: Path, fn) -> None:
    t = load_file(str(d / ST))
    t = fn(dict(t))
    save_file(t, str(d / ST))


def _to_bin(d: Path) -> None:
    torch.save(load_file(str(d / ST)), str(d / BIN))
    (d / ST).unlink()


class _NotATensor:
    """Pickled as a call of os.getcwd: what weights-only loading must refuse to run."""

    def __reduce__(self):
        return (os.getcwd, ())


def _pickle_bin(d: Path) -> None:
    tensors = load_file(str(d / ST))
    torch.save({**tensors, "extra": _NotATensor()}, str(d / BIN))
    (d / ST).unlink()


def _truncate(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _rename(old: str, new: str):
    return lambda t: {k.replace(old, new): v for k, v in t.items()}


def _poison(value: float, which: str):
    def fn(t):
        key = f"{P}.1.self_attn.v_proj.lora_{which}.weight"
        t[key] = t[key].clone()
        t[key][0, 3] = value
        return t

    return fn


def _drop(part: str):
    return lambda t: {k: v for k, v in t.items() if part not in k}


def _add(key: str, shape):
    def fn(t):
        t[key] = torch.randn(*shape)
        return t

    return fn


def _layer_beyond(n: int):
    return _rename(f"{P}.1.self_attn.q_proj", f"{P}.{n}.self_attn.q_proj")


def _b(src, fn):
    """Builder: copy src adapter to dst, then apply fn(dst)."""

    def build(srcroot: Path, dst: Path) -> Path:
        d = copy_adapter(srcroot / src, dst)
        fn(d)
        return d

    return build


def _missing_weights(d):
    (d / ST).unlink()


def _write_cfg(text):
    return lambda d: (d / CFG).write_text(text)


# case id (also the adapter name) -> (builder, regex of the reason)
CASES = {
    "missing-config": (_b("good", lambda d: (d / CFG).unlink()), r"adapter_config\.json is missing"),
    "bad-json": (_b("good", _write_cfg('{"r": 8, "lora_alpha": ')), r"adapter_config\.json is not valid JSON"),
    "json-not-object": (_b("good", _write_cfg("[8, 16]")), r"must hold a JSON object"),
    "missing-weights": (_b("good", _missing_weights),
                        r"no adapter_model\.safetensors or adapter_model\.bin"),
    "truncated-safetensors": (_b("good", lambda d: _truncate(d / ST)),
                              r"cannot read .*adapter_model\.safetensors"),
    "truncated-bin": (_b("good", lambda d: (_to_bin(d), _truncate(d / BIN))), r"cannot read .*adapter_model\.bin"),
    "bin-with-objects": (_b("good", _pickle_bin),
                         r"cannot read .*adapter_model\.bin as tensors only .*never loaded: save the adapter as "
                         r"safetensors\)$"),
    "no-tensors": (_b("good", lambda d: save_file({}, str(d / ST))), r"holds no LoRA tensors"),
    "r-mismatch": (_b("good", lambda d: edit_config(d, r=4)), r"has rank 8 but the config says r=4"),
    "r-not-positive": (_b("good", lambda d: edit_config(d, r=0)), r"r=0 must be a positive integer"),
    "alpha-not-number": (_b("good", lambda d: edit_config(d, lora_alpha="16")), r"lora_alpha='16' must be a number"),
    "alpha-overflows": (_b("good", lambda d: edit_config(d, lora_alpha=1e308)), r"scaling .* beyond float32's range"),
    "peft-type-ia3": (_b("good", lambda d: edit_config(d, peft_type="IA3")), r"peft_type IA3 is not supported"),
    "shape-hidden32": (_b("hidden32", lambda d: None), r"do not fit the base model's q_proj \(64 -> 64\)"),
    "target-c-attn": (_b("good", lambda d: edit_config(d, target_modules=["c_attn"])),
                      r"target module 'c_attn' does not exist in the model"),
    "tensor-unknown-module": (_b("good", lambda d: _edit_tensors(d, _rename("self_attn.q_proj", "self_attn.c_attn"))),
                              r"target module self_attn\.c_attn does not exist in the model"),
    "tensor-wrong-parent": (_b("good", lambda d: _edit_tensors(d, _rename("self_attn.q_proj", "mlp.q_proj"))),
                            r"target module mlp\.q_proj does not exist in the model"),
    "tensor-unexpected-key": (_b("good", lambda d: _edit_tensors(d, _add("some.other.weight", (4, 4)))),
                              r"unexpected tensor 'some\.other\.weight'"),
    "dora-config": (_b("good", lambda d: edit_config(d, use_dora=True)), r"use_dora=true \(DoRA\) is not supported"),
    "dora-peft": (_b("peft-dora", lambda d: None), r"use_dora=true \(DoRA\) is not supported"),
    "dora-tensor": (_b("good", lambda d: _edit_tensors(
        d, _add(f"{P}.0.self_attn.q_proj.lora_magnitude_vector", (64,)))), r"DoRA weights .*magnitude_vector"),
    "modules-to-save-config": (_b("good", lambda d: edit_config(d, modules_to_save=["lm_head"])),
                               r"modules_to_save=\['lm_head'\] is not supported"),
    "modules-to-save-peft": (_b("peft-mts", lambda d: None), r"modules_to_save=\['lm_head'\] is not supported"),
    "embedding-tensor": (_b("good", lambda d: _edit_tensors(
        d, _add("base_model.model.model.embed_tokens.lora_embedding_A", (8, 128)))),
        r"embedding LoRA \(.*lora_embedding_A\) is not supported"),
    "embedding-peft": (_b("peft-embed", lambda d: None), r"LoRA on embed_tokens is not supported"),
    "lm-head-tensor": (_b("good", lambda d: _edit_tensors(d, _add("base_model.model.lm_head.lora_A.weight", (8, 64)))),
                       r"LoRA on lm_head \(.*lm_head\.lora_A\.weight\) is not supported"),
    "lm-head-peft": (_b("peft-lm-head", lambda d: None), r"LoRA on lm_head is not supported"),
    "bias-all-config": (_b("good", lambda d: edit_config(d, bias="all")), r"bias='all' is not supported"),
    "bias-lora-only-config": (_b("good", lambda d: edit_config(d, bias="lora_only")),
                              r"bias='lora_only' is not supported"),
    "bias-peft": (_b("peft-bias", lambda d: None), r"bias='all' is not supported"),
    "lora-bias-peft": (_b("peft-lora-bias", lambda d: None), r"unexpected tensor .*lora_B\.bias"),
    "a-without-b": (_b("good", lambda d: _edit_tensors(d, _drop("layers.0.self_attn.v_proj.lora_B"))),
                    r"model\.layers\.0\.self_attn\.v_proj has lora_B missing"),
    "b-without-a": (_b("good", lambda d: _edit_tensors(d, _drop("layers.1.self_attn.q_proj.lora_A"))),
                    r"model\.layers\.1\.self_attn\.q_proj has lora_A missing"),
    "layer-just-beyond-model": (_b("good", lambda d: _edit_tensors(d, _layer_beyond(2))),
                                r"layers\.2\.self_attn\.q_proj\.lora_[AB]\.weight' is for layer 2, the model has 2"),
    "layer-far-beyond-model": (_b("good", lambda d: _edit_tensors(d, _layer_beyond(5))),
                               r"is for layer 5, the model has 2"),
    "outside-layers-to-transform": (_b("good", lambda d: edit_config(d, layers_to_transform=[0])),
                                    r"layers\.1\..* is outside layers_to_transform=\[0\]"),
    "rank-pattern-mismatch": (_b("good", lambda d: edit_config(d, rank_pattern={"layers.1.self_attn.q_proj": 4})),
                               r"has rank 8 but the config says r=4"),
}
# broken values: the header is fine, so these register and are refused when first read
VALUE_CASES = {
    "nan-in-b": (_b("good", lambda d: _edit_tensors(d, _poison(float("nan"), "B"))),
                 r"layers\.1\.self_attn\.v_proj holds NaN or Inf"),
    "inf-in-a": (_b("good", lambda d: _edit_tensors(d, _poison(float("inf"), "A"))),
                 r"layers\.1\.self_attn\.v_proj holds NaN or Inf"),
    "neg-inf-in-b": (_b("good", lambda d: _edit_tensors(d, _poison(float("-inf"), "B"))), r"holds NaN or Inf"),
}


def _snapshot(w):
    return {("a", m): t.clone() for m, t in w.a.items()} | {("b", m): t.clone() for m, t in w.b.items()}


def _same(w, snap) -> bool:
    now = _snapshot(w)
    return now.keys() == snap.keys() and all(torch.equal(now[k], snap[k]) for k in snap)


def _msg(name: str, reason: str) -> str:
    return rf"(?s)adapter {re.escape(repr(name))}.*{reason}"


# ---------------------------------------------------------------- tests


def test_good_adapter_is_valid(env, store):
    """The sources the broken copies start from load, so each refusal below is caused by the break."""
    root, src, args = env
    info = store.info("keep")
    assert (info.rank, info.scale, info.targets) == (8, 2.0, ("q_proj", "v_proj"))
    w = store.get("keep")
    t = load_file(str(src / "good" / ST))
    assert torch.equal(w.a["q_proj"][1], t[f"{P}.1.self_attn.q_proj.lora_A.weight"].t())
    assert torch.equal(w.b["v_proj"][0], t[f"{P}.0.self_attn.v_proj.lora_B.weight"].t())
    good2 = load_adapter(src / "good2", args)
    assert good2.rank == 4 and good2.targets == tuple(ALL)


@pytest.mark.parametrize("case", list(CASES))
def test_broken_adapter_refused_and_nothing_left(env, store, tmp_path, case):
    root, src, args = env
    build, reason = CASES[case]
    folder = build(src, tmp_path / case)
    keep = store.get("keep")
    snap = _snapshot(keep)
    names, cached = store.names(), store.stats().cached_bytes

    with pytest.raises(AdapterError, match=_msg(case, reason)):
        store.register(case, folder)
    # inspect_adapter and load_adapter alone give the same refusal
    with pytest.raises(AdapterError, match=_msg(case, reason)):
        inspect_adapter(folder, args, case)
    with pytest.raises(AdapterError, match=_msg(case, reason)):
        load_adapter(folder, args, case)

    assert store.names() == names == ["keep"]
    assert case not in store
    with pytest.raises(UnknownAdapterError):
        store.info(case)
    with pytest.raises(UnknownAdapterError):
        store.get(case)
    assert store.stats().cached_bytes == cached
    reads = store.stats().disk_reads
    again = store.get("keep")
    assert store.stats().disk_reads == reads
    assert _same(again, snap)
    assert _same(load_adapter(src / "good", args, "keep"), snap)
    # no leftover blocks the name: a good adapter can take it afterwards
    info = store.register(case, src / "good2")
    assert info.rank == 4 and store.names() == sorted(["keep", case])


@pytest.mark.parametrize("case", list(VALUE_CASES))
def test_bad_values_refused_on_first_read_and_adapter_marked_broken(env, store, tmp_path, case):
    _, src, args = env
    build, reason = VALUE_CASES[case]
    folder = build(src, tmp_path / case)
    info = store.register(case, folder)  # the header is fine
    assert info.rank == 8 and store.broken(case) is None
    with pytest.raises(AdapterError, match=_msg(case, reason)):
        store.get(case)
    assert re.search(_msg(case, reason), store.broken(case))
    assert case in store and not store.ready(case)  # stays registered so requests get a clear error
    reads = store.stats().disk_reads
    with pytest.raises(AdapterError, match=_msg(case, reason)):  # refused again without a re-read
        store.get(case)
    assert store.stats().disk_reads == reads
    with pytest.raises(AdapterError, match=_msg(case, reason)):
        load_adapter(folder, args, case)
    assert _same(store.get("keep"), _snapshot(load_adapter(src / "good", args)))
    store.unregister(case)  # the name is free again
    assert store.register(case, src / "good2").rank == 4 and store.broken(case) is None


@pytest.mark.parametrize("name", ["../x", "a/b", "/abs", "..", ".", "", "x/../y", "a\\b", "..x", "x..y", "a b"])
def test_name_with_path_separator_or_dotdot_refused(env, store, name):
    _, src, args = env
    with pytest.raises(AdapterError, match=rf"adapter name {re.escape(repr(name))} is not a plain name"):
        store.register(name, src / "good")
    if name:  # load_adapter falls back to the folder's name when given none
        with pytest.raises(AdapterError, match="is not a plain name"):
            load_adapter(src / "good", args, name)
    assert store.names() == ["keep"]


def test_name_with_trailing_newline_refused(env, store):
    _, src, _ = env
    with pytest.raises(AdapterError, match="is not a plain name"):
        store.register("x\n", src / "good")


def test_duplicate_name_refused(env, store):
    _, src, _ = env
    snap = _snapshot(store.get("keep"))
    with pytest.raises(AdapterError, match=r"adapter 'keep' is already registered"):
        store.register("keep", src / "good2")
    assert store.info("keep").rank == 8 and _same(store.get("keep"), snap)


def test_missing_folder_refused(env, store, tmp_path):
    with pytest.raises(AdapterError, match=_msg("ghost", r"folder .*ghost does not exist")):
        store.register("ghost", tmp_path / "ghost")
    (tmp_path / "adapter_config.json").write_text("{}")  # a path to the adapter's config, not its folder
    with pytest.raises(AdapterError, match=_msg("file", r"adapter_config\.json is a file, not an adapter's folder")):
        store.register("file", tmp_path / "adapter_config.json")
    assert store.names() == ["keep"]


def test_register_dir_keeps_good_and_reports_broken(env, store, tmp_path):
    _, src, args = env
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

    ok, bad = store.register_dir(d)

    assert ok == ["good-a", "good-b", "nan-in-b"]
    assert sorted(bad) == sorted(broken + ["keep", "bad name"])
    for case in broken:
        assert re.search(_msg(case, CASES[case][1]), bad[case]), bad[case]
    assert re.search(r"adapter 'keep' is already registered", bad["keep"])
    assert re.search(r"adapter name 'bad name' is not a plain name", bad["bad name"])
    assert store.names() == ["good-a", "good-b", "keep", "nan-in-b"]
    with pytest.raises(AdapterError, match=_msg("nan-in-b", VALUE_CASES["nan-in-b"][1])):
        store.get("nan-in-b")
    assert _same(store.get("good-a"), _snapshot(load_adapter(src / "good", args)))
    assert _same(store.get("good-b"), _snapshot(load_adapter(src / "good2", args)))
    assert store.info("keep").path == str(src / "good")


def test_register_dir_missing_root(env, store, tmp_path):
    """adapters.dir naming no folder is a configuration error (an entry point says it in one line)."""
    with pytest.raises(ConfigError, match="adapters.dir: .*nowhere does not exist"):
        store.register_dir(tmp_path / "nowhere")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        store.register_dir(tmp_path / "a-file")


@pytest.mark.parametrize("src_name", ["good", "good2"])
def test_bin_checkpoint_equals_safetensors(env, store, tmp_path, src_name):
    _, src, _ = env
    d = copy_adapter(src / src_name, tmp_path / f"{src_name}-bin")
    _to_bin(d)
    assert not (d / ST).exists() and (d / BIN).is_file()
    store.register("st", src / src_name)
    store.register("pt", d)
    a, b = store.get("st"), store.get("pt")
    assert (a.rank, a.scale, a.targets) == (b.rank, b.scale, b.targets)
    assert _same(b, _snapshot(a))
    assert store.info("pt").nbytes == store.info("st").nbytes


def test_fan_in_fan_out_true_is_accepted_with_same_weights(env, store, tmp_path):
    root, src, _ = env
    d = copy_adapter(src / "good", tmp_path / "fifo")
    edit_config(d, fan_in_fan_out=True)
    info = store.register("fifo", d)
    assert info.rank == 8 and info.targets == ("q_proj", "v_proj")
    assert _same(store.get("fifo"), _snapshot(store.get("keep")))
    # the premise: PEFT itself ignores fan_in_fan_out for Linear targets
    tokens = [3, 14, 15, 92, 65]
    assert torch.allclose(peft_logits(root / "base", d, tokens), peft_logits(root / "base", src / "good", tokens))


def test_target_modules_the_model_lacks_are_ignored_beside_ones_it_has(env, store, tmp_path):
    """As PEFT: a config listing a module the model lacks (shared across architectures) loads
    with the ones it has; the weights and PEFT's logits are those of the adapter without it."""
    root, src, _ = env
    d = copy_adapter(src / "good", tmp_path / "extra")
    edit_config(d, target_modules=["q_proj", "v_proj", "c_attn"])
    info = store.register("extra", d)
    assert info.targets == ("q_proj", "v_proj") and _same(store.get("extra"), _snapshot(store.get("keep")))
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
def test_malformed_config_values_raise_adapter_error(env, store, tmp_path, case):
    _, src, _ = env
    d = copy_adapter(src / "good", tmp_path / case)
    edit_config(d, **MALFORMED[case])
    with pytest.raises(AdapterError, match=_msg(case, "")):
        store.register(case, d)


def test_register_dir_survives_malformed_config(env, store, tmp_path):
    _, src, _ = env
    d = tmp_path / "adapters"
    copy_adapter(src / "good", d / "a-good")
    edit_config(copy_adapter(src / "good", d / "b-weird"), target_modules=[1])
    copy_adapter(src / "good2", d / "c-good")
    ok, bad = store.register_dir(d)
    assert ok == ["a-good", "c-good"] and list(bad) == ["b-weird"]


def test_tensors_outside_target_modules_not_applied(env, store, tmp_path):
    _, src, _ = env
    d = copy_adapter(src / "good", tmp_path / "q-only")
    edit_config(d, target_modules=["q_proj"])  # the file still holds v_proj tensors
    try:
        store.register("q-only", d)
    except AdapterError:
        return  # refusing is fine too
    assert "v_proj" not in store.get("q-only").a


def test_string_target_modules_matching_nothing_refused(env, store, tmp_path):
    _, src, _ = env
    d = copy_adapter(src / "good", tmp_path / "str-target")
    edit_config(d, target_modules="c_attn")
    with pytest.raises(AdapterError, match=_msg("str-target", "c_attn")):
        store.register("str-target", d)


def test_alora_refused(env, store, tmp_path):
    _, src, _ = env
    d = copy_adapter(src / "good", tmp_path / "alora")
    edit_config(d, alora_invocation_tokens=[9, 33])
    with pytest.raises(AdapterError, match=_msg("alora", "alora")):
        store.register("alora", d)
