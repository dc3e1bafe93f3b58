"""Architectures past Llama served with mixed adapters: the engine's greedy tokens equal
transformers + peft, eager and compiled, through preemption, and with the prefill's LoRA delta
computed on the CPU while the adapter is copied.
- Qwen3: an RMSNorm over each query and key head before rotary (the q/k deltas come before it).
- Phi-3: q/k/v and gate/up fused in the checkpoint, and so in its adapters: a qkv_proj LoRA is
  served as q/k/v LoRAs sharing its A, each with its rows of B.
- Gemma: scaled embeddings, norms of 1 + w, GELU; Gemma 2 adds norms after attention and the MLP
  and soft-capped attention scores and logits; Gemma 3 Gemma 2's norms, per-head q/k norms, and a
  rope of their own for its sliding layers.
- Granite: Llama's layers, with the embeddings, attention scores, layer outputs and logits scaled.
- OLMo 2: norms after attention and the MLP and none before them, q/k norms over all heads; OLMo 3
  adds sliding layers with a rope of their own.
- SmolLM3: layers without rotary (NoPE); Ministral: Mistral's layers, windows per layer.
- Mixtral, Qwen2-MoE (a gated shared expert), Qwen3-MoE, OLMoE (q/k norms over all heads,
  clipped q/k/v), GraniteMoE (Granite's multipliers, experts stacked in the checkpoint): the
  router's top-k experts, LoRA on attention.
- GLM, GLM-4: rope over pairs (2i, 2i + 1) of the first half of each head; gate/up fused in the
  checkpoint and adapters, q/k/v apart; GLM-4 adds norms after attention and the MLP.
- Cohere: LayerNorms (per-head q/k ones), attention and the MLP side by side on one norm, rope
  over neighbouring pairs, scaled logits; Cohere 2 adds sliding layers, rope on those only.
- Helium, ERNIE 4.5: Llama's layers with rope over neighbouring pairs.
- Mistral 3 (Mistral Small 3.1's multimodal checkpoint), Qwen2.5-VL: their language models.
- HunYuan (dense): per-head q/k norms after rope, a fixed NTK alpha.
- StarCoder2: torch's LayerNorms with biases, an MLP without a gate (c_fc, c_proj), windows.
- Phi: attention and an MLP without a gate (fc1, fc2) on one LayerNorm, summed before the
  residual, o named dense, a head with a bias; StableLM: LayerNorms per q/k head, parallel layers;
  both turn part of each head.
- Nemotron: LayerNorms of weights 1's offset, an MLP without a gate (ReLU²); Arcee: Llama's
  layers with that MLP; OLMo: LayerNorms without parameters, q/k/v clipped.
- EXAONE 4: OLMo 2's norms, per-head q/k norms, full-attention layers without rotary beside
  sliding ones; Seed-OSS: Llama's layers, o's bias apart from q/k/v's."""

from __future__ import annotations

import pytest
import torch
from helpers import peft_greedy, peft_reference, save_peft_adapter, save_random_hf_model

from caraserve.config import AdapterConfig, CpuAssistConfig, EngineConfig, ModelConfig
from caraserve.engine import Engine
from caraserve.request import SamplingParams

