"""Random-weight models built directly on a device (no checkpoint, no download), for benchmarks
of real model shapes on machines that have no weights."""

from __future__ import annotations

import torch

from caraserve.model.llama import CausalLM, ModelArgs

SHAPES = {
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "small": dict(vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048),
}


def random_model(shape: str, dtype: torch.dtype, device: torch.device | str) -> CausalLM:
    """A CausalLM of a named shape with N(0, 0.02) weights (norms at 1), seeded, on `device`."""
    from transformers import LlamaConfig

    from caraserve.model.layers import rope_inv_freq

    device = torch.device(device)
    cfg = LlamaConfig(architectures=["LlamaForCausalLM"], **SHAPES[shape])
    with torch.device("meta"):
        model = CausalLM(ModelArgs.from_hf(cfg), cfg)
    model = model.to_empty(device=device).to(dtype)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=g)
    model.ropes["global"].inv_freq = rope_inv_freq(cfg)[0].to(device)
    return model.eval()
