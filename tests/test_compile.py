"""The compiled decode step gives the tokens of the eager one, and its artifacts persist."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import save_peft_adapter, save_random_hf_model

from caraserve.compile_cache import elf_whole
from caraserve.config import AdapterConfig, EngineConfig, ModelConfig
from caraserve.engine import Engine
from caraserve.graphs import ANY_BATCH, HOST_RUNS, STEP_INPUTS, batch_buckets, bucket_up, stage_step_inputs
from caraserve.model.batch import ForwardBatch
from caraserve.request import SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    save_random_hf_model(root / "base", "llama", num_hidden_layers=2)
    save_peft_adapter(root / "base", root / "adapters" / "r8", seed=1, r=8,
                      target_modules=["q_proj", "v_proj", "down_proj"])
    save_peft_adapter(root / "base", root / "adapters" / "r20", seed=2, r=20, lora_alpha=10,
                      target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"])
    return root


def engine(root, compile_mode, cache_dir, preload="none", **kw):
    return Engine(EngineConfig(model=ModelConfig(path=str(root / "base")),
                               adapters=AdapterConfig(dir=str(root / "adapters"), rank_buckets=(8, 16, 32),
                                                      preload=preload),
                               max_batch_size=4, max_seq_len=64, compile=compile_mode,
                               compile_cache_dir=str(cache_dir), device="cpu", **kw))


def staged_reference(tokens, starts, tables, rows, width, bs):
    """The step inputs row by row, in plain Python (padding rows: position 0 of block 0)."""
    n = len(tokens)
    pad = rows - n
    return {"input_ids": [t[0] for t in tokens] + [0] * pad, "positions": list(starts) + [0] * pad,
            "slot_mapping": [t[p // bs] * bs + p % bs for t, p in zip(tables, starts)] + [0] * pad,
            "row_lens": [p + 1 for p in starts] + [1] * pad,
            "block_tables": [list(t) + [0] * (width - len(t)) for t in tables] + [[0] * width] * pad}


@pytest.mark.parametrize("n, rows", [(1, 2), (3, 4), (5, 5), (7, 8)])
def test_staged_step_inputs_equal_the_row_by_row_definition(n, rows):
    g = torch.Generator().manual_seed(n)
    bs, width = 4, 6
    lens = torch.randint(1, width + 1, (n,), generator=g).tolist()
    tables = [torch.randperm(40, generator=g)[:k].add(1).tolist() for k in lens]
    starts = [int(torch.randint(0, k * bs, (1,), generator=g)) for k in lens]
    tokens = [[int(t)] for t in torch.randint(0, 100, (n,), generator=g)]
    # arrays full of a previous, wider step's values: the fill must overwrite every entry
    out = {k: np.full((rows, width) if k == "block_tables" else rows, 99, dtype=np.int64) for k in STEP_INPUTS}
    stage_step_inputs(out, tokens, starts, tables, bs)
    want = staged_reference(tokens, starts, tables, rows, width, bs)
    assert {k: v.tolist() for k, v in out.items()} == want


def test_staged_step_inputs_refuse_a_table_wider_than_the_step_or_a_position_past_it():
    out = {k: np.zeros((2, 2) if k == "block_tables" else 2, dtype=np.int64) for k in STEP_INPUTS}
    with pytest.raises(ValueError, match="3 blocks exceeds the step's width 2"):
        stage_step_inputs(out, [[1], [2]], [0, 0], [[1], [1, 2, 3]], 4)
    with pytest.raises(ValueError, match="row 1: position 8 is past its 2 KV blocks of 4"):
        stage_step_inputs(out, [[1], [2]], [3, 8], [[1], [5, 6]], 4)


def test_bucket_helpers():
    assert batch_buckets(32) == (1, 2, 4, 8, 16, 32)
    assert batch_buckets(6) == (1, 2, 4, 6)
    assert bucket_up(3, batch_buckets(6)) == 4 and bucket_up(5, batch_buckets(6)) == 6
    with pytest.raises(ValueError):
        bucket_up(7, batch_buckets(6))


@pytest.mark.slow
def test_compiled_decode_equals_eager_and_persists(small, tmp_path):
    prompts = [[5, 6, 7], [9, 10], [20, 21, 22, 23], [1]]
    adapters = ["r8", None, "r20", "r8"]
    eager = engine(small, "false", tmp_path / "unused")
    want = [r.output_ids for r in eager.generate(prompts, GREEDY, adapters)]
    want_base = [r.output_ids for r in eager.generate(prompts[:3], GREEDY, [None] * 3)]
    assert eager.graphs is None

    compiled = engine(small, "true", tmp_path / "cache")
    assert not compiled.graphs._fns
    compiled.warm_up()  # what the server's engine thread and an offline job do before serving
    assert set(compiled.graphs._fns) == {(ANY_BATCH, HOST_RUNS)} and compiled.graphs.compile_s > 0
    compile_s = compiled.graphs.compile_s
    got = [r.output_ids for r in compiled.generate(prompts, GREEDY, adapters)]
    got_base = [r.output_ids for r in compiled.generate(prompts[:3], GREEDY, [None] * 3)]
    assert got == want and got_base == want_base
    assert compiled.graphs.compile_s == compile_s  # the steps ran that variant, no compile among them
    # (batch bucket, LoRA form): on CPU one variant for every batch size, whose LoRA runs go
    # through one op per module; the same variant serves base-only steps
    assert set(compiled.graphs._fns) == {(ANY_BATCH, HOST_RUNS)}
    files = list((tmp_path / "cache").glob("decode-*.bin"))
    assert len(files) == 1 and files[0].stat().st_size > 0

    # A sequence whose KV blocks are scattered and descending: the compiled step reads the same
    # keys through the block table as the eager one
    bs = compiled.kv.block_size
    tokens, starts, tables = [[5]], [bs + 3], [[7, 2]]
    logits = compiled.graphs(tokens, starts, tables, None)
    fb = ForwardBatch.build(tokens, starts, tables, bs, compiled.device, True, None)
    assert logits is not None and torch.allclose(logits, compiled.model(fb, compiled.kv.layers), atol=1e-5)

    restarted = engine(small, "true", tmp_path / "cache")
    assert [r.output_ids for r in restarted.generate(prompts, GREEDY, adapters)] == want

    # A compiled kernel cut short in the cache (a process killed while linking it) made the next
    # process fault (SIGBUS) as it loaded it: it is removed, built again, and the tokens hold.
    # Every kernel is cut: which of them the next process loads (and so builds again) depends on
    # the machine's compiler and the artifacts it finds
    kernels = sorted((tmp_path / "cache" / "inductor").glob("*/*.so"))
    for kernel in kernels:
        cut = kernel.with_suffix(".cut")  # a new file: this process still maps the old one
        cut.write_bytes(kernel.read_bytes()[:1000])
        cut.replace(kernel)
    script = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
              "from pathlib import Path\nfrom test_compile import GREEDY, engine\n"
              f"e = engine(Path({str(small)!r}), 'true', Path({str(tmp_path / 'cache')!r}))\n"
              f"print(json.dumps([r.output_ids for r in e.generate({prompts!r}, GREEDY, {adapters!r})]))")
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == want
    assert f"removed {len(kernels)} damaged compiled kernel(s)" in run.stderr
    # (the kernels it loaded are whole again; none left cut short)
    assert all(elf_whole(k) for k in (tmp_path / "cache" / "inductor").glob("*/*.so"))


def test_compiled_steps_with_preemption_give_the_eager_tokens(small, tmp_path):
    """A KV cache of 4 blocks of 4 tokens for 4 requests of 7-10 tokens: requests are preempted
    and recompute, in compiled decode steps as in eager ones, and every token stays the same.
    The adapters are resident from the start: with copies in flight, when requests are admitted
    (and so whether blocks run out) would depend on the copy thread's timing."""
    prompts = [[5, 6, 7], [9, 10], [20, 21, 22, 23], [1]]
    adapters = ["r8", None, "r20", "r8"]
    want = [r.output_ids for r in engine(small, "false", tmp_path / "unused").generate(prompts, GREEDY, adapters)]
    for mode in ("false", "true"):
        tight = engine(small, mode, tmp_path / "cache", preload="all", kv_block_size=4, num_kv_blocks=4)
        assert [r.output_ids for r in tight.generate(prompts, GREEDY, adapters)] == want
        assert tight.scheduler.num_preemptions > 0 and tight.kv.free_blocks == 4


