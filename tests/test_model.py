"""Our decoder against transformers' implementation, and the Hugging Face folder loader."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_prefill_decode, save_random_hf_model
from model_cases import CONFIGS
from safetensors.torch import load_file, save_file

from caraserve.model.layers import LoraLinear
from caraserve.model.llama import UnsupportedModelError
from caraserve.model.loader import ModelLoadError, load_model, plan_placement
from caraserve.model.moe import Experts

PROMPTS = [[5, 9, 3, 17, 22, 7, 1, 90, 4], [11, 2, 60], [3], [40, 41, 42, 43, 44, 45, 46]]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    arch, overrides = CONFIGS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    hf = save_random_hf_model(folder, arch, **overrides)
    return hf, load_model(folder, "float32")


# Paged KV layouts (block size, block placement): one block per sequence (the old one-slot
# layout), blocks of 4 in order, blocks of 4 scattered (no two of a sequence adjacent), and
# blocks of one token
KV_LAYOUTS = {"one_block": (32, "in_order"), "paged": (4, "in_order"), "scattered": (4, "scattered"),
              "bs1": (1, "scattered")}


@pytest.mark.parametrize("layout", sorted(KV_LAYOUTS))
def test_prefill_and_decode_logits_match_transformers(pair, layout):
    hf, ours = pair
    g = torch.Generator().manual_seed(1)
    steps = 20
    decode = [torch.randint(0, 128, (steps,), generator=g).tolist() for _ in PROMPTS]
    block_size, placement = KV_LAYOUTS[layout]
    pre, dec = run_prefill_decode(ours, PROMPTS, decode, block_size=block_size, layout=placement)
    with torch.no_grad():
        for i, p in enumerate(PROMPTS):
            full = hf(torch.tensor([p + decode[i]])).logits[0]
            assert rel_err(pre[i], full[: len(p)]) < 1e-4
            for t in range(steps):
                assert rel_err(dec[t][i], full[len(p) + t]) < 1e-4


def test_sdpa_prefill_matches_transformers(pair, monkeypatch):
    """Prompt chunks the CPU kernel declines run through SDPA (as a batch of one, which reaches
    torch's flash kernel): whole prompts (causal, or masked under a sliding window) and a
    prompt's second chunk after its cached first one (masked)."""
    from caraserve.kv_cache import KVCache
    from caraserve.model import self_attention
    from caraserve.model.batch import ForwardBatch

    hf, ours = pair
    monkeypatch.setattr(self_attention.cpu_kernels, "paged_attention", lambda *args: None)  # the kernel declines
    real_sdpa, calls = self_attention.sdpa, []

    def counted(*args, **kw):
        calls.append(sorted(kw))
        return real_sdpa(*args, **kw)

    monkeypatch.setattr(self_attention, "sdpa", counted)
    real_capped = self_attention.capped_attention

    def capped(*args, **kw):  # a soft-capped model's form: SDPA cannot cap the scores
        calls.append(["softcap"])
        return real_capped(*args, **kw)

    monkeypatch.setattr(self_attention, "capped_attention", capped)
    pre, _ = run_prefill_decode(ours, PROMPTS, [[1]] * len(PROMPTS))
    prompt = PROMPTS[0]
    with torch.no_grad():
        full = hf(torch.tensor([prompt])).logits[0]
        for i, p in enumerate(PROMPTS):
            assert rel_err(pre[i], hf(torch.tensor([p])).logits[0]) < 1e-4
    a = ours.args
    kv = KVCache(4, 4, a.num_kv_heads, a.head_dim, torch.float32, ours.layer_devices())
    table = [3, 1, 2]
    ours.prepare_lora(None)
    for start, end in ((0, 4), (4, len(prompt))):
        fb = ForwardBatch.build([prompt[start:end]], [start], [table], 4, "cpu", is_decode=False)
        logits = ours(fb, kv.layers, all_logits=True)
    assert rel_err(logits, full[4:]) < 1e-4
    if ours.args.attn_softcap:
        assert calls and all(c == ["softcap"] for c in calls)
    else:
        assert ["is_causal"] in calls and ["attn_mask"] in calls  # both forms ran


def test_packed_weights_give_the_same_logits(pair):
    """pack_weights (oneDNN's layout for the head and every projection) changes no number beyond
    float32 rounding, at batch sizes other than the hint too; unpack_weights goes back."""
    _, ours = pair
    g = torch.Generator().manual_seed(2)
    h = torch.randn(6, ours.args.hidden_size, generator=g)
    want_head = ours.head(h)  # (the unpacked head; with its soft cap where the model caps logits)
    want_pre, want_dec = run_prefill_decode(ours, PROMPTS, [[5, 9, 1]] * len(PROMPTS))
    packs = [m for m in ours.modules() if isinstance(m, (LoraLinear, Experts))]
    n_weights = sum(2 if isinstance(m, Experts) else 1 for m in packs)  # (a mixture's experts: two stacks)
    assert ours.pack_weights(batch_hint=4) == 1 + n_weights  # CPU, float32: every GEMM weight
    try:
        assert all(m.packed is not None for m in packs)
        assert rel_err(ours.head(h), want_head) < 1e-5
        assert rel_err(ours.head(h[:1]), want_head[:1]) < 1e-5
        pre, dec = run_prefill_decode(ours, PROMPTS, [[5, 9, 1]] * len(PROMPTS))
        for a, b in zip(pre + dec, want_pre + want_dec):
            assert rel_err(a, b) < 1e-5
    finally:
        ours.unpack_weights()
    assert ours._packed_head is None and all(m.packed is None for m in packs)
    assert ours.pack_weights(batch_hint=4, memory_share=1e-12) == 0  # copies that would not fit: none made
    assert ours._packed_head is None
    # packing again after the weights change drops the old copies, even when it packs nothing now
    assert ours.pack_weights(batch_hint=4) > 0
    assert ours.pack_weights(batch_hint=4, memory_share=1e-12) == 0 and ours._packed_head is None
    assert all(m.packed is None for m in ours.modules() if isinstance(m, LoraLinear))


def greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    from caraserve.kv_cache import KVCache
    from caraserve.model.batch import ForwardBatch

    a = model.args
    kv = KVCache(16, 8, a.num_kv_heads, a.head_dim, torch.float32, model.layer_devices())
    table = list(range(16, 0, -1))  # blocks in descending order
    out, seq, is_decode = [], list(prompt), False
    feed = list(prompt)
    for _ in range(new_tokens):
        fb = ForwardBatch.build([feed], [len(seq) - len(feed)], [table], 8, "cpu", is_decode=is_decode)
        tok = int(model(fb, kv.layers)[0].argmax())
        out.append(tok)
        seq.append(tok)
        feed, is_decode = [tok], True
    return out


def test_greedy_generation_matches_transformers_generate(pair):
    hf, ours = pair
    prompt = PROMPTS[0]
    # up to EOS, where transformers stops (min_new_tokens would forbid EOS instead, where ours may pick it)
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                      pad_token_id=0)[0, len(prompt):].tolist()
    assert len(ref) == 12 or ref[-1] in (hf.generation_config.eos_token_id, hf.config.eos_token_id)
    assert greedy(ours, prompt, 12)[: len(ref)] == ref


