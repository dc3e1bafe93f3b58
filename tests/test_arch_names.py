"""Checkpoints that name their projections otherwise than Llama: Phi's attention output `dense`
and MLP `fc1` / `fc2`, StarCoder2's `c_fc` / `c_proj`. Their adapters name the same modules, and
are served as our o / up / down LoRAs; a config without target_modules takes PEFT's default for
the model (Phi: q_proj, v_proj, fc1, fc2)."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import edit_config, save_peft_adapter, save_random_hf_model
from safetensors.torch import load_file

from caraserve.lora.checkpoint import AdapterError, inspect_adapter, load_adapter
from caraserve.model.llama import checkpoint_tensors
from caraserve.model.loader import load_model


@pytest.fixture(scope="module")
def phi(tmp_path_factory):
    root = tmp_path_factory.mktemp("phi")
    hf = save_random_hf_model(root / "base", "phi")
    return root, hf, load_model(root / "base", "float32")


def test_phi_checkpoint_names_are_the_models(phi):
    """Every tensor of the checkpoint is a parameter of ours under its own name (the head's bias,
    the final_layernorm, dense and fc1 / fc2 included), with the same values."""
    _, hf, model = phi
    ours = checkpoint_tensors(model)
    theirs = {k: v for k, v in hf.state_dict().items() if "rotary" not in k}
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert model.args.adapter_modules == ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")
    assert model.args.module_shape("dense") == model.args.module_shape("o_proj")


def test_phi_adapters_map_dense_and_fc_onto_o_up_down(phi, tmp_path):
    root, _, model = phi
    args = model.args
    good = save_peft_adapter(root / "base", tmp_path / "good", seed=3, r=4, target_modules=["dense", "fc1", "fc2"])
    w = load_adapter(good, args)
    tensors = load_file(good / "adapter_model.safetensors")
    assert w.targets == ("o_proj", "up_proj", "down_proj")
    for ours, theirs, parent in (("o_proj", "dense", "self_attn"), ("up_proj", "fc1", "mlp"),
                                 ("down_proj", "fc2", "mlp")):
        key = f"base_model.model.model.layers.1.{parent}.{theirs}"
        assert torch.equal(w.a[ours][1], tensors[f"{key}.lora_A.weight"].t())
        assert torch.equal(w.b[ours][1] * w.scale, tensors[f"{key}.lora_B.weight"].t() * w.scale)

    default = save_peft_adapter(root / "base", tmp_path / "default", seed=4, r=4, target_modules=None)
    edit_config(default, target_modules=None)  # (PEFT wrote the modules it chose: its default for Phi)
    assert inspect_adapter(default, args).targets == ("q_proj", "v_proj", "up_proj", "down_proj")
    shutil.copytree(good, tmp_path / "llama-names")
    edit_config(tmp_path / "llama-names", target_modules=["o_proj"])
    with pytest.raises(AdapterError, match=r"target module 'o_proj' does not exist in the model"):
        inspect_adapter(tmp_path / "llama-names", args)


def test_a_split_model_without_target_modules_takes_q_and_v(tmp_path):
    save_random_hf_model(tmp_path / "base", "stablelm")
    args = load_model(tmp_path / "base", "float32").args
    default = save_peft_adapter(tmp_path / "base", tmp_path / "default", seed=3, r=4, target_modules=None)
    edit_config(default, target_modules=None)
    assert inspect_adapter(default, args).targets == ("q_proj", "v_proj")