def test_compiled_steps_after_prefix_hits_give_the_cold_eager_tokens(small, tmp_path):
    """Requests that start from another's cached prompt blocks decode in compiled steps to the
    tokens of a cold eager run (no prefix cache)."""
    shared = list(range(30, 70))  # 40 tokens: two full blocks of 16 are cached and shared
    prompts = [shared + [5], shared + [6, 7], shared + [5]]
    adapters = ["r20", "r20", None]
    cold = engine(small, "false", tmp_path / "unused", prefix_caching=False)
    want = [cold.generate([p], GREEDY, [a])[0].output_ids for p, a in zip(prompts, adapters)]
    warm = engine(small, "true", tmp_path / "cache")
    got = [warm.generate([p], GREEDY, [a])[0] for p, a in zip(prompts, adapters)]
    assert [r.output_ids for r in got] == want
    assert [r.cached_tokens for r in got] == [0, 32, 0]  # the base request never takes the adapter's blocks
    assert warm.graphs._fns  # the decode steps ran compiled


def test_cpu_with_several_threads_compiles_lora_steps(small, tmp_path):
    """With several intra-op threads LoRA steps compile too (their runs go to the C kernel), and
    `auto` compiles as well (in the thread that steps, when idle)."""
    prompts, adapters = [[5, 6, 7], [9, 10]], ["r8", "r20"]
    want = [r.output_ids for r in engine(small, "false", tmp_path / "unused").generate(prompts, GREEDY, adapters)]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        compiled = engine(small, "true", tmp_path / "cache")
        assert [r.output_ids for r in compiled.generate(prompts, GREEDY, adapters)] == want
        assert (ANY_BATCH, HOST_RUNS) in compiled.graphs._fns
        auto = engine(small, "auto", tmp_path / "cache")
        assert [r.output_ids for r in auto.generate(prompts, GREEDY, adapters)] == want
        assert auto.idle() and (ANY_BATCH, HOST_RUNS) in auto.graphs._fns
        assert [r.output_ids for r in auto.generate(prompts, GREEDY, adapters)] == want
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_compiled_bgmv_form_equals_eager(small, tmp_path):
    """The GPU form of the compiled LoRA step (BGMV over the rank buckets), run here on CPU."""
    prompts = [[5, 6, 7], [9, 10], [20, 21, 22, 23]]
    adapters = ["r8", "r20", None]
    want = [r.output_ids for r in engine(small, "false", tmp_path / "unused").generate(prompts, GREEDY, adapters)]
    bgmv = engine(small, "auto", tmp_path / "cache")  # nothing compiled yet on CPU
    bgmv.graphs.host_runs, bgmv.graphs.deferred = False, False  # the GPU form, compiled at first use
    assert [r.output_ids for r in bgmv.generate(prompts, GREEDY, adapters)] == want
    assert (ANY_BATCH, len(bgmv.pool.buckets)) in bgmv.graphs._fns
    assert not any(nb == HOST_RUNS for _, nb in bgmv.graphs._fns)


