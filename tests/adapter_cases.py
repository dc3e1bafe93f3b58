"""Broken copies of PEFT adapters, each with the reason it must be refused for, and the fixtures
the adapter validation and registration tests share (a pytest plugin: tests/conftest.py)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from helpers import copy_adapter, edit_config, save_peft_adapter, save_random_hf_model
from safetensors.torch import load_file, save_file

from caraserve.lora.host_store import HostStore
from caraserve.model.loader import load_model

ST, BIN, CFG = "adapter_model.safetensors", "adapter_model.bin", "adapter_config.json"
P = "base_model.model.model.layers"  # PEFT's key prefix for decoder layers
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_env(root: Path):
    """(root, the source adapters' folder, the base model's args): a base model, one of another
    hidden size, and adapters PEFT wrote, good ones and ones for features we do not serve."""
    save_random_hf_model(root / "base", "llama")  # hidden 64, 2 layers, vocab 128
    save_random_hf_model(root / "base32", "llama", hidden_size=32, intermediate_size=56)
    src = root / "src"
    save_peft_adapter(root / "base", src / "good", seed=1)  # r=8 on q_proj, v_proj
    save_peft_adapter(root / "base", src / "good2", seed=2, r=4, lora_alpha=8, target_modules=ALL)
    save_peft_adapter(root / "base32", src / "hidden32", seed=3)
    save_peft_adapter(root / "base", src / "peft-dora", seed=4, use_dora=True)
    save_peft_adapter(root / "base", src / "peft-embed", seed=5, target_modules=["embed_tokens"])
    save_peft_adapter(root / "base", src / "peft-lm-head", seed=6, target_modules=["lm_head"])
    save_peft_adapter(root / "base", src / "peft-mts", seed=7, modules_to_save=["lm_head"])
    save_peft_adapter(root / "base", src / "peft-bias", seed=8, bias="all")
    save_peft_adapter(root / "base", src / "peft-lora-bias", seed=9, lora_bias=True)
    model = load_model(root / "base", "float32")
    return root, src, model.args


@pytest.fixture(scope="module")
def adapter_env(tmp_path_factory):
    return build_env(tmp_path_factory.mktemp("validation"))


@pytest.fixture
def adapter_store(adapter_env) -> HostStore:
    """A store holding one good adapter, 'keep'."""
    _, src, args = adapter_env
    s = HostStore(args)
    s.register("keep", src / "good")
    return s


# ---------------------------------------------------------------- builders of broken copies


def _edit_tensors(d: Path, fn) -> None:
    t = load_file(str(d / ST))
    t = fn(dict(t))
    save_file(t, str(d / ST))


def to_bin(d: Path) -> None:
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


def _retype(dtype: torch.dtype):
    def fn(t):
        key = f"{P}.0.self_attn.q_proj.lora_A.weight"
        t[key] = t[key].to(dtype)
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
    "truncated-bin": (_b("good", lambda d: (to_bin(d), _truncate(d / BIN))),
                      r"cannot read .*adapter_model\.bin: not a whole PyTorch checkpoint \(truncated or corrupt"),
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
    "lora-bias-peft": (_b("peft-lora-bias", lambda d: None), r"lora_bias=true \(a bias on lora_B\) is not supported"),
    "pissa-init": (_b("good", lambda d: edit_config(d, init_lora_weights="pissa_niter_4")),
                   r"init_lora_weights=\"pissa_niter_4\" is not supported: PEFT rewrites the base model's weights"),
    "olora-init": (_b("good", lambda d: edit_config(d, init_lora_weights="olora")), r"init_lora_weights=\"olora\""),
    "layer-replication": (_b("good", lambda d: edit_config(d, layer_replication=[[0, 1], [0, 1]])),
                          r"layer_replication=\[\[0, 1\], \[0, 1\]\] \(layer replication\) is not supported"),
    "kasa": (_b("good", lambda d: edit_config(d, kasa_config={"x": 1})), r"kasa_config=.* \(KaSA\) is not supported"),
    "bdlora": (_b("good", lambda d: edit_config(d, use_bdlora={"nblocks": 2})), r"use_bdlora=.*is not supported"),
    "target-parameters": (_b("good", lambda d: edit_config(d, target_parameters=["mlp.experts.gate_up_proj"])),
                          r"target_parameters=.* \(LoRA on parameters, such as a mixture-of-experts model.s experts\) "
                          r"is not supported"),
    "trainable-tokens": (_b("good", lambda d: edit_config(d, trainable_token_indices=[5, 6])),
                         r"trainable_token_indices=\[5, 6\] \(trainable tokens\) is not supported"),
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
    "int-tensor": (_b("good", lambda d: _edit_tensors(d, _retype(torch.int32))),
                   r"layers\.0\.self_attn\.q_proj\.lora_A\.weight' in .* has dtype (I32|torch\.int32): "
                   r"LoRA weights must be floating point"),
    "bool-tensor-bin": (_b("good", lambda d: (_edit_tensors(d, _retype(torch.bool)), to_bin(d))),
                        r"has dtype torch\.bool: LoRA weights must be floating point"),
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


def snapshot(w):
    return {("a", m): t.clone() for m, t in w.a.items()} | {("b", m): t.clone() for m, t in w.b.items()}


def same(w, snap) -> bool:
    now = snapshot(w)
    return now.keys() == snap.keys() and all(torch.equal(now[k], snap[k]) for k in snap)


def msg(name: str, reason: str) -> str:
    return rf"(?s)adapter {re.escape(repr(name))}.*{reason}"


