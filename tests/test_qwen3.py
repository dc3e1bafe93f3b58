"""Qwen3 (an RMSNorm over each query and key head before rotary) served with mixed adapters: the
engine's greedy tokens equal transformers + peft, eager and compiled, through preemption, and with
the prefill's LoRA delta computed on the CPU while the adapter is copied."""

from __future__ import annotations

import pytest
import torch
from helpers import save_peft_adapter, save_random_hf_model

from caraserve.config import AdapterConfig, CpuAssistConfig, EngineConfig, ModelConfig
from caraserve.engine import Engine
from caraserve.request import SamplingParams

NEW_TOKENS = 10
ADAPTERS = {  # the q/k deltas are added before the heads' norm, as PEFT adds them
    "qk-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj"]),
    "all-r16": dict(r=16, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                        "gate_proj", "up_proj", "down_proj"]),
    "v-mlp-r4": dict(r=4, lora_alpha=4, target_modules=["v_proj", "down_proj"]),
}
PROMPTS = [[5, 9, 3, 17, 22, 7], [11, 2, 60, 61], [3], [40, 41, 42, 43, 44, 45, 46, 47], [99, 98],
           [1, 2, 3, 4, 5], [70, 71, 72], [8, 8, 8, 8]]
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3")
    save_random_hf_model(root / "base", "qwen3", head_dim=32, use_sliding_window=True, sliding_window=8,
                         max_window_layers=1)
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        save_peft_adapter(root / "base", root / "adapters" / name, seed=20 + i, **kw)
    adapters = [[None, *ADAPTERS][i % (len(ADAPTERS) + 1)] for i in range(len(PROMPTS))]
    return root, adapters


@pytest.fixture(scope="module")
def reference(qwen3):
    """Greedy tokens of transformers (+ peft) for each request alone."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, adapters = qwen3
    base = AutoModelForCausalLM.from_pretrained(str(root / "base"), dtype=torch.float32).eval()
    names = list(ADAPTERS)
    peft = PeftModel.from_pretrained(base, str(root / "adapters" / names[0]), adapter_name=names[0])
    for n in names[1:]:
        peft.load_adapter(str(root / "adapters" / n), adapter_name=n)
    out = []
    kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    for ids, adapter in zip(PROMPTS, adapters):
        with torch.no_grad():
            if adapter is None:
                with peft.disable_adapter():
                    seq = peft.generate(input_ids=torch.tensor([ids]), **kw)
            else:
                peft.set_adapter(adapter)
                seq = peft.generate(input_ids=torch.tensor([ids]), **kw)
        out.append(seq[0, len(ids):].tolist())
    return out


def make_engine(root, slots=2, device="cpu", **kw) -> Engine:
    return Engine(EngineConfig(model=ModelConfig(path=str(root / "base"), dtype="float32"),
                               adapters=AdapterConfig(dir=str(root / "adapters"), rank_buckets=(8, 16),
                                                      device_slots=slots, preload="host"),
                               max_batch_size=8, max_seq_len=64, device=device, **kw))


@pytest.mark.parametrize("compile_mode, kv_blocks", [("false", 0), ("false", 6), ("true", 6)])
def test_qwen3_greedy_matches_transformers_peft(qwen3, reference, tmp_path, compile_mode, kv_blocks):
    root, adapters = qwen3
    kv = dict(kv_block_size=4, num_kv_blocks=kv_blocks) if kv_blocks else {}
    engine = make_engine(root, compile=compile_mode, compile_cache_dir=str(tmp_path), **kv)
    assert engine.model.args.qk_norm and engine.model.args.sliding_windows == (None, 8)
    reqs = engine.generate(PROMPTS, GREEDY, adapters)
    assert [r.output_ids for r in reqs] == reference
    assert len({tuple(r) for r in reference}) == len(reference)  # the adapters change the tokens
    if kv_blocks:  # 6 blocks of 4 hold a request or two of these: the others wait or are preempted
        assert engine.scheduler.num_preemptions > 0
    if compile_mode == "true":
        assert engine.graphs.compile_s > 0


def test_qwen3_cpu_assisted_prefill_matches_transformers_peft(qwen3, reference):
    """One slot per bucket and copies paced at 0.01 GB/s: requests start on adapters still being
    copied, their prefill's delta computed on the CPU, layer groups moving over as they land."""
    root, adapters = qwen3
    engine = make_engine(root, slots=1, compile="false",
                         cpu_assist=CpuAssistConfig(mode="on", threads=1, emulate_copy_gbps=0.01, pipeline_layers=1))
    reqs = engine.generate(PROMPTS, GREEDY, adapters)
    assert [r.output_ids for r in reqs] == reference
    assert any(r.cpu_assisted for r in reqs)


@pytest.mark.gpu
@pytest.mark.parametrize("compile_mode", ["false", "true"])
def test_qwen3_on_cuda_matches_transformers_peft(qwen3, reference, compile_mode):
    """The Triton kernels (the heads' norm among the fused norms), and compiled steps replayed as
    CUDA graphs, in float32: the tokens of transformers + peft on the CPU."""
    root, adapters = qwen3
    engine = make_engine(root, compile=compile_mode, compile_cache_dir="", device="cuda")
    assert [r.output_ids for r in engine.generate(PROMPTS, GREEDY, adapters)] == reference