def test_auto_serves_eagerly_and_compiles_when_idle(small, tmp_path):
    """engine.compile=auto on CPU: steps whose variant is not compiled run eagerly (a job that
    never idles never waits for a compile); Engine.idle compiles the variant the most steps
    wanted, one per call, and later steps run it. The tokens never change."""
    prompts = [[5, 6, 7], [9, 10, 11]]
    want = [r.output_ids for r in engine(small, "false", tmp_path / "unused").generate(prompts, GREEDY)]
    auto = engine(small, "auto", tmp_path / "cache")
    first = [r.output_ids for r in auto.generate(prompts, GREEDY)]
    assert first == want and auto.graphs._fns == {}
    assert auto.graphs.pending == {(ANY_BATCH, HOST_RUNS): GREEDY.max_tokens - 1}
    rid = auto.add_request([1, 2], GREEDY)
    assert not auto.idle()  # not idle: a request is in flight
    auto.abort(rid)
    assert auto.idle() and (ANY_BATCH, HOST_RUNS) in auto.graphs._fns and auto.graphs.pending == {}
    assert not auto.idle()  # nothing left to compile
    compile_s = auto.graphs.compile_s
    again = [r.output_ids for r in auto.generate(prompts, GREEDY)]
    assert again == want and auto.graphs.compile_s == compile_s  # ran the compiled variant, no new compile


