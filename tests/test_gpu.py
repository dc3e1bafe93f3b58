"""CUDA paths: Triton kernels inside the engine, async adapter copies, CUDA-graph decode."""

from __future__ import annotations

import pytest
import torch
from helpers import save_peft_adapter, save_random_hf_model

from caraserve.config import AdapterConfig, EngineConfig, ModelConfig
from caraserve.engine import Engine
from caraserve.lora.device_pool import AdapterState
from caraserve.request import SamplingParams

pytestmark = pytest.mark.gpu
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    save_random_hf_model(root / "base", "llama", num_hidden_layers=2)
    save_peft_adapter(root / "base", root / "adapters" / "r8", seed=1, r=8, target_modules=["q_proj", "v_proj"])
    save_peft_adapter(root / "base", root / "adapters" / "r24", seed=2, r=24,
                      target_modules=["k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return root


def engine(root, device, compile_mode="false", **kw):
    return Engine(EngineConfig(model=ModelConfig(path=str(root / "base"), dtype="float32"),
                               adapters=AdapterConfig(dir=str(root / "adapters"), rank_buckets=(8, 16, 32)),
                               max_batch_size=4, max_seq_len=64, device=device, compile=compile_mode,
                               compile_cache_dir="", num_kv_blocks=16, **kw))


PROMPTS = [[5, 6, 7], [9, 10], [20, 21, 22, 23], [1]]
ADAPTERS = ["r8", None, "r24", "r8"]


def test_cuda_engine_matches_cpu_engine(small):
    want = [r.output_ids for r in engine(small, "cpu").generate(PROMPTS, GREEDY, ADAPTERS)]
    got = [r.output_ids for r in engine(small, "cuda").generate(PROMPTS, GREEDY, ADAPTERS)]
    assert got == want


def staggered(e) -> list[list[int]]:
    """Two requests start; two more arrive while they decode (their prompts ride in mixed steps
    beside the decode rows, the longer one in chunks of max_tokens_per_step)."""
    ids = [e.add_request(p, GREEDY, a) for p, a in zip(PROMPTS[:2], ADAPTERS[:2])]
    reqs = [e.request(i) for i in ids]
    for _ in range(3):
        e.step()
    long_prompt = [(7 * i) % 100 + 1 for i in range(40)]
    ids = [e.add_request(p, GREEDY, a) for p, a in ((long_prompt, ADAPTERS[2]), (PROMPTS[3], ADAPTERS[3]))]
    reqs += [e.request(i) for i in ids]
    while any(not r.finished for r in reqs):
        e.step()
    return [r.output_ids for r in reqs]


def test_cuda_mixed_steps_match_cpu_engine(small):
    """Prefill chunks beside decode rows: the Triton prefill kernel's one launch per layer (no
    fallback to SDPA) gives the CPU engine's tokens."""
    want = staggered(engine(small, "cpu", max_tokens_per_step=16))
    cuda = engine(small, "cuda", max_tokens_per_step=16)
    got = staggered(cuda)
    assert got == want
    assert all(layer.self_attn.triton_prefill for layer in cuda.model.model.layers), \
        "the Triton prefill kernel failed on this GPU and fell back to SDPA"


def test_cuda_graph_decode_matches_eager(small):
    want = [r.output_ids for r in engine(small, "cuda").generate(PROMPTS, GREEDY, ADAPTERS)]
    from torch._dynamo.utils import counters

    counters["inductor"]["cudagraph_skips"] = 0
    e = engine(small, "cuda", "true")
    assert e.graphs.cuda_graphs
    assert [r.output_ids for r in e.generate(PROMPTS, GREEDY, ADAPTERS)] == want
    assert e.graphs.compile_s > 0  # the steps above ran compiled
    assert counters["inductor"]["cudagraph_skips"] == 0  # and were recorded as CUDA graphs, not run plainly


def test_cuda_auto_compiles_at_first_use_and_graphs_match_eager(small):
    """engine.compile=auto (the default) on CUDA compiles each variant at its first use, as
    true does (a graphed step is ~10x an eager one), and replays CUDA graphs: same tokens."""
    want = [r.output_ids for r in engine(small, "cuda").generate(PROMPTS, GREEDY, ADAPTERS)]
    e = engine(small, "cuda", "auto")
    assert not e.graphs.deferred
    assert [r.output_ids for r in e.generate(PROMPTS, GREEDY, ADAPTERS)] == want
    assert e.graphs._fns and e.graphs.compile_s > 0


def test_captured_cuda_graphs_match_eager(small):
    """engine.cuda_graphs=capture: every bucket's graphs are captured at warm-up over the eager
    forward (nothing compiled), and replaying them gives the eager tokens, batch after batch as
    requests join and finish (the graphs read every step input from their buffers)."""
    later = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)

    def run(e):
        first = e.generate(PROMPTS, GREEDY, ADAPTERS)
        second = e.generate(PROMPTS[1:] + [[3, 4, 5, 6, 7]], later, ADAPTERS[::-1])
        return [r.output_ids for r in first + second]

    want = run(engine(small, "cuda"))
    e = engine(small, "cuda", "true", cuda_graphs="capture")
    e.warm_up()
    assert e.graphs.capture and len(e.graphs._fns) == 2 * len(e.graphs.batch_buckets)  # base and LoRA forms
    captured = dict(e.graphs._fns)
    assert run(e) == want
    assert e.graphs._fns == captured  # replays only: nothing captured or compiled at the steps


def test_adapter_copy_is_async_and_becomes_resident(small):
    e = engine(small, "cuda")
    assert e.pool.load(e.store.get("r24"))
    assert e.pool.state("r24") in (AdapterState.LOADING, AdapterState.RESIDENT)
    torch.cuda.synchronize()
    e.pool.poll()
    assert e.pool.state("r24") is AdapterState.RESIDENT
    assert e.store.get("r24").a["k_proj"].is_pinned()


def _assist_engine(small, mode: str, preload: str) -> Engine:
    from caraserve.config import CpuAssistConfig

    return Engine(EngineConfig(model=ModelConfig(path=str(small / "base"), dtype="float32"),
                               adapters=AdapterConfig(dir=str(small / "adapters"), rank_buckets=(8, 16, 32),
                                                      preload=preload),
                               cpu_assist=CpuAssistConfig(mode=mode, threads=2),
                               max_batch_size=4, max_seq_len=64, device="cuda", compile="false", num_kv_blocks=16))


def test_cpu_assisted_prefill_on_cuda_matches_resident(small):
    want = [r.output_ids for r in _assist_engine(small, "off", "all").generate(PROMPTS, GREEDY, ADAPTERS)]
    assisted = _assist_engine(small, "on", "none")
    reqs = assisted.generate(PROMPTS, GREEDY, ADAPTERS)
    assert [r.output_ids for r in reqs] == want


def test_cuda_copy_lands_in_layer_order_and_assisted_prefill_stays_exact(small):
    """Copy events per layer group on CUDA: with the copy stream held back, a prefill starts with no
    layer landed (CPU path), layers_ready only grows to all layers, and the tokens stay exact."""
    want = [r.output_ids for r in _assist_engine(small, "off", "all").generate(PROMPTS, GREEDY, ADAPTERS)]
    e = _assist_engine(small, "on", "none")
    pool = e.pool
    with torch.cuda.stream(pool._copy_stream):
        torch.cuda._sleep(int(1e9))  # ~0.5 s of spinning ahead of the adapter copies
    assert pool.load(e.store.get("r24"))
    assert pool.layers_ready("r24") == 0 and pool.state("r24") is AdapterState.LOADING
    reqs = e.generate(PROMPTS, GREEDY, ADAPTERS)
    assert [r.output_ids for r in reqs] == want
    assert reqs[2].cpu_assisted and reqs[2].assist_cpu_layers > 0
    with torch.cuda.stream(pool._copy_stream):
        torch.cuda._sleep(int(1e9))
    e.pool.evict("r8")
    assert pool.load(e.store.get("r8"))
    seen = []
    while not pool.poll():
        seen.append(pool.layers_ready("r8"))
    assert seen and seen[0] == 0 and seen == sorted(seen) and pool.layers_ready("r8") == pool.num_layers


def test_cuda_kv_cache_is_sized_from_the_memory_left(small):
    """No block count or byte budget: the KV cache takes gpu_memory_utilization of the device's
    memory less what is in use on it (vLLM's rule), and serves requests."""
    import gc

    e = Engine(EngineConfig(model=ModelConfig(path=str(small / "base"), dtype="float32"),
                            adapters=AdapterConfig(dir=str(small / "adapters"), rank_buckets=(8, 16, 32)),
                            max_batch_size=4, max_seq_len=64, device="cuda", compile="false",
                            gpu_memory_utilization=0.2))
    total = torch.cuda.mem_get_info()[1]
    try:
        assert e.kv.num_blocks > 64 and e.kv.bytes <= 0.2 * total
        assert e.generate([[5, 6, 7]], GREEDY)[0].output_ids
    finally:
        del e
        gc.collect()
        torch.cuda.empty_cache()


def test_structured_outputs_on_cuda_match_cpu():
    """xgrammar's mask of CUDA logits (its kernel) against the CPU form, greedy, with adapters."""
    pytest.importorskip("xgrammar")  # (not in every GPU image: carry its wheel)
    from caraserve.structured_output import StructuredOutputs

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False}
    specs = [StructuredOutputs(regex=r"[a-z]{3}-\d{2}"), StructuredOutputs(choice=("yes", "no", "maybe")),
             StructuredOutputs(json=schema, disable_any_whitespace=True)]
    params = [SamplingParams(max_tokens=24, temperature=0, structured_outputs=s) for s in specs]
    outs = {}
    for device in ("cpu", "cuda"):
        e = Engine(EngineConfig(device=device, compile="false", max_batch_size=4, max_seq_len=256,
                                adapters=AdapterConfig(dir="demo")))
        outs[device] = [r.output_ids for r in e.generate(["x = "] * 3, params, [None, "demo-r8", "demo-r16"])]
    assert outs["cuda"] == outs["cpu"]