def test_sharded_checkpoint_loads(tmp_path):
    hf = save_random_hf_model(tmp_path / "src", "llama")
    hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    ours = load_model(tmp_path / "sharded", "float32")
    pre, _ = run_prefill_decode(ours, PROMPTS[:1], [[1]])
    with torch.no_grad():
        ref = hf(torch.tensor(PROMPTS[:1])).logits[0]
    assert rel_err(pre[0], ref) < 1e-4


@pytest.mark.parametrize("arch, f32_weight, f32_rope, f32_tables", [
    ("llama", False, False, False), ("olmo2", True, True, True), ("helium", True, False, False),
    ("cohere", False, True, False), ("ernie4_5", False, True, True)])
def test_bfloat16_norms_and_rope_round_as_the_family_does(tmp_path, monkeypatch, arch, f32_weight, f32_rope,
                                                          f32_tables):
    """In bfloat16, the forms tests/test_layer_ops.py checks bit for bit against each family's
    transformers norm and rope reach the model's layers: the norms' weights applied in float32
    (OLMo 2, Helium), rope's arithmetic in float32 (OLMo 2, Cohere, ERNIE 4.5) over float32
    tables (OLMo 2, ERNIE 4.5)."""
    from caraserve.model import self_attention
    from caraserve.model.layers import RMSNorm

    save_random_hf_model(tmp_path, arch)
    ours = load_model(tmp_path, "bfloat16")
    norms = [m for m in ours.modules() if isinstance(m, RMSNorm)]
    assert all(m.float32_weight == f32_weight for m in norms) and bool(norms) == (arch != "cohere")  # (LayerNorms)
    calls, real = [], self_attention.rotary_write_kv

    def recorded(q, k, v, cos, sin, *rest):
        calls.append((cos.dtype, rest[-1]))
        return real(q, k, v, cos, sin, *rest)

    monkeypatch.setattr(self_attention, "rotary_write_kv", recorded)
    run_prefill_decode(ours, PROMPTS[:2], [[1]] * 2)
    table = torch.float32 if f32_tables else torch.bfloat16
    assert calls and set(calls) == {(table, f32_rope)}


