"""The fused elementwise stages of a decoder layer (add + RMSNorm; rotary + KV write) against their
plain-torch references: the C kernels of eager CPU steps, and the Triton kernels of eager GPU
steps (in the Triton interpreter on CPU, compiled on CUDA)."""

from __future__ import annotations

import pytest
import torch
from triton_interpret import DEVICE, kernel_modules

from caraserve import cpu_kernels, kernel_library  # noqa: E402
from caraserve.attention import rotary_write_kv_reference  # noqa: E402
from caraserve.model.layers import add_rms_norm_reference, fused_kernels  # noqa: E402

needs_library = pytest.mark.skipif(kernel_library.library() is None, reason="no C compiler for the CPU kernels")


def norm_case(rows: int, dim: int, dtype=torch.float32, device="cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(rows, dim + 5, generator=g).to(dtype).to(device)  # x: columns of a wider tensor
    return wide[:, 2 : 2 + dim], torch.randn(rows, dim, generator=g).to(dtype).to(device), \
        torch.randn(dim, generator=g).to(dtype).to(device)


def rotary_case(tokens: int, heads: int, kv: int, hd: int, dtype=torch.float32, device="cpu", seed: int = 0,
                rot: int | None = None):
    """q, k, v as column views of one fused projection's output, cos/sin of random positions over
    the heads' first `rot` dimensions (all by default), caches full of a marker value, and distinct
    slots."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (heads + 2 * kv) * hd + 3, generator=g).to(dtype).to(device)
    q = qkv[:, : heads * hd].view(tokens, heads, hd)
    k = qkv[:, heads * hd : (heads + kv) * hd].view(tokens, kv, hd)
    v = qkv[:, (heads + kv) * hd : (heads + 2 * kv) * hd].view(tokens, kv, hd)
    angles = torch.rand(tokens, (rot or hd) // 2, generator=g) * 6.3
    emb = torch.cat((angles, angles), -1)
    cos, sin = emb.cos().to(dtype).to(device), emb.sin().to(dtype).to(device)
    caches = [torch.full((6, 4, kv, hd), 7.0, dtype=dtype, device=device) for _ in range(2)]
    slots = torch.randperm(24, generator=g)[:tokens].to(device)
    return q, k, v, cos, sin, caches, slots


@needs_library
@pytest.mark.parametrize("unit_offset", [False, True])
@pytest.mark.parametrize("with_x", [True, False])
def test_cpu_add_rms_norm_equals_the_reference(with_x, unit_offset):
    """(unit_offset: Gemma's norm, as RMSNorm runs it on the kernel: the weight 1 + w)"""
    x, residual, w = norm_case(7, 37)
    want, want_sum = add_rms_norm_reference(x if with_x else None, residual.clone(), w, 1e-5, unit_offset)
    got = cpu_kernels.add_rms_norm(x if with_x else None, residual, w + 1 if unit_offset else w, 1e-5)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(residual, want_sum)  # the sum, written into the residual's own memory


@needs_library
def test_cpu_add_rms_norm_refuses_what_it_cannot_read():
    x, residual, w = norm_case(4, 16)
    with pytest.raises(ValueError, match="residual must be a contiguous"):
        cpu_kernels.add_rms_norm(x, residual.t().contiguous().t(), w, 1e-5)
    with pytest.raises(ValueError, match="x: expected a 2-D float32"):
        cpu_kernels.add_rms_norm(x.double(), residual, w, 1e-5)
    with pytest.raises(ValueError, match="x has 3 rows"):
        cpu_kernels.add_rms_norm(x[:3], residual, w, 1e-5)
    with pytest.raises(ValueError, match="weight must be"):
        cpu_kernels.add_rms_norm(x, residual, w[:8], 1e-5)


@needs_library
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("heads, kv, rot", [(4, 2, None), (3, 3, None), (4, 2, 6), (2, 1, 2)])
def test_cpu_rotary_write_kv_equals_the_reference(heads, kv, rot, interleaved):
    q, k, v, cos, sin, (kc, vc), slots = rotary_case(5, heads, kv, 8, rot=rot)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    want = rotary_write_kv_reference(q, k, v, cos, sin, kc_ref, vc_ref, slots, interleaved)
    got = cpu_kernels.rotary_write_kv(q, k, v, cos, sin, kc, vc, slots, interleaved)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kc, kc_ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(vc, vc_ref)
    untouched = torch.ones(24, dtype=torch.bool)
    untouched[slots] = False
    assert (kc.view(24, -1)[untouched] == 7.0).all()  # no other slot written


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rot", [None, 6])
def test_interleaved_rotary_reference_equals_transformers_glm(dtype, rot):
    """apply_rotary(interleaved=True) against transformers' GLM-4 rope (pairs (2i, 2i + 1) over
    the first r dimensions, the rest passing), bit for bit; and it differs from the half-split form."""
    from transformers.models.glm4.modeling_glm4 import apply_rotary_pos_emb

    from caraserve.model.layers import apply_rotary

    q, k, _, cos, sin, _, _ = rotary_case(5, 4, 2, 8, dtype, seed=1, rot=rot)
    want_q, want_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    got_q, got_k = apply_rotary(q, cos, sin, interleaved=True), apply_rotary(k, cos, sin, interleaved=True)
    assert torch.equal(got_q, want_q[0].transpose(0, 1)) and torch.equal(got_k, want_k[0].transpose(0, 1))
    assert not torch.allclose(apply_rotary(q, cos, sin), got_q, atol=1e-2)


@pytest.mark.parametrize("family, interleaved, f32_tables", [
    ("cohere", True, False),  # q.float() * cos over tables in the dtype
    ("ernie4_5", True, True),  # tables and arithmetic in float32
    ("olmo2", False, True),
])
def test_float32_rope_equals_transformers_in_bfloat16(family, interleaved, f32_tables):
    """apply_rotary(float32=True), with the tables in the dtype or in float32 as each family keeps
    them, against that family's own transformers rope in bfloat16, bit for bit; the per-product
    rounding of the default form differs from it."""
    import importlib

    from caraserve.model.layers import apply_rotary

    rope = importlib.import_module(f"transformers.models.{family}.modeling_{family}").apply_rotary_pos_emb
    q, k, _, cos, sin, _, _ = rotary_case(9, 4, 2, 16, seed=4)
    q, k = q.to(torch.bfloat16), k.to(torch.bfloat16)
    if not f32_tables:
        cos, sin = cos.to(torch.bfloat16), sin.to(torch.bfloat16)
    if family == "cohere":  # (its tables repeat each angle in place: cos[2i] = cos[2i + 1])
        hf_cos, hf_sin = (t[:, : t.shape[1] // 2].repeat_interleave(2, -1) for t in (cos, sin))
    else:
        hf_cos, hf_sin = cos, sin
    want_q, want_k = rope(q.transpose(0, 1)[None], k.transpose(0, 1)[None], hf_cos[None], hf_sin[None])
    got_q = apply_rotary(q, cos, sin, interleaved, float32=True)
    assert got_q.dtype == torch.bfloat16
    assert torch.equal(got_q, want_q[0].transpose(0, 1))
    assert torch.equal(apply_rotary(k, cos, sin, interleaved, float32=True), want_k[0].transpose(0, 1))
    per_product = apply_rotary(q, cos.to(torch.bfloat16), sin.to(torch.bfloat16), interleaved)
    assert not torch.equal(per_product, got_q)


@pytest.mark.parametrize("family", ["olmo2", "helium", "llama"])
def test_rms_norm_forms_equal_transformers_in_bfloat16(family):
    """add_rms_norm_reference's forms against transformers' norms in bfloat16, bit for bit: OLMo
    2's and Helium's weight applied in float32 (float32_weight), Llama's to the rounded rows."""
    import importlib

    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    name = {"olmo2": "Olmo2RMSNorm", "helium": "HeliumRMSNorm", "llama": "LlamaRMSNorm"}[family]
    norm = getattr(module, name)(64, 1e-6).to(torch.bfloat16)  # (a bfloat16 model's weights)
    _, residual, w = norm_case(16, 64, torch.bfloat16, seed=5)
    with torch.no_grad():
        norm.weight.copy_(w)
        want = norm(residual)
    got, _ = add_rms_norm_reference(None, residual, w, 1e-6, float32_weight=family != "llama")
    assert torch.equal(got, want)
    other, _ = add_rms_norm_reference(None, residual, w, 1e-6, float32_weight=family == "llama")
    assert not torch.equal(other, want)


@needs_library
def test_cpu_rotary_write_kv_refuses_a_slot_outside_the_caches_before_writing():
    q, k, v, cos, sin, (kc, vc), slots = rotary_case(3, 2, 2, 8)
    slots[2] = 24
    with pytest.raises(ValueError, match="outside the caches' 24"):
        cpu_kernels.rotary_write_kv(q, k, v, cos, sin, kc, vc, slots)
    assert (kc == 7.0).all() and (vc == 7.0).all()
    with pytest.raises(ValueError, match="q must be"):
        cpu_kernels.rotary_write_kv(q.transpose(0, 1).contiguous().transpose(0, 1), k, v, cos, sin, kc, vc, slots)
    with pytest.raises(ValueError, match="cos must be contiguous"):
        cpu_kernels.rotary_write_kv(q, k, v, cos.t(), sin, kc, vc, slots)
    for bad in (cos[:, :3], torch.cat((cos, cos), 1)):  # an odd rotary width; one wider than the heads
        with pytest.raises(ValueError, match="r even and at most 8"):
            cpu_kernels.rotary_write_kv(q, k, v, bad, bad, kc, vc, slots)


def test_compiled_steps_take_the_torch_form():
    seen = []

    def probe(t):
        seen.append(fused_kernels(t))
        return t + 1

    torch.compile(probe, backend="eager", fullgraph=True)(torch.zeros(2))
    assert seen == [None]
    if kernel_library.library() is not None:
        assert fused_kernels(torch.zeros(2)) == "cpu"
    assert fused_kernels(torch.zeros(2, dtype=torch.bfloat16)) is None  # the C kernels are float32


def tolerance(dtype, ulps: int) -> dict:
    """assert_close's tolerance for `ulps` last-bit differences of a bfloat16 result (float32: ~exact).
    The interpreter rounds float32 to bfloat16 toward zero where a GPU rounds to nearest, so on
    CPU every bfloat16 rounding may be one bit off."""
    if dtype == torch.float32:
        return dict(rtol=1e-6, atol=1e-6)
    bits = ulps + (2 if DEVICE == "cpu" else 0)
    return dict(rtol=bits * 2 ** -7, atol=bits * 2 ** -7) if bits else dict(rtol=0, atol=0)


@pytest.fixture(scope="module")
def layer_ops_triton():
    return kernel_modules("caraserve.layer_ops_triton")[0]


@pytest.mark.parametrize("unit_offset, float32_weight", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_x", [True, False])
def test_triton_add_rms_norm_equals_the_reference(layer_ops_triton, dtype, with_x, unit_offset, float32_weight):
    x, residual, w = norm_case(3, 24, dtype, DEVICE, seed=2)
    want, want_sum = add_rms_norm_reference(x if with_x else None, residual.clone(), w, 1e-5, unit_offset,
                                            float32_weight)
    got = layer_ops_triton.add_rms_norm(x if with_x else None, residual, w, 1e-5, unit_offset, float32_weight)
    # float32 sums in another order: a bfloat16 result may differ by its last bit
    torch.testing.assert_close(got, want, **tolerance(dtype, ulps=1))
    torch.testing.assert_close(residual, want_sum, **tolerance(dtype, ulps=0))


@pytest.mark.parametrize("float32", [False, True])  # products rounded each, or float32 math rounded once
@pytest.mark.parametrize("interleaved", [False, True])  # GLM's pairs (2i, 2i + 1)
@pytest.mark.parametrize("rot", [None, 8])  # every dimension; the first 8 of 12 (partial rotary)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_rotary_write_kv_equals_the_reference(layer_ops_triton, dtype, rot, interleaved, float32):
    # odd heads, hd/2 = 6
    q, k, v, cos, sin, (kc, vc), slots = rotary_case(3, 3, 1, 12, dtype, DEVICE, seed=3, rot=rot)
    if float32:  # (tables kept in float32, as OLMo 2's)
        cos, sin = (torch.rand_like(cos, dtype=torch.float32) * 2 - 1 for _ in range(2))
    kc_ref, vc_ref = kc.clone(), vc.clone()
    want = rotary_write_kv_reference(q, k, v, cos, sin, kc_ref, vc_ref, slots, interleaved, float32)
    got = layer_ops_triton.rotary_write_kv(q, k, v, cos, sin, kc, vc, slots, interleaved, float32)
    # each product and the sum rounded to the dtype, as the torch form does: the same bits
    torch.testing.assert_close(got, want, **tolerance(dtype, ulps=0))
    torch.testing.assert_close(kc, kc_ref, **tolerance(dtype, ulps=0))
    assert torch.equal(vc, vc_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_forms_and_activations_equal_transformers(dtype):
    """Phi's, StableLM's, Nemotron's and OLMo's norms and the plain MLPs' activations against
    transformers' modules, bit for bit: torch's LayerNorm with a bias; Nemotron's LayerNorm1P (w + 1
    in the weight's dtype); OLMo's without parameters; StableLM's LayerNorm per head; gelu_new and
    ReLU² (transformers' ACT2FN)."""
    from transformers.activations import ACT2FN
    from transformers.models.nemotron.modeling_nemotron import NemotronLayerNorm1P
    from transformers.models.olmo.modeling_olmo import OlmoLayerNorm
    from transformers.models.stablelm.modeling_stablelm import StableLmLayerNormPerHead

    from caraserve.model.layers import HeadLayerNorms, LayerNorm, activation

    g = torch.Generator().manual_seed(5)
    x, r = (torch.randn(7, 3, 16, generator=g).mul(3).to(dtype) for _ in range(2))
    for unit_offset, hf_norm in ((False, torch.nn.LayerNorm(16, eps=1e-5)), (True, NemotronLayerNorm1P(16, eps=1e-5))):
        ours = LayerNorm(16, 1e-5, "torch", unit_offset=unit_offset).to(dtype)
        with torch.no_grad():
            for p in (*ours.parameters(), *hf_norm.parameters()):
                p.copy_(torch.randn(16, generator=g).to(dtype))
            hf_norm.weight.copy_(ours.weight)
            hf_norm.bias.copy_(ours.bias)
            out, summed = ours(x, r)
            assert torch.equal(summed, r + x) and torch.equal(out, hf_norm.to(dtype)(r + x))
    out, _ = LayerNorm(16, 1e-5, "plain")(None, x)  # OLMo's: no weight or bias, float32 inside
    assert torch.equal(out, OlmoLayerNorm(16)(x)) and not list(LayerNorm(16, 1e-5, "plain").parameters())
    heads = StableLmLayerNormPerHead(16, 3, eps=1e-5).to(dtype)
    ours = HeadLayerNorms(3, 16, 1e-5).to(dtype)
    with torch.no_grad():
        for norm in heads.norms:
            norm.weight.copy_(torch.randn(16, generator=g).to(dtype))
        ours.load_state_dict(heads.state_dict())
        want = heads(x.transpose(0, 1)[None])[0].transpose(0, 1)  # (its heads on dim 1: [B, H, T, D])
        assert torch.equal(ours(None, x)[0], want)
    for ours_name, hf_name in (("gelu_new", "gelu_new"), ("relu2", "relu2"), ("gelu_tanh", "gelu_pytorch_tanh"),
                               ("gelu", "gelu"), ("silu", "silu")):
        assert torch.equal(activation(ours_name, x), ACT2FN[hf_name](x)), ours_name
    assert not torch.equal(activation("gelu_new", x), activation("gelu_tanh", x))  # (their roundings differ)