def test_the_server_warms_up_on_its_engine_thread_before_it_reports_ready(small, tmp_path, monkeypatch):
    """compile=true: the AsyncEngine's thread compiles before it serves (the thread that runs
    the steps), /health's readiness and wait_ready (a Ray replica's constructor) wait for it,
    and requests queued meanwhile are served."""
    import asyncio
    import threading

    from caraserve.serve.async_engine import AsyncEngine

    e = engine(small, "true", tmp_path / "cache")
    threads, release = [], threading.Event()
    real = e.graphs.compile_pending

    def compile_pending():
        threads.append(threading.current_thread().name)
        release.wait(10)
        return real()

    monkeypatch.setattr(e.graphs, "compile_pending", compile_pending)
    service = AsyncEngine(e, 8)
    service.start()

    async def scenario():
        while not threads:
            await asyncio.sleep(0.01)
        assert threads == ["caraserve-engine"] and service.healthy and not service.ready
        assert not service.wait_ready(0.05)  # what a Ray replica's constructor waits on
        task = asyncio.ensure_future(service.submit([5, 6, 7], GREEDY, "r8", "q"))
        await asyncio.sleep(0.2)
        assert not task.done()  # queued while the engine thread compiles
        release.set()
        queue = await task
        while not (out := await queue.get()).finished:
            pass
        assert service.wait_ready(1)
        return out

    try:
        out = asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        release.set()
        service.stop()
    assert out.error is None and len(out.output_ids) == GREEDY.max_tokens
    assert service._warm.is_set() and set(e.graphs._fns) == {(ANY_BATCH, HOST_RUNS)}


def test_captured_cuda_graphs_leave_a_cpu_engine_as_it_was(small, tmp_path):
    """engine.cuda_graphs=capture is how a CUDA step is graphed: a CPU engine still defers its
    one compiled variant to an idle moment (auto), with nothing to capture at warm-up."""
    e = engine(small, "auto", tmp_path, cuda_graphs="capture")
    assert not e.graphs.capture and e.graphs.deferred
    e.warm_up()
    assert not e.graphs._fns


def test_an_unwritable_compile_cache_is_left_out_and_an_unused_one_never_made(tmp_path, caplog):
    """engine.compile_cache_dir that cannot be written: compiling goes on without saving into it
    (one warning, not a compile failure and its traceback); one not written yet is not made
    until something is cached, so a job that compiles nothing leaves no folder behind."""
    cfg = dict(compile="true", adapters=AdapterConfig(dir="none"), max_batch_size=2, max_seq_len=64)
    blocked = tmp_path / "file"
    blocked.write_text("")
    engine = Engine(EngineConfig(**cfg, compile_cache_dir=str(blocked / "cache")))
    assert not engine.graphs.cache.writable and "cannot be written" in caplog.text
    engine = Engine(EngineConfig(**cfg, compile_cache_dir=str(tmp_path / "new" / "cache")))
    assert engine.graphs.cache.writable and not (tmp_path / "new").exists()
