"""The Triton kernels of a GPU step (attention, the fused layer ops, the decode step's LoRA)
compile for an H100/H200 (sm_90) ahead of time, with no GPU: the interpreter tests check what
they compute, this checks that the GPU compiler takes them (tl.dot shapes and dtypes, shared
memory) in the forms the 7B-shaped engine launches, bfloat16 with the 16-byte alignment the
runtime assumes for its pointers and strides. The compiles run in a process of their own: in
this one other tests may have imported the kernel modules interpreted (TRITON_INTERPRET)."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ATTENTION = "caraserve.attention_triton"
LAYER_OPS = "caraserve.layer_ops_triton"
MULTI = "caraserve.lora.triton_multi"
BF16_4 = ("out_ptr", "q_ptr", "k_ptr", "v_ptr")


def _specs() -> dict[str, tuple]:
    """name -> (module, kernel, argument types, constexprs, 16-byte aligned arguments)."""
    specs = {}
    for kv, group in ((32, 1), (8, 4)):  # Llama-2-7B's heads; a GQA model's
        gp = 1 << (group - 1).bit_length()
        specs[f"prefill kv={kv} group={group}"] = (
            ATTENTION, "_prefill_attention_kernel",
            {**dict.fromkeys(BF16_4, "*bf16"), "tables_ptr": "*i64", "tiles_ptr": "*i64", "scale": "fp32"},
            dict(KV=kv, D=128, BS=16, GROUP=group, GROUP_PAD=gp, BLOCK_Q=max(1, 64 // gp, -(-16 // gp)),
                 BLOCK_N=32, BLOCK_D=128, IEEE=False),
            (*BF16_4, "tables_ptr", "tiles_ptr", "stride_qt", "stride_qh", "stride_ot", "stride_oh"))
    for splits in (1, 4):
        specs[f"decode splits={splits}"] = (
            ATTENTION, "_paged_attention_kernel",
            {**dict.fromkeys(BF16_4, "*bf16"), "part_ptr": "*fp32", "ms_ptr": "*fp32", "tables_ptr": "*i64",
             "row_seq_ptr": "*i64", "lens_ptr": "*i64", "scale": "fp32"},
            dict(KV=32, D=128, BS=16, SPLITS=splits, GROUP=1, BLOCK_G=2, BLOCK_D=128, BLOCK_S=16),
            (*BF16_4, "part_ptr", "ms_ptr", "tables_ptr", "row_seq_ptr", "lens_ptr", "stride_qt", "stride_qh",
             "stride_ot", "stride_oh"))
    for has_x in (True, False):
        specs[f"add_rms_norm has_x={has_x}"] = (
            LAYER_OPS, "_add_rms_norm_kernel",
            {**dict.fromkeys(("out_ptr", "res_ptr", "x_ptr", "w_ptr"), "*bf16"), "eps": "fp32"},
            dict(HAS_X=has_x, BLOCK=4096), ("out_ptr", "res_ptr", "x_ptr", "w_ptr", "dim", "ld_x"))
    specs["rotary_write_kv"] = (
        LAYER_OPS, "_rotary_write_kv_kernel",
        {**dict.fromkeys(("q_out_ptr", "q_ptr", "k_ptr", "v_ptr", "cos_ptr", "sin_ptr", "k_cache_ptr",
                          "v_cache_ptr"), "*bf16"), "slot_ptr": "*i64"},
        dict(HALF=64, D=128, BLOCK_H=32, BLOCK_HALF=64, BLOCK_D=128),
        ("q_out_ptr", "q_ptr", "k_ptr", "v_ptr", "cos_ptr", "sin_ptr", "k_cache_ptr", "v_cache_ptr", "slot_ptr",
         "ld_q", "ld_k", "ld_v"))
    for block_r in (16, 64):  # the decode step's LoRA: one shrink and one expand over all rank buckets
        block = max(16, 8192 // block_r)  # triton_common.BGMV_TILE
        specs[f"bgmv shrink r={block_r}"] = (
            MULTI, "_bgmv_multi_shrink_kernel",
            {"v_ptr": "*fp32", "x_ptr": "*bf16", "meta_ptr": "*i32", "a_table": "*i64"},
            dict(BLOCK_K=min(4096, block), BLOCK_R=block_r), ("v_ptr", "x_ptr", "meta_ptr", "a_table", "IN"))
        specs[f"bgmv expand r={block_r}"] = (
            MULTI, "_bgmv_multi_expand_kernel",
            {"y_ptr": "*bf16", "v_ptr": "*fp32", "meta_ptr": "*i32", "scale_ptr": "*fp32", "b_table": "*i64",
             "outs_ptr": "*i32", "cols_ptr": "*i32"},
            dict(SPLIT=1, BLOCK_N=min(4096, block), BLOCK_R=block_r),
            ("y_ptr", "v_ptr", "meta_ptr", "scale_ptr", "b_table", "outs_ptr", "cols_ptr", "stride_ym"))
    return specs


def compile_for_sm90(kernel, types: dict, constexprs: dict, aligned=()):
    """triton.compile of a JITFunction for sm_90: types of its pointer and float arguments (other
    runtime arguments are int32), its constexprs, the arguments the runtime finds 16-byte aligned."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    params = list(inspect.signature(kernel.fn).parameters)
    sig = {p: types.get(p, "constexpr" if p in constexprs else "i32") for p in params}
    attrs = {(params.index(p),): [["tt.divisibility", 16]] for p in aligned}
    return triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32))


def _compile_all() -> dict[str, str]:
    """name -> "ok (shared bytes)" or the error; {"": why} when nothing can compile for sm_90 here."""
    import importlib

    import triton
    import triton.language as tl

    @triton.jit
    def probe(x_ptr, BLOCK: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, BLOCK), tl.arange(0, BLOCK).to(tl.float32))

    try:
        compile_for_sm90(probe, {"x_ptr": "*fp32"}, {"BLOCK": 16})
    except Exception as e:  # no CUDA backend or ptxas in this Triton
        return {"": f"{type(e).__name__}: {e}"}
    out = {}
    for name, (module, kernel, types, consts, aligned) in _specs().items():
        try:
            k = compile_for_sm90(getattr(importlib.import_module(module), kernel), types, consts, aligned)
            out[name] = f"ok {k.metadata.shared}"
        except Exception as e:
            out[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    return out


@pytest.fixture(scope="module")
def compiled() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)  # no "": the cwd
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "" in result:
        pytest.skip(f"this Triton cannot compile for sm_90 here ({result['']})")
    return result


@pytest.mark.parametrize("name", sorted(_specs()))
def test_kernel_compiles_for_sm90(compiled, name):
    assert compiled[name].startswith("ok"), compiled[name]
    assert int(compiled[name].split()[1]) <= 227 * 1024  # fits an H100's shared memory per block


if __name__ == "__main__":
    print(json.dumps(_compile_all()))