@pytest.mark.parametrize("case", ["phi-qk-norm", "stablelm-parallel", "nemotron", "arcee", "olmo", "olmo-tied",
                                  "starcoder2"])
def test_bfloat16_logits_equal_transformers_bit_for_bit(tmp_path, case):
    """In bfloat16 the LayerNorm families and the MLPs without a gate round as transformers does,
    against a transformers model loaded in bfloat16 (its rope tables as it keeps them: OLMo's in
    float32, turned in float32)."""
    from transformers import AutoModelForCausalLM

    arch, overrides = CONFIGS[case]
    save_random_hf_model(tmp_path, arch, **overrides)
    ours = load_model(tmp_path, "bfloat16")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    pre, _ = run_prefill_decode(ours, PROMPTS[:1], [[]])
    with torch.no_grad():
        ref = hf(torch.tensor(PROMPTS[:1])).logits[0, -1]
    assert torch.equal(pre[0][-1] if pre[0].dim() == 2 else pre[0], ref)


def test_bfloat16_loads_and_runs(tmp_path):
    hf = save_random_hf_model(tmp_path, "llama")
    ours = load_model(tmp_path, "bfloat16")
    assert ours.model.embed_tokens.weight.dtype == torch.bfloat16
    pre, dec = run_prefill_decode(ours, PROMPTS, [[1, 2]] * len(PROMPTS))
    assert pre[0].dtype == torch.bfloat16 and torch.isfinite(dec[-1].float()).all()
    with torch.no_grad():
        ref = hf(torch.tensor([PROMPTS[0]])).logits[0]
    assert rel_err(pre[0].float(), ref) < 0.05  # bf16 rounding, same function
    assert ours.pack_weights(4) == 0 and ours._packed_head is None  # packing is float32-only


def test_dtype_auto_follows_config(tmp_path):
    save_random_hf_model(tmp_path, "llama")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["dtype"] = "float16"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_model(tmp_path, "auto").lm_head.weight.dtype == torch.float16


def test_unsupported_architecture_is_refused(tmp_path):
    save_random_hf_model(tmp_path, "llama")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        load_model(tmp_path)


@pytest.mark.parametrize("arch, option, reason", [
    ("llama", {"hidden_act": "gelu"}, r"hidden_act='gelu' is not supported"),
    ("mistral", {"hidden_act": "relu"}, r"hidden_act='relu' is not supported"),
    ("qwen2", {"hidden_act": "gelu_pytorch_tanh"}, r"hidden_act='gelu_pytorch_tanh' is not supported"),
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}},
     r"rope type 'dynamic' is not supported for llama \(supported: default, linear, llama3, yarn; longrope "
     r"for Phi-3\)"),
    # HunYuan's dynamic rope without a fixed alpha changes with the length: refused as Llama's
    ("hunyuan", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}},
     r"rope type 'dynamic' is not supported for hunyuan"),
    ("starcoder2", {"hidden_act": "gelu"}, r"hidden_act='gelu' is not supported: the MLP computes GELU's tanh form"),
    ("phi", {"hidden_act": "relu"}, r"hidden_act='relu' is not supported for phi; supported: relu2, gelu_new, "
     r"gelu_pytorch_tanh, gelu, silu"),
    ("nemotron", {"hidden_act": "gelu_fast"}, r"hidden_act='gelu_fast' is not supported for nemotron"),
    ("llava-mm", {"text_config": {"model_type": "gemma", "vocab_size": 128}},
     r"LlavaForConditionalGeneration with a 'gemma' language model is not supported; supported: llama, mistral, qwen2"),
    # Ministral 3 / Devstral Small 2 (a ministral3 language model: queries scaled by position)
    ("mistral3-mm", {"text_config": {"model_type": "ministral3", "vocab_size": 128}},
     r"Mistral3ForConditionalGeneration with a 'ministral3' language model is not supported; supported: mistral"),
])
def test_options_that_change_a_layer_are_refused(tmp_path, arch, option, reason):
    """An option the layers would not honour is a one-line configuration error, never a model
    that runs and gives other tokens than transformers."""
    save_random_hf_model(tmp_path, arch)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | option))
    with pytest.raises(UnsupportedModelError, match=reason):
        load_model(tmp_path)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "glm4", "phi3"])
