"""adapters.preload with an adapter whose weights turn out broken: skipped (its requests are
refused naming it), as at first use, where it stopped the whole start-up."""

from __future__ import annotations

import shutil

import httpx
import pytest
from helpers import edit_config
from safetensors.torch import load_file, save_file
from test_server_hardening import in_process_server

from caraserve.config import AdapterConfig, EngineConfig, ServerConfig
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


def test_an_adapter_refused_at_start_is_named_with_its_reason(tmp_path):
    """A request for an adapter its folder's refusal kept out gets the 404 of an unknown model,
    saying why (the reason was only in the log); once the name serves, the old reason is gone."""
    _, demo = tiny_paths()
    shutil.copytree(demo, tmp_path / "adapters")
    edit_config(tmp_path / "adapters" / "demo-r16", use_dora=True)
    engine = Engine(EngineConfig(compile="false", max_batch_size=2, max_seq_len=64,
                                 adapters=AdapterConfig(dir=str(tmp_path / "adapters"))))
    body = {"model": "demo-r16", "prompt": [5, 6], "max_tokens": 2}
    with in_process_server(engine, ServerConfig()) as (base, _):
        r = httpx.post(base + "/v1/completions", json=body, timeout=30)
        message = r.json()["error"]["message"]
        assert r.status_code == 404 and "refused at start: adapter 'demo-r16': use_dora=true (DoRA)" in message
        engine.register_adapter("demo-r16", str(tmp_path / "adapters" / "demo-r8"))
        assert "demo-r16" not in engine.catalog.errors
        assert httpx.post(base + "/v1/completions", json=body, timeout=30).status_code == 200
