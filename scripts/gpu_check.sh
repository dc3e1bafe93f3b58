#!/usr/bin/env bash
# GPU checks in one run on one H100/H200, within one 10-minute device call (the per-step time
# limits below add up to 9 minutes): the GPU tests (Triton kernels compiled for the device, CUDA
# engine == CPU engine, CUDA-graph decode == eager, async adapter copies), then the decode-vs-floor
# benchmark on a Llama-2-7B-shaped model with random bf16 weights made on the GPU and 32 adapters
# of ranks 8-64, the LoRA-operator benchmark and the cold-start benchmark.
#   scripts/gpu_check.sh                 every step
#   scripts/gpu_check.sh floor cold      only the named steps (tests floor lora cold), e.g. a rerun
# Results go to profiles/gpu/. The device image has torch/triton/transformers/peft but no
# network: run from the source tree.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 CARASERVE_CACHE="${CARASERVE_CACHE:-/tmp/caraserve-cache}"
steps="${*:-tests floor lora cold}"
for s in $steps; do
    case $s in tests|floor|lora|cold) ;; *) echo "unknown step '$s' (steps: tests floor lora cold)" >&2; exit 2 ;; esac
done
want() { [[ " $steps " == *" $1 "* ]]; }
mkdir -p profiles/gpu
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
status=0
if want tests; then
    timeout 150 python -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_triton_ops.py -x 2>&1 | tail -15 \
        || status=1
fi
if want floor; then
    timeout 160 python scripts/bench_decode_floor.py --shape llama2-7b --batch 32 --adapters 32 \
        --out profiles/gpu/decode_floor_llama2-7b.json || status=1
fi
if want lora; then
    timeout 60 python scripts/bench_lora_ops.py --hidden 4096 --out profiles/gpu/bench_lora_ops.json || status=1
fi
if want cold; then
    # Cold starts on the 7B shape with rank-64 adapters: CACHED vs on-demand vs CPU-assisted vs auto
    # (paper targets: CPU-assisted TTFT p50 within 1.10x of CACHED, mean latency >= 1.4x better than on-demand).
    timeout 170 python scripts/bench_cold_start.py --shape llama2-7b --ranks 64 --requests 48 --rate 4 \
        --threads 8 --torch-threads 1 --out profiles/gpu/bench_cold_start_llama2-7b.json || status=1
fi
exit $status
