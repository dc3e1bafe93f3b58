"""A batch mixing many adapters (and base requests) equals transformers + peft per request."""

from __future__ import annotations

import pytest
import torch
from helpers import peft_logits, run_prefill_decode, save_peft_adapter, save_random_hf_model

from caraserve.lora.device_pool import DevicePool
from caraserve.lora.host_store import HostStore
from caraserve.model.loader import load_model

ADAPTERS = {
    "a-r8-qv": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "b-r4-all": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                         "gate_proj", "up_proj", "down_proj"]),
    "c-r32-mlp-rslora": dict(r=32, lora_alpha=8, use_rslora=True, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "d-r5-odd": dict(r=5, lora_alpha=7, target_modules=["k_proj", "o_proj"]),
    "e-patterns": dict(r=16, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                       rank_pattern={"down_proj": 4}, alpha_pattern={"v_proj": 64}),
    "f-layer1-only": dict(r=12, lora_alpha=24, target_modules=["q_proj", "up_proj"], layers_to_transform=[1]),
    "g-layer-ranks": dict(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"],  # ranks differ by layer
                          rank_pattern={"layers.1.self_attn.q_proj": 4, "layers.0.mlp.down_proj": 16}),
    "h-alpha0": dict(r=8, lora_alpha=0, target_modules=["q_proj", "v_proj"],
                     alpha_pattern={"layers.1.self_attn.v_proj": 256}),
}
PROMPTS = {  # request -> (adapter or None, prompt)
    0: ("a-r8-qv", [5, 9, 3, 17, 22, 7]),
    1: (None, [11, 2, 60, 61]),
    2: ("b-r4-all", [3]),
    3: ("c-r32-mlp-rslora", [40, 41, 42, 43, 44, 45, 46, 47]),
    4: ("a-r8-qv", [99, 98]),
    5: ("d-r5-odd", [1, 2, 3, 4, 5]),
    6: ("e-patterns", [70, 71, 72]),
    7: ("f-layer1-only", [8, 8, 8, 8]),
    8: (None, [120]),
    9: ("g-layer-ranks", [33, 34, 35]),
    10: ("h-alpha0", [50, 51, 52]),  # adds nothing but layer 1's alpha_pattern, as PEFT's
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    save_random_hf_model(root / "base", "llama", num_hidden_layers=2)
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        save_peft_adapter(root / "base", root / "adapters" / name, seed=10 + i, **kw)
    model = load_model(root / "base", "float32")
    store = HostStore(model.args)
    ok, bad = store.register_dir(root / "adapters")
    assert sorted(ok) == sorted(ADAPTERS) and not bad
    pool = DevicePool(model.args, (8, 16, 32, 64), 4, torch.float32, model.layer_devices())
    for name in ADAPTERS:
        assert pool.load(store.get(name))
    model.use_lora(pool)
    return root, model, pool


def test_mixed_batch_matches_peft_per_request(setup):
    root, model, pool = setup
    reqs = sorted(PROMPTS, key=lambda i: pool.sort_key(PROMPTS[i][0]))
    prompts = [PROMPTS[i][1] for i in reqs]
    adapters = [PROMPTS[i][0] for i in reqs]
    g = torch.Generator().manual_seed(3)
    decode = [torch.randint(0, 128, (4,), generator=g).tolist() for _ in reqs]

    def lora_fn(is_decode):
        lens = [1] * len(reqs) if is_decode else [len(p) for p in prompts]
        runs, start = [], 0
        for n, name in zip(lens, adapters):
            runs.append((start, n, name))
            start += n
        return pool.make_batch(runs, is_decode, "cpu")

    pre, dec = run_prefill_decode(model, prompts, decode, lora_fn=lora_fn)
    for j, i in enumerate(reqs):
        name, prompt = PROMPTS[i]
        ref = peft_logits(root / "base", root / "adapters" / name if name else None, prompt + decode[j])
        base = peft_logits(root / "base", None, prompt + decode[j])
        if name is not None:
            assert (ref - base).abs().max() > 1e-2, "the adapter must change the logits"
        scale = ref.abs().max()
        assert ((pre[j] - ref[: len(prompt)]).abs().max() / scale) < 1e-4, f"prefill of request {i} ({name})"
        for t in range(len(decode[j])):
            assert ((dec[t][j] - ref[len(prompt) + t]).abs().max() / scale) < 1e-4, f"decode {t} of {i}"
        assert dec[-1][j].argmax() == ref[-1].argmax()
