"""The Triton kernels of a GPU step (attention, the fused layer ops, the decode step's LoRA)
compile for an H100/H200 (sm_90) ahead of time, with no GPU: the interpreter tests check what
they compute, this checks that the GPU compiler takes them (tl.dot shapes and dtypes, shared
memory) in the forms the 7B-shaped engine launches, bfloat16 with the 16-byte alignment the
runtime assumes for its pointers and strides."""

from __future__ import annotations

import inspect

import pytest

triton = pytest.importorskip("triton")


def compile_for_sm90(kernel, types: dict, constexprs: dict, aligned=()):
    """triton.compile of kernel's function for sm_90: types of its pointer and float arguments
    (other runtime arguments are int32), its constexprs, the arguments the runtime finds 16-byte
    aligned. A JITFunction made here: under TRITON_INTERPRET the module's own is interpreted."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = JITFunction(getattr(kernel, "fn", kernel))
    params = list(inspect.signature(fn.fn).parameters)
    sig = {p: types.get(p, "constexpr" if p in constexprs else "i32") for p in params}
    attrs = {(params.index(p),): [["tt.divisibility", 16]] for p in aligned}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32))


@pytest.fixture(scope="module")
def sm90():
    """Skips where this Triton cannot compile for sm_90 at all (a probe kernel)."""
    import triton.language as tl

    @triton.jit
    def probe(x_ptr, BLOCK: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, BLOCK), tl.arange(0, BLOCK).to(tl.float32))

    try:
        compile_for_sm90(probe, {"x_ptr": "*fp32"}, {"BLOCK": 16})
    except Exception as e:  # no CUDA backend or ptxas in this Triton: nothing below could compile
        pytest.skip(f"this Triton cannot compile for sm_90 here ({type(e).__name__}: {e})")


@pytest.mark.parametrize("kv,group", [(32, 1), (8, 4)])  # Llama-2-7B's heads; a GQA model's
def test_prefill_kernel_compiles_for_sm90(sm90, kv, group):
    from caraserve import attention_triton

    gp = triton.next_power_of_2(group)
    types = {p: "*bf16" for p in ("out_ptr", "q_ptr", "k_ptr", "v_ptr")}
    types.update(tables_ptr="*i64", tiles_ptr="*i64", scale="fp32")
    consts = dict(KV=kv, D=128, BS=16, GROUP=group, GROUP_PAD=gp, BLOCK_Q=max(1, 64 // gp, -(-16 // gp)),
                  BLOCK_N=32, BLOCK_D=128, IEEE=False)
    aligned = ("out_ptr", "q_ptr", "k_ptr", "v_ptr", "tables_ptr", "tiles_ptr", "stride_qt", "stride_qh",
               "stride_ot", "stride_oh")
    k = compile_for_sm90(attention_triton._prefill_attention_kernel, types, consts, aligned)
    assert 0 < k.metadata.shared <= 227 * 1024  # fits an H100's shared memory per block


@pytest.mark.parametrize("splits", [1, 4])
def test_decode_kernel_compiles_for_sm90(sm90, splits):
    from caraserve import attention_triton

    types = {p: "*bf16" for p in ("out_ptr", "q_ptr", "k_ptr", "v_ptr")}
    types.update(part_ptr="*fp32", ms_ptr="*fp32", tables_ptr="*i64", row_seq_ptr="*i64", lens_ptr="*i64",
                 scale="fp32")
    consts = dict(KV=32, D=128, BS=16, SPLITS=splits, GROUP=1, BLOCK_G=2, BLOCK_D=128, BLOCK_S=16)
    compile_for_sm90(attention_triton._paged_attention_kernel, types, consts)


@pytest.mark.parametrize("has_x", [True, False])
def test_add_rms_norm_kernel_compiles_for_sm90(sm90, has_x):
    from caraserve import layer_ops_triton

    types = {p: "*bf16" for p in ("out_ptr", "res_ptr", "x_ptr", "w_ptr")}
    types.update(eps="fp32")
    compile_for_sm90(layer_ops_triton._add_rms_norm_kernel, types, dict(HAS_X=has_x, BLOCK=4096),
                     aligned=("out_ptr", "res_ptr", "x_ptr", "w_ptr", "dim", "ld_x"))


def test_rotary_write_kv_kernel_compiles_for_sm90(sm90):
    from caraserve import layer_ops_triton

    types = {p: "*bf16" for p in ("q_out_ptr", "q_ptr", "k_ptr", "v_ptr", "cos_ptr", "sin_ptr", "k_cache_ptr",
                                  "v_cache_ptr")}
    types.update(slot_ptr="*i64")
    compile_for_sm90(layer_ops_triton._rotary_write_kv_kernel, types, dict(HALF=64, BLOCK_H=32, BLOCK_HALF=64))


@pytest.mark.parametrize("block_r", [16, 64])
def test_multi_bgmv_kernels_compile_for_sm90(sm90, block_r):
    """The decode step's LoRA (every adapted module: one shrink and one expand over all rank
    buckets) at the 7B shape's widths."""
    from caraserve.lora import triton_multi
    from caraserve.lora.triton_common import BGMV_TILE

    block = max(16, BGMV_TILE // block_r)
    shrink = {"v_ptr": "*fp32", "x_ptr": "*bf16", "meta_ptr": "*i32", "a_table": "*i64"}
    compile_for_sm90(triton_multi._bgmv_multi_shrink_kernel, shrink, dict(BLOCK_K=min(4096, block), BLOCK_R=block_r))
    expand = {"y_ptr": "*bf16", "v_ptr": "*fp32", "meta_ptr": "*i32", "scale_ptr": "*fp32", "b_table": "*i64",
              "outs_ptr": "*i32", "cols_ptr": "*i32"}
    compile_for_sm90(triton_multi._bgmv_multi_expand_kernel, expand,
                     dict(SPLIT=1, BLOCK_N=min(4096, block), BLOCK_R=block_r))
