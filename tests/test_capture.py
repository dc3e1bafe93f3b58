"""engine.cuda_graphs=capture, run on CPU: the bucket keys, padding, buffers, warm-up captures and
eager fallback of captured decode graphs, with the CUDA graph itself emulated (a replay runs the
recorded step again over the same buffers into the same output tensor, which is what a graph
replay does for a step that reads every input from its buffers). The LoRA rows take the GPU row
form (multi-bucket BGMV through the Triton interpreter). The CUDA calls themselves
(`GraphCapture.record`) run in tests/test_gpu.py on a GPU."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import save_peft_adapter, save_random_hf_model

if torch.cuda.is_available():
    pytest.skip("emulates on CPU what tests/test_gpu.py runs on the GPU", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"  # read when `@triton.jit` decorates: before the kernels are imported
pytest.importorskip("triton")

from caraserve.config import AdapterConfig, EngineConfig, ModelConfig  # noqa: E402
from caraserve.engine import Engine  # noqa: E402
from caraserve.lora.triton_backend import TritonLoraBackend  # noqa: E402
from caraserve.request import SamplingParams  # noqa: E402

GREEDY = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
PROMPTS, ADAPTERS = [[5, 6, 7], [9, 10], [20, 21, 22, 23]], ["r8", "r20", None]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("capture")
    save_random_hf_model(root / "base", "llama", num_hidden_layers=2)
    save_peft_adapter(root / "base", root / "adapters" / "r8", seed=1, r=8, target_modules=["q_proj", "v_proj"])
    save_peft_adapter(root / "base", root / "adapters" / "r20", seed=2, r=20, lora_alpha=10,
                      target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"])
    return root


def engine(root, compile_mode: str) -> Engine:
    return Engine(EngineConfig(model=ModelConfig(path=str(root / "base")),
                               adapters=AdapterConfig(dir=str(root / "adapters"), rank_buckets=(8, 16, 32)),
                               max_batch_size=4, max_seq_len=64, compile=compile_mode, compile_cache_dir="",
                               device="cpu", cuda_graphs="capture"))


def captured_engine(root, record):
    """A CPU engine whose decode graphs act as on CUDA with capture: bucket keys and padding,
    the GPU LoRA form, graphs made by `record(fn) -> (replay, out)`."""
    e = engine(root, "auto")
    g = e.graphs
    g.cuda_graphs, g.capture, g.deferred, g.host_runs = True, True, False, False
    e.model.use_lora(e.pool, lambda device, pool: TritonLoraBackend(pool))
    g.capturer.record = record
    return e


def emulated(records: list):
    def record(fn):
        out = fn()
        records.append(fn)
        return (lambda: out.copy_(fn())), out
    return record


def run(e):
    first = e.generate(PROMPTS, GREEDY, ADAPTERS)
    second = e.generate([[3, 4], [8, 9, 10, 11, 12]], GREEDY, [None, "r8"])
    return [r.output_ids for r in first + second]


def test_warm_up_captures_every_bucket_and_steps_replay_them(models):
    want = run(engine(models, "false"))
    records = []
    e = captured_engine(models, emulated(records))
    e.warm_up()
    g = e.graphs
    assert sorted(g._fns) == sorted((b, nb) for b in g.batch_buckets for nb in (0, len(e.pool.buckets)))
    assert len(records) == len(g._fns)
    assert run(e) == want  # replays over refilled buffers: the eager tokens, batch after batch
    assert len(records) == len(g._fns)  # nothing captured at the steps


def test_a_variant_captured_at_its_first_step_without_warm_up(models):
    want = run(engine(models, "false"))
    records = []
    e = captured_engine(models, emulated(records))
    assert run(e) == want
    assert records and len(records) == len(e.graphs._fns)


def test_a_failed_capture_leaves_its_steps_eager(models):
    want = run(engine(models, "false"))

    def broken(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    e = captured_engine(models, broken)
    e.warm_up()
    g = e.graphs
    assert not g._fns and len(g.failed) == 2 * len(g.batch_buckets)
    assert run(e) == want
