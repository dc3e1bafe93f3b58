"""cpu_assist.mode=auto: the CPU path is taken when its LoRA work ends before the adapter's copy
would, priced at the copy rate the pool really has and on the prefill still to compute."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from caraserve.config import AdapterConfig, CpuAssistConfig, EngineConfig
from caraserve.cpu_assist import handoff as handoff_mod
from caraserve.cpu_assist.thread_plan import ThreadPlan
from caraserve.engine import Engine
from caraserve.lora.device_pool import AdapterState
from caraserve.request import SamplingParams


def test_auto_uses_the_cpu_only_when_the_plan_says_it_pays():
    plan = ThreadPlan(max_threads=1, gflops_per_thread=30.0)
    # 8 MB adapter at 16 GB/s: 0.5 ms of copy; 10 tokens x 1 MFLOP: 0.3 us of CPU -> assist
    assert plan.cpu_lora_seconds(10, 1e6) < plan.copy_seconds(8_000_000)
    # 4096 tokens x 100 MFLOP on one thread: 14 s -> wait for the copy instead
    assert plan.cpu_lora_seconds(4096, 1e8) > plan.copy_seconds(8_000_000)
    assert plan.threads_for(4096, 64) == 1 and ThreadPlan(max_threads=8).threads_for(1000, 64) == 4


def test_auto_prices_the_copy_at_the_rate_the_pool_copies():
    """"auto" compares the CPU work with the copy the pool will really make: at the emulated rate
    on a CPU-only machine, at the plan's measured one where the pool copies for real (CUDA ignores
    cpu_assist.emulate_copy_gbps, so pricing it there sent every cold start to the CPU)."""
    plan = ThreadPlan(max_threads=1, gflops_per_thread=30.0, copy_gbps=16.0)
    args = SimpleNamespace(num_layers=32, module_shape=lambda m: (4096, 4096))
    weights = SimpleNamespace(a={"q_proj": torch.empty(1, 64)}, rank=64, nbytes=64 << 20)  # 4 ms at 16 GB/s
    req = SimpleNamespace(prompt_ids=[0] * 512)  # 512 tokens: ~0.5 s of CPU LoRA on one thread
    ca = CpuAssistConfig(mode="auto", emulate_copy_gbps=0.1)
    _, pays = handoff_mod.handoff_for(ca, plan, args, emulate_copy_gbps=0.1)  # a CPU-only pool: ~0.7 s copies
    assert pays(req, weights, 512)
    assert not pays(req, weights, 1024)  # a recompute's prefill (prompt and outputs): ~1 s of CPU
    _, pays = handoff_mod.handoff_for(ca, plan, args, emulate_copy_gbps=0.0)  # a CUDA pool
    assert not pays(req, weights, 512)
    assert pays(req, weights, 1)  # a prompt all but one token of which is a cached prefix


def test_auto_prices_the_prefill_left_after_a_cached_prefix(monkeypatch):
    """The scheduler asks "auto" about the tokens a cold request still has to prefill, its cached
    prefix off: a second request of the adapter while the copy is still in flight reuses the
    first one's blocks, and only the rest would be CPU work."""
    seen = []
    real = handoff_mod.handoff_for

    def spy(*a, **k):
        handoff, pays = real(*a, **k)
        return handoff, lambda req, weights, tokens: seen.append((req.prefill_len, tokens)) or pays(req, weights,
                                                                                                       tokens)

    monkeypatch.setattr("caraserve.engine.handoff_for", spy)
    engine = Engine(EngineConfig(compile="false", max_batch_size=4, max_seq_len=256,
                                 adapters=AdapterConfig(preload="none"),
                                 cpu_assist=CpuAssistConfig(mode="auto", emulate_copy_gbps=0.0001)))  # copies of ~1 s
    prompt = list(range(10, 110))  # 100 tokens: 6 full blocks of 16
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    engine.generate([1, 2, 3], params)  # (builds the C kernels first: a second's build would outlast the copy)
    first = engine.request(engine.add_request(prompt, params, "demo-r8"))
    while first.num_computed < 100:  # its prefill (its blocks published), then it waits for the copy to decode
        engine.step()
    second = engine.request(engine.add_request(prompt + list(range(200, 220)), params, "demo-r8"))
    engine.step()
    assert engine.pool.state("demo-r8") is AdapterState.LOADING  # (both prefilled while it was copied)
    assert first.cpu_assisted and second.cpu_assisted and second.cached_tokens == 96
    assert seen == [(100, 100), (120, 24)]
    engine.close()