NEW_TOKENS = 10
MODELS = {  # arch -> (model overrides, adapters)
    "qwen3": ({"head_dim": 32, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}, {
        "qk-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj"]),
        "all-r16": dict(r=16, lora_alpha=8, target_modules="all-linear"),
        "v-mlp-r4": dict(r=4, lora_alpha=4, target_modules=["v_proj", "down_proj"]),
    }),
    # Phi-3.5-mini's longrope over an original context of 12 (prompt + 10 tokens outgrow it: the
    # engine recomputes those sequences with the long factors, transformers' generate too) and
    # Phi-4-mini's rope over 3/4 of each head
    "phi3": ({"sliding_window": 8, "max_position_embeddings": 48, "original_max_position_embeddings": 12,
              "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                                  "short_factor": [1.0 + 0.3 * i for i in range(6)],
                                  "long_factor": [2.0 + 0.9 * i for i in range(6)]}}, {
        "qkv-r8": dict(r=8, lora_alpha=16, target_modules=["qkv_proj"]),
        "all-r16": dict(r=16, lora_alpha=8, target_modules="all-linear",
                        rank_pattern={"layers.1.self_attn.qkv_proj": 4}, alpha_pattern={"gate_up_proj": 64}),
        "o-mlp-r4": dict(r=4, lora_alpha=4, target_modules=["o_proj", "gate_up_proj", "down_proj"],
                         layers_to_transform=[0]),
    }),
    "gemma": ({"tie_word_embeddings": True}, {
        "q-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "o_proj"]),
        "all-r16": dict(r=16, lora_alpha=8, target_modules="all-linear"),
        "mlp-r4": dict(r=4, lora_alpha=4, target_modules=["gate_proj", "up_proj", "down_proj"]),
    }),
    "gemma2": ({"sliding_window": 8, "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0}, {
        "qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        "all-r16": dict(r=16, lora_alpha=8, target_modules="all-linear"),
    }),
    # the language model of a multimodal checkpoint: its adapters name model.language_model's
    # modules, and all-linear (or a bare q_proj) takes the vision tower's too, which text leaves out
    "gemma3-mm": ({"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}, {
        "qk-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj"]),
        "all-r16": dict(r=16, lora_alpha=8, target_modules="all-linear"),
        "lm-regex-r4": dict(r=4, lora_alpha=4, target_modules=r".*language_model.*\.(v_proj|down_proj)"),
    }),
    # Mistral Small 3.1's checkpoint (Mistral 3): its Mistral language model, the vision tower's
    # LoRA (all-linear adapts it too) left out
    "mistral3-mm": ({"sliding_window": 8}, {
        "qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        "all-r16": dict(r=16, lora_alpha=8, target_modules="all-linear"),
    }),
    # Qwen2.5-VL's language model (all-linear adapts its vision blocks too: left out)
    "qwen2_5_vl-mm": ({}, {
        "qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        "all-r16": dict(r=16, lora_alpha=8, target_modules="all-linear"),
    }),
    "granite": ({"embedding_multiplier": 3.0, "attention_multiplier": 0.2, "residual_multiplier": 0.5,
                 "logits_scaling": 2.0}, {
        "qk-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "o_proj"]),
        "all-r16": dict(r=16, lora_alpha=8, target_modules="all-linear"),
    }),
    "gemma3": ({"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}, {
        "qk-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj"]),
        "all-r16": dict(r=16, lora_alpha=8, target_modules="all-linear"),
        "v-mlp-r4": dict(r=4, lora_alpha=4, target_modules=["v_proj", "down_proj"]),
    }),
    "olmo2": ({"attention_bias": True}, {
        "qk-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj"]),
        "all-r16": dict(r=16, lora_alpha=8, target_modules="all-linear"),
        "o-mlp-r4": dict(r=4, lora_alpha=4, target_modules=["o_proj", "up_proj"]),
    }),
    "olmo3": ({"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}, {
        "kv-r8": dict(r=8, lora_alpha=16, target_modules=["k_proj", "v_proj"]),
        "all-r16": dict(r=16, lora_alpha=8, target_modules="all-linear"),
    }),
    "smollm3": ({"no_rope_layers": [1, 0], "use_sliding_window": True, "sliding_window": 8,
                 "layer_types": ["full_attention", "sliding_attention"]}, {
        "qk-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj"]),
        "all-r16": dict(r=16, lora_alpha=8, target_modules="all-linear"),
    }),
    "ministral": ({"sliding_window": 8, "layer_types": ["full_attention", "sliding_attention"]}, {
        "qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        "all-r16": dict(r=16, lora_alpha=8, target_modules="all-linear"),
    }),
    "exaone4": ({"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}, {
        "qk-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj"]),
        "all-r16": dict(r=16, lora_alpha=8, target_modules="all-linear"),
    }),
    "seed_oss": ({"attention_bias": True, "attention_out_bias": True}, {
        "qo-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "o_proj"]),
        "all-r16": dict(r=16, lora_alpha=8, target_modules="all-linear"),
    }),
    # mixture-of-experts models: LoRA on attention (PEFT's all-linear adapts the experts' parameters
    # too, refused), the experts routed as transformers routes them
    "mixtral": ({"sliding_window": 8}, {
        "qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        "qkvo-r16": dict(r=16, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    }),
    "olmoe": ({"clip_qkv": 0.5}, {
        "qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        "ko-r16": dict(r=16, lora_alpha=8, target_modules=["k_proj", "o_proj"]),
    }),
    "qwen2_moe": ({}, {
        "qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        "kvo-r16": dict(r=16, lora_alpha=8, target_modules=["k_proj", "v_proj", "o_proj"]),
    }),
    "granitemoe": ({"embedding_multiplier": 1.5, "attention_multiplier": 0.2, "residual_multiplier": 0.9,
                    "logits_scaling": 2.0}, {
        "qo-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "o_proj"]),
        "kv-r16": dict(r=16, lora_alpha=8, target_modules=["k_proj", "v_proj"]),
    }),
    # GLM's rope over pairs (2i, 2i + 1) of half of each head, gate/up fused in the checkpoint and
    # its adapters (q/k/v apart); GLM-4's norms after attention and the MLP too
    "glm": ({}, {
        "qk-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj"]),
        "all-r16": dict(r=16, lora_alpha=8, target_modules="all-linear", rank_pattern={"layers.1.self_attn.k_proj": 4}),
    }),
    "glm4": ({"attention_bias": False}, {
        "qk-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "o_proj"]),
        "all-r16": dict(r=16, lora_alpha=8, target_modules="all-linear", alpha_pattern={"gate_up_proj": 64}),
        "mlp-r4": dict(r=4, lora_alpha=4, target_modules=["gate_up_proj", "down_proj"], layers_to_transform=[1]),
    }),
    # Cohere: LayerNorms (per-head q/k ones), attention and the MLP on one norm, rope over
    # neighbouring pairs, scaled logits; Cohere 2: rope on its sliding layers only
    "cohere": ({"use_qk_norm": True, "logit_scale": 0.5}, {
        "qk-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj"]),
        "all-r16": dict(r=16, lora_alpha=8, target_modules="all-linear"),
    }),
    "cohere2": ({"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"], "logit_scale": 2.0}, {
        "kv-r8": dict(r=8, lora_alpha=16, target_modules=["k_proj", "v_proj", "up_proj"]),
        "all-r16": dict(r=16, lora_alpha=8, target_modules="all-linear"),
    }),
    # Llama's layers with rope over neighbouring pairs
    "helium": ({"attention_bias": True}, {
        "qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        "all-r16": dict(r=16, lora_alpha=8, target_modules="all-linear"),
    }),
    "ernie4_5": ({"use_bias": True}, {
        "ko-r8": dict(r=8, lora_alpha=16, target_modules=["k_proj", "o_proj", "gate_proj"]),
        "all-r16": dict(r=16, lora_alpha=8, target_modules="all-linear"),
    }),
    # StarCoder2: torch's LayerNorms with biases, an MLP without a gate under its own names (c_fc,
    # c_proj: the pool's up and down), a window over every layer (the projections' biases left out:
    # at these weights they pull every position to the same tokens; test_model checks them)
    "starcoder2": ({"sliding_window": 8, "use_bias": False}, {
        "qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "c_fc"]),
        "all-r16": dict(r=16, lora_alpha=8, target_modules="all-linear", rank_pattern={"c_proj": 4}),
    }),
    # Phi: attention and an MLP without a gate (fc1, fc2) on one LayerNorm, o named dense, a head
    # with a bias, rope over half of each head, per-head q/k LayerNorms
    "phi": ({"qk_layernorm": True}, {
        "qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "fc1"]),
        "all-r16": dict(r=16, lora_alpha=8, target_modules="all-linear", rank_pattern={"dense": 4}),
        "default-r4": dict(r=4, lora_alpha=8, target_modules=None),  # (PEFT's Phi default: q, v, fc1, fc2)
    }),
    # StableLM 2 12B's layers: attention and the MLP of one LayerNorm, a LayerNorm per q/k head,
    # rope over a quarter of each head
    "stablelm": ({"use_parallel_residual": True, "qk_layernorm": True, "use_qkv_bias": True}, {
        "qk-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "down_proj"]),
        "all-r16": dict(r=16, lora_alpha=8, target_modules="all-linear"),
    }),
    # Nemotron: LayerNorms of weights 1's offset, an MLP without a gate (ReLU²), rope over half of
    # each head; Arcee: Llama's layers with that MLP
    "nemotron": ({"attention_bias": True}, {
        "qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"]),
        "all-r16": dict(r=16, lora_alpha=8, target_modules="all-linear", rank_pattern={"down_proj": 4}),
    }),
    "arcee": ({"mlp_bias": True}, {
        "ko-r8": dict(r=8, lora_alpha=16, target_modules=["k_proj", "o_proj", "down_proj"]),
        "all-r16": dict(r=16, lora_alpha=8, target_modules="all-linear"),
    }),
    # OLMo (1): LayerNorms without parameters, q/k/v clipped
    "olmo": ({"clip_qkv": 0.5}, {
        "qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "gate_proj"]),
        "all-r16": dict(r=16, lora_alpha=8, target_modules="all-linear"),
    }),
    # HunYuan: per-head q/k norms after rope, its fixed NTK alpha
    "hunyuan": ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "alpha": 100.0, "factor": 1.0}}, {
        "qk-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj"]),
        "all-r16": dict(r=16, lora_alpha=8, target_modules="all-linear"),
        "v-mlp-r4": dict(r=4, lora_alpha=4, target_modules=["v_proj", "down_proj"]),
    }),
    "qwen3_moe": ({"norm_topk_prob": True}, {
        "qk-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj"]),
        "ko-r16": dict(r=16, lora_alpha=8, target_modules=r".*\.(k_proj|o_proj)"),
    }),
}
WINDOWS = {"qwen3": (None, 8), "phi3": (8, 8), "gemma": (None, None), "gemma2": (8, None), "gemma3": (8, None),
           "gemma3-mm": (8, None), "granite": (None, None), "olmo2": (None, None), "olmo3": (8, None),
           "smollm3": (None, 8), "ministral": (None, 8), "exaone4": (8, None), "seed_oss": (None, None),
           "mixtral": (8, 8), "qwen3_moe": (None, None), "olmoe": (None, None),
           "qwen2_moe": (None, None), "granitemoe": (None, None), "glm": (None, None), "glm4": (None, None),
           "cohere": (None, None), "cohere2": (8, None), "helium": (None, None), "ernie4_5": (None, None),
           "starcoder2": (8, 8), "mistral3-mm": (8, 8), "hunyuan": (None, None),
           "qwen2_5_vl-mm": (None, None), "phi": (None, None), "stablelm": (None, None),
           "nemotron": (None, None), "arcee": (None, None), "olmo": (None, None)}
