"""Phi-3's longrope (Phi-3.5-mini, Phi-3-128k, Phi-4-mini): a sequence longer than the original
context turns with the long factors, all of its tokens, as transformers' Phi-3 generate runs it
(the cache recomputed once the sequence outgrows the context). Each step's logprobs and tokens
against transformers' full forward over the sequence so far, for prompts that start short and
outgrow the context, prompts longer than it, chunked prefill, prefix hits, preemption and
compiled decode steps."""

from __future__ import annotations

import pytest
import torch
from helpers import save_peft_adapter, save_random_hf_model

from caraserve.config import AdapterConfig, EngineConfig, ModelConfig
from caraserve.engine import Engine
from caraserve.request import SamplingParams

ORIGINAL = 12  # original_max_position_embeddings
NEW_TOKENS = 10
# 6, 4 and 11 tokens outgrow the context while decoding, 16 start past it
PROMPTS = [[5, 9, 3, 17, 22, 7], [11, 2, 60, 61], list(range(30, 46)), [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]]
ADAPTERS = [None, "qkv", None, "qkv"]
# then: the 16 again (its blocks from the cache), and its first 12 alone, which must not take the
# blocks the long sequences turned with the long factors
AGAIN = [list(range(30, 46)), list(range(30, 42))]
ROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
        "short_factor": [1.0 + 0.3 * i for i in range(6)], "long_factor": [0.05 * (i + 1) for i in range(6)]}


@pytest.fixture(scope="module")
def phi(tmp_path_factory):
    root = tmp_path_factory.mktemp("longrope")
    hf = save_random_hf_model(root / "base", "phi3", rope_parameters=ROPE, max_position_embeddings=64,
                              original_max_position_embeddings=ORIGINAL)
    with torch.no_grad():  # sharper attention than the random init's: the rope's turns show in the logits
        for layer in hf.model.layers:
            layer.self_attn.qkv_proj.weight[: 96] *= 4.0  # the 4 query and 2 key heads of 16
    hf.save_pretrained(str(root / "base"))
    save_peft_adapter(root / "base", root / "adapters" / "qkv", seed=3, r=8, lora_alpha=16,
                      target_modules=["qkv_proj", "o_proj"])
    from peft import PeftModel

    peft = PeftModel.from_pretrained(hf, str(root / "adapters" / "qkv"), adapter_name="qkv").eval()
    return root, peft


def reference(peft, prompt, adapter):
    """transformers' greedy tokens and their logprobs, each from a full forward over the sequence
    so far (what Phi-3's generate computes: its cache is recomputed once past the context)."""
    seq, tokens, logprobs = list(prompt), [], []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            if adapter is None:
                with peft.disable_adapter():
                    logits = peft(torch.tensor([seq])).logits[0, -1]
            else:
                peft.set_adapter(adapter)
                logits = peft(torch.tensor([seq])).logits[0, -1]
            lp = torch.log_softmax(logits.float(), -1)
            tokens.append(int(lp.argmax()))
            logprobs.append(float(lp.max()))
            seq.append(tokens[-1])
    return tokens, logprobs


@pytest.fixture(scope="module")
def expected(phi):
    _, peft = phi
    return [reference(peft, p, a) for p, a in zip(PROMPTS + AGAIN, ADAPTERS + [None, None])]


def test_the_long_factors_change_the_reference(phi, expected):
    """The test's factors are far enough apart that a sequence turned with the short ones all
    along scores its tokens otherwise (else the checks below could not fail)."""
    _, peft = phi
    short = dict(ROPE, long_factor=ROPE["short_factor"])
    peft.base_model.model.config.rope_parameters = short
    rotary = peft.base_model.model.model.rotary_emb
    saved = rotary.long_inv_freq if hasattr(rotary, "long_inv_freq") else None
    rotary.long_inv_freq = rotary.original_inv_freq.clone()
    try:
        shorts = [reference(peft, p, a)[1] for p, a in zip(PROMPTS + AGAIN, ADAPTERS + [None, None])]
    finally:
        peft.base_model.model.config.rope_parameters = ROPE
        rotary.long_inv_freq = saved
    for (_, want), got in zip(expected, shorts):  # (each sequence outgrows the context)
        assert max(abs(a - b) for a, b in zip(want, got)) > 1e-3


@pytest.mark.parametrize("setting", ["eager", "chunked", "preempted", "compiled"])
def test_engine_matches_transformers(phi, expected, tmp_path, setting):
    root, _ = phi
    kw = dict(max_tokens_per_step=8) if setting == "chunked" else \
        dict(num_kv_blocks=10) if setting == "preempted" else \
        dict(compile="true", compile_cache_dir=str(tmp_path)) if setting == "compiled" else {}
    # (the adapter resident from the start: the requests are admitted as they come, whatever a copy
    # takes on a loaded machine, so 10 blocks cannot hold them as they grow and one is preempted)
    engine = Engine(EngineConfig(model=ModelConfig(path=str(root / "base"), dtype="float32"),
                                 adapters=AdapterConfig(dir=str(root / "adapters"), rank_buckets=(8,), device_slots=2,
                                                        preload="all"),
                                 max_batch_size=8, max_seq_len=64, device="cpu", kv_block_size=4,
                                 **{"compile": "false", **kw}))
    assert engine.model.args.long_rope_from == ORIGINAL
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=True)
    reqs = engine.generate(PROMPTS, params, ADAPTERS)
    reqs += [engine.generate([p], params, [None])[0] for p in AGAIN]
    for req, (tokens, logprobs) in zip(reqs, expected):
        assert req.output_ids == tokens
        torch.testing.assert_close(torch.tensor(req.output_logprobs), torch.tensor(logprobs), rtol=0, atol=2e-4)
    if setting == "preempted":  # (10 blocks: the first requests' blocks are gone by then)
        assert engine.scheduler.num_preemptions > 0
    else:
        assert reqs[-2].cached_tokens > 0
