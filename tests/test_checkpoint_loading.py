"""Checkpoint folders as users have them, read as transformers reads them: tied heads saved
either way, a stale single file beside shards, options a family ignores; and the ones that
would run as other weights or other layers (quantized, partial rope) refused by name."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from helpers import run_prefill_decode, save_random_hf_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from caraserve.model.llama import UnsupportedModelError
from caraserve.model.loader import ModelLoadError, eos_token_ids, load_model

PROMPT = [5, 9, 3, 17, 22, 7, 1, 90, 4]


def _logits_match_transformers(folder) -> None:
    ours = load_model(folder, "float32")
    pre, _ = run_prefill_decode(ours, [PROMPT], [[1]])
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(torch.tensor([PROMPT])).logits[0]
    assert ((pre[0] - ref).abs().max() / ref.abs().max()).item() < 1e-4


def _edit_config(folder, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | changes))


def _edit_tensors(folder, edit) -> None:
    f = folder / "model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def test_tied_config_with_a_different_head_keeps_the_head_as_transformers(tmp_path, caplog):
    save_random_hf_model(tmp_path, "llama")  # untied: lm_head differs from the embeddings
    _edit_config(tmp_path, tie_word_embeddings=True)
    _logits_match_transformers(tmp_path)
    assert "lm_head.weight differs from model.embed_tokens.weight" in caplog.text
    model = load_model(tmp_path, "float32")
    assert model.lm_head.weight is not model.model.embed_tokens.weight


def test_a_tied_checkpoint_holding_its_own_head_is_placed_with_the_head_counted(tmp_path, monkeypatch):
    """The head a tied checkpoint holds may be kept apart (above): the placement plan (which
    model.max_memory_bytes spreads over devices) sees it as a tensor of its own, not the
    embeddings' second name; a tied checkpoint without one is planned tied."""
    from caraserve.model import loader

    planned, real = [], loader.plan_placement

    def seen(model, *args):
        planned.append(model.lm_head.weight is model.model.embed_tokens.weight)
        return real(model, *args)

    monkeypatch.setattr(loader, "plan_placement", seen)
    save_random_hf_model(tmp_path, "llama")
    _edit_config(tmp_path, tie_word_embeddings=True)
    load_model(tmp_path, "float32")
    _edit_tensors(tmp_path, lambda t: t.pop("lm_head.weight"))
    load_model(tmp_path, "float32")
    assert planned == [False, True]


def test_tied_checkpoint_holding_both_or_only_the_head(tmp_path, caplog):
    save_random_hf_model(tmp_path, "llama", tie_word_embeddings=True)
    _edit_tensors(tmp_path, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].clone()))
    model = load_model(tmp_path, "float32")
    assert model.lm_head.weight is model.model.embed_tokens.weight and "unexpected" not in caplog.text
    _edit_tensors(tmp_path, lambda t: t.pop("model.embed_tokens.weight"))  # the head only
    _logits_match_transformers(tmp_path)
    assert "unexpected" not in caplog.text


def test_single_file_is_read_before_an_index_as_transformers(tmp_path):
    old = save_random_hf_model(tmp_path / "old", "llama", seed=1)
    new = save_random_hf_model(tmp_path / "new", "llama", seed=2)
    new.save_pretrained(str(tmp_path / "both"), max_shard_size="40KB")
    old.save_pretrained(str(tmp_path / "single"))
    (tmp_path / "both" / "model.safetensors").write_bytes((tmp_path / "single" / "model.safetensors").read_bytes())
    assert (tmp_path / "both" / "model.safetensors.index.json").is_file()
    _logits_match_transformers(tmp_path / "both")


def test_bias_options_transformers_ignores_for_mistral_and_qwen2(tmp_path):
    for arch in ("mistral", "qwen2"):
        folder = tmp_path / arch
        save_random_hf_model(folder, arch)
        _edit_config(folder, attention_bias=True, mlp_bias=True)
        _logits_match_transformers(folder)


@pytest.mark.parametrize("edit, reason", [
    (lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight",
                             t["model.layers.0.mlp.up_proj.weight"].to(torch.float8_e4m3fn)),
     r"'model.layers.0.mlp.up_proj.weight' in .* is float8_e4m3fn: quantized or integer weights"),
    (lambda t: t.__setitem__("model.layers.1.self_attn.q_proj.weight",
                             t["model.layers.1.self_attn.q_proj.weight"].to(torch.int8)),
     r"'model.layers.1.self_attn.q_proj.weight' in .* is int8"),
])
def test_quantized_or_integer_weights_are_refused(tmp_path, edit, reason):
    save_random_hf_model(tmp_path, "llama")
    _edit_tensors(tmp_path, edit)
    with pytest.raises(ModelLoadError, match=reason):
        load_model(tmp_path)


def test_a_quantization_config_is_refused(tmp_path):
    save_random_hf_model(tmp_path, "llama")
    _edit_config(tmp_path, quantization_config={"quant_method": "gptq", "bits": 4})
    with pytest.raises(ModelLoadError, match=r"quantized checkpoints \(quantization_config, quant_method='gptq'\)"):
        load_model(tmp_path)


@pytest.mark.parametrize("arch, option, reason", [
    ("llama", {"partial_rotary_factor": 0.5,
               "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
     r"rope over 8 of the head's 16 dimensions \(partial_rotary_factor=0.5\) is not supported for llama"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": None, "max_window_layers": 0,
               "layer_types": ["sliding_attention", "sliding_attention"]},
     r"use_sliding_window is true and layers are sliding_attention, but sliding_window is not set"),
    # (transformers' other models keep a sequence's keys turned with the short factors as it grows)
    ("llama", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
                                   "long_factor": [2.0] * 8, "original_max_position_embeddings": 256}},
     r"rope type 'longrope' is not supported for llama .*longrope for Phi-3"),
    ("gemma2", {"final_logit_softcapping": -30.0}, r"final_logit_softcapping=-30.0 must be a positive number"),
    ("gemma3", {"hidden_activation": "silu"}, r"hidden_activation='silu' is not supported: the MLP computes GELU"),
    ("gemma3", {"use_bidirectional_attention": True}, r"use_bidirectional_attention=true is not supported"),
    ("gemma3", {"rope_parameters": {"full_attention": {"rope_type": "longrope", "rope_theta": 1e6},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
     r"rope type 'longrope' is not supported"),
])
def test_configs_the_layers_cannot_honour_are_refused(tmp_path, arch, option, reason):
    save_random_hf_model(tmp_path, arch)
    _edit_config(tmp_path, **option)
    with pytest.raises(UnsupportedModelError, match=reason):
        load_model(tmp_path)


def test_eos_ids_are_the_generation_configs_and_the_tokenizers(tmp_path):
    """As vLLM: generation_config.json's eos_token_id where it gives one, else config.json's,
    plus the tokenizer's (transformers' generate stops at the generation config's only)."""
    cfg, tok = SimpleNamespace(eos_token_id=7), SimpleNamespace(eos_token_id=3)
    assert eos_token_ids(tmp_path, cfg, tok) == {7, 3}
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1}))
    assert eos_token_ids(tmp_path, cfg, tok) == {7, 3}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 9]}))
    assert eos_token_ids(tmp_path, cfg, tok) == {2, 9, 3}
    assert eos_token_ids(tmp_path, cfg, None) == {2, 9}
