"""adapters.preload with an adapter whose weights turn out broken: skipped (its requests are
refused naming it), as at first use, where it stopped the whole start-up."""

from __future__ import annotations

import shutil

import pytest
from safetensors.torch import load_file, save_file

from caraserve.config import AdapterConfig, EngineConfig
from caraserve.engine import Engine
from caraserve.model.tiny import tiny_paths
from caraserve.request import RequestError, SamplingParams


@pytest.mark.parametrize("preload", ["host", "all"])
def test_preload_skips_an_adapter_with_nan_weights(tmp_path, preload):
    _, demo = tiny_paths()
    shutil.copytree(demo, tmp_path / "adapters")
    st = tmp_path / "adapters" / "demo-r16" / "adapter_model.safetensors"
    tensors = load_file(str(st))
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(st))
    engine = Engine(EngineConfig(compile="false", max_batch_size=2, max_seq_len=64,
                                 adapters=AdapterConfig(dir=str(tmp_path / "adapters"), preload=preload)))
    assert engine.adapter_state("demo-r8") == ("resident" if preload == "all" else "host")
    sp = SamplingParams(max_tokens=3, temperature=0)
    (good,) = engine.generate([[5, 6]], sp, ["demo-r8"])
    assert len(good.output_ids) == 3 and good.error is None
    with pytest.raises(RequestError, match="'demo-r16'.*NaN"):
        engine.generate([[5, 6]], sp, ["demo-r16"])