QK_NORM = ("qwen3", "gemma3", "gemma3-mm", "olmo2", "olmo3", "exaone4", "qwen3_moe", "olmoe", "cohere", "hunyuan",
           "phi", "stablelm")
NO_ROPE = {"smollm3": (1,), "exaone4": (1,), "cohere2": (1,)}
PROMPTS = [[5, 9, 3, 17, 22, 7], [11, 2, 60, 61], [3], [40, 41, 42, 43, 44, 45, 46, 47], [99, 98],
           [1, 2, 3, 4, 5], [70, 71, 72], [8, 8, 8, 8]]
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request, tmp_path_factory):
    arch = request.param
    overrides, adapters = MODELS[arch]
    root = tmp_path_factory.mktemp(arch)
    save_random_hf_model(root / "base", arch, **overrides)
    for i, (name, kw) in enumerate(adapters.items()):
        save_peft_adapter(root / "base", root / "adapters" / name, seed=20 + i, **kw)
    names = [None, *adapters]
    return arch, root, [names[i % len(names)] for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def reference(model):
    """Greedy tokens of transformers (+ peft) for each request alone, EOS a token like any other."""
    arch, root, adapters = model
    peft = peft_reference(root / "base", {n: root / "adapters" / n for n in MODELS[arch][1]})
    out = peft_greedy(peft, list(zip(PROMPTS, adapters)), NEW_TOKENS)
    assert len({tuple(r) for r in out}) == len(out)  # the adapters change the tokens
    return out


def make_engine(root, slots=2, device="cpu", **kw) -> Engine:
    return Engine(EngineConfig(model=ModelConfig(path=str(root / "base"), dtype="float32"),
                               adapters=AdapterConfig(dir=str(root / "adapters"), rank_buckets=(8, 16),
                                                      device_slots=slots, preload="host"),
                               max_batch_size=8, max_seq_len=64, device=device, **kw))


@pytest.mark.parametrize("kv_blocks", [0, 6])
def test_greedy_matches_transformers_peft(model, reference, tmp_path, kv_blocks):
    _check_engine(model, reference, tmp_path, "false", kv_blocks)


# compiled steps of every architecture (a compile takes 5-15 s): these few in the quick run, the
# others marked slow
COMPILED_QUICK = ("phi3", "gemma2", "mixtral", "cohere", "phi")


@pytest.mark.parametrize("model", [pytest.param(a, marks=() if a in COMPILED_QUICK else pytest.mark.slow)
                                   for a in sorted(MODELS)], indirect=True)
def test_compiled_greedy_matches_transformers_peft(model, reference, tmp_path):
    """Compiled steps, with a KV budget that preempts."""
    _check_engine(model, reference, tmp_path, "true", 6)


def _check_engine(model, reference, tmp_path, compile_mode: str, kv_blocks: int) -> None:
    """The engine reads the model's configuration as its architecture says, and its greedy tokens
    are transformers + peft's."""
    arch, root, adapters = model
    kv = dict(kv_block_size=4, num_kv_blocks=kv_blocks) if kv_blocks else {}
    engine = make_engine(root, compile=compile_mode, compile_cache_dir=str(tmp_path), **kv)
    args = engine.model.args
    fused = ("qkv_proj", "gate_up_proj") if arch == "phi3" else ("gate_up_proj",) if arch in ("glm", "glm4") else ()
    assert (args.qk_norm, args.fused_checkpoint) == (arch in QK_NORM, fused)
    assert args.rope_interleaved == (arch in ("glm", "glm4", "cohere", "cohere2", "helium", "ernie4_5"))
    assert args.parallel_block == ("outputs_first" if arch == "phi" else
                                   "residual_first" if arch in ("cohere", "cohere2", "stablelm") else "")
    assert args.layer_norm == ("cohere" if arch in ("cohere", "cohere2") else
                               "torch" if arch in ("starcoder2", "phi", "stablelm", "nemotron") else
                               "plain" if arch == "olmo" else "")
    assert args.mlp_gated == (arch not in ("starcoder2", "phi", "nemotron", "arcee"))
    assert (args.layer_norms[0] is None) == (arch in ("olmo2", "olmo3", "exaone4"))  # no norm before attention
    assert args.no_rope_layers == NO_ROPE.get(arch, ())
    assert (args.moe is not None) == (arch in ("mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "granitemoe"))
    assert args.multimodal == arch.endswith("-mm")
    assert args.sliding_windows == WINDOWS[arch]
    reqs = engine.generate(PROMPTS, GREEDY, adapters)
    assert [r.output_ids for r in reqs] == reference
    if kv_blocks:  # 6 blocks of 4 hold a request or two of these: the others wait or are preempted
        assert engine.scheduler.num_preemptions > 0
    if compile_mode == "true":
        assert engine.graphs.compile_s > 0


def test_cpu_assisted_prefill_matches_transformers_peft(model, reference):
    """One slot per bucket and copies paced at 0.01 GB/s: requests start on adapters still being
    copied, their prefill's delta computed on the CPU, layer groups moving over as they land."""
    _, root, adapters = model
    engine = make_engine(root, slots=1, compile="false",
                         cpu_assist=CpuAssistConfig(mode="on", threads=1, emulate_copy_gbps=0.01, pipeline_layers=1))
    reqs = engine.generate(PROMPTS, GREEDY, adapters)
    assert [r.output_ids for r in reqs] == reference
    assert any(r.cpu_assisted for r in reqs)


@pytest.mark.gpu
@pytest.mark.parametrize("compile_mode", ["false", "true"])
def test_on_cuda_matches_transformers_peft(model, reference, compile_mode):
    """The Triton kernels (Qwen3's heads' norm among the fused norms), and compiled steps replayed
    as CUDA graphs, in float32: the tokens of transformers + peft on the CPU."""
    _, root, adapters = model
    engine = make_engine(root, compile=compile_mode, compile_cache_dir="", device="cuda")
    assert [r.output_ids for r in engine.generate(PROMPTS, GREEDY, adapters)] == reference


def test_phi3_adapters_name_the_fused_modules(tmp_path):
    """A Phi-3 adapter targets qkv_proj / gate_up_proj as its checkpoint names them: a config
    without target_modules (PEFT has no default for Phi-3) or naming only split projections is
    refused, and so is a file of split projections' tensors; the fused ones load into q/k/v and
    gate/up with the same A and B's rows."""
    import shutil

    from helpers import edit_config
    from safetensors.torch import load_file, save_file

    from caraserve.lora.checkpoint import AdapterError, inspect_adapter, load_adapter
    from caraserve.model.loader import load_model

    save_random_hf_model(tmp_path / "base", "phi3")
    args = load_model(tmp_path / "base", "float32").args
    good = save_peft_adapter(tmp_path / "base", tmp_path / "good", seed=3, r=4, target_modules=["qkv_proj"])
    w = load_adapter(good, args)
    tensors = load_file(good / "adapter_model.safetensors")
    a = tensors["base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight"]  # [r, hidden]
    b = tensors["base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight"]  # [q + 2 kv, r]
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    assert w.targets == ("q_proj", "k_proj", "v_proj")
    for m, lo, hi in (("q_proj", 0, q), ("k_proj", q, q + kv), ("v_proj", q + kv, q + 2 * kv)):
        assert torch.equal(w.a[m][0], a.t()) and torch.equal(w.b[m][0], b[lo:hi].t())

    def refused(folder, reason):
        with pytest.raises(AdapterError, match=reason):
            inspect_adapter(folder, args)

    shutil.copytree(good, tmp_path / "no-targets")
    edit_config(tmp_path / "no-targets", target_modules=None)
    refused(tmp_path / "no-targets", r"target_modules is not set, and PEFT has no default for this model; name "
                                     r"some of qkv_proj, o_proj, gate_up_proj, down_proj")
    shutil.copytree(good, tmp_path / "split-names")
    edit_config(tmp_path / "split-names", target_modules=["q_proj", "v_proj"])
    refused(tmp_path / "split-names", r"target module 'q_proj' does not exist in the model")
    shutil.copytree(good, tmp_path / "split-tensors")
    edit_config(tmp_path / "split-tensors", target_modules="all-linear")
    save_file({k.replace("qkv_proj", "q_proj"): v[:q] if "lora_B" in k else v for k, v in tensors.items()},
              tmp_path / "split-tensors" / "adapter_model.safetensors")
    refused(tmp_path / "split-tensors", r"target module self_attn.q_proj does not exist in the model")


def test_multimodal_adapters_of_either_naming_load_alike(tmp_path):
    """A Gemma 3 multimodal adapter saved with transformers 5's names (model.language_model.layers)
    or earlier ones (language_model.model.layers) gives the same weights; its vision tower's
    tensors are left out."""
    from safetensors.torch import load_file, save_file

    from caraserve.lora.checkpoint import load_adapter
    from caraserve.model.loader import load_model

    save_random_hf_model(tmp_path / "base", "gemma3-mm")
    args = load_model(tmp_path / "base", "float32").args
    new = save_peft_adapter(tmp_path / "base", tmp_path / "new", seed=4, r=4, target_modules="all-linear")
    tensors = load_file(new / "adapter_model.safetensors")
    assert any("vision_tower" in k for k in tensors)
    old = tmp_path / "old"
    old.mkdir()
    (old / "adapter_config.json").write_text((new / "adapter_config.json").read_text())
    save_file({k.replace("model.language_model.", "language_model.model."): v for k, v in tensors.items()},
              old / "adapter_model.safetensors")
    a, b = load_adapter(new, args), load_adapter(old, args)
    assert a.targets == b.targets == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert all(torch.equal(a.a[m], b.a[m]) and torch.equal(a.b[m], b.b[m]) for m in a.targets)