def test_fused_projections_hold_the_checkpoint_tensors(tmp_path, arch):
    """q/k/v and gate/up load into one projection each (one GEMM); `checkpoint_tensors` gives
    back every checkpoint tensor, bit for bit, under its own name (qwen2, glm4: q/k/v biases too;
    glm4: gate/up fused in the checkpoint, four norms a layer; phi3: q/k/v and gate/up fused), and
    no checkpoint tensor is left unused."""
    from caraserve.model.llama import checkpoint_tensors

    save_random_hf_model(tmp_path, arch)
    model = load_model(tmp_path)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert [n for n, *_ in attn.qkv_proj.parts] == ["q_proj", "k_proj", "v_proj"]
    assert [n for n, *_ in mlp.gate_up_proj.parts] == ["gate_proj", "up_proj"]
    assert (attn.qkv_proj.bias is not None) == (arch in ("qwen2", "glm4"))
    ours, theirs = checkpoint_tensors(model), load_file(str(tmp_path / "model.safetensors"))
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_missing_tensor_names_tensor(tmp_path):
    save_random_hf_model(tmp_path, "llama")
    f = tmp_path / "model.safetensors"
    tensors = load_file(str(f))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(f))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(tmp_path)


def test_shape_mismatch_names_tensor_and_file(tmp_path):
    save_random_hf_model(tmp_path, "llama")
    f = tmp_path / "model.safetensors"
    tensors = load_file(str(f))
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 64)
    save_file(tensors, str(f))
    with pytest.raises(ModelLoadError, match=r"k_proj\.weight.*model\.safetensors.*\(3, 64\)"):
        load_model(tmp_path)


def test_a_hub_id_is_told_to_be_fetched_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match=r"Qwen/Qwen2-0.5B does not exist \(a hub id\? .*huggingface-cli download"):
        load_model("Qwen/Qwen2-0.5B")


def test_unreadable_weights_and_missing_config(tmp_path):
    save_random_hf_model(tmp_path, "llama")
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_model(tmp_path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nothing-here")
    (tmp_path / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(tmp_path)


def test_placement_splits_layers_within_budget(tmp_path):
    from caraserve.model.llama import CausalLM, ModelArgs
    from caraserve.model.loader import load_hf_config

    save_random_hf_model(tmp_path, "llama", num_hidden_layers=4)
    cfg = load_hf_config(tmp_path)
    with torch.device("meta"):
        model = CausalLM(ModelArgs.from_hf(cfg), cfg)
    layer_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    embed_bytes = model.model.embed_tokens.weight.numel() * 4
    budget = {0: embed_bytes + 2 * layer_bytes + 1024, 1: 10**9}
    placement = plan_placement(model, torch.float32, "cpu", budget)
    on = {name: dev for name, dev in placement.items() if name.startswith("model.layers.")}
    assert set(on.values()) == {"cuda:0", "cuda:1"}
    assert on["model.layers.0"] == "cuda:0" and on["model.layers.3"] == "cuda:1"


def test_placement_is_honoured_on_cpu(tmp_path):
    hf = save_random_hf_model(tmp_path, "llama")
    ours = load_model(tmp_path, "float32", "cpu", max_memory_bytes={"cpu": 10**9})
    assert all(d.type == "cpu" for d in ours.layer_devices())
    pre, _ = run_prefill_decode(ours, PROMPTS[:1], [[1]])
    with torch.no_grad():
        assert rel_err(pre[0], hf(torch.tensor(PROMPTS[:1])).logits[0]) < 1e-4


def test_a_failed_triton_prefill_check_switches_that_model_only(tmp_path):
    """Where the Triton prefill kernel cannot run on a model's device, that model's layers take
    SDPA from then on; another model in the process keeps the kernel."""
    from transformers import AutoConfig

    from caraserve.model.llama import CausalLM, ModelArgs, check_triton_prefill

    save_random_hf_model(tmp_path, "llama")
    cfg = AutoConfig.from_pretrained(tmp_path)
    failing, other = CausalLM(ModelArgs.from_hf(cfg), cfg), CausalLM(ModelArgs.from_hf(cfg), cfg)
    assert check_triton_prefill(failing, 16, torch.float32)  # CPU layers: nothing to check
    failing.layer_devices = lambda: [torch.device("cuda", 99)]  # no such device: the kernel cannot run
    assert not check_triton_prefill(failing, 16, torch.float32)
    assert not any(layer.self_attn.triton_prefill for layer in failing.model.layers)
    assert all(layer.self_attn.triton_prefill for layer in other.model.layers)
