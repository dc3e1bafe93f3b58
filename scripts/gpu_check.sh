#!/usr/bin/env bash
# GPU checks on one H100/H200, in a fixed order of what matters most (tests floor peft cold
# floor128 warm attention compiled lora overhead, whatever order they are named in), within one
# deadline (DEADLINE_S, default 570 s: one 10-minute device call with room to copy the results back). Every
# step has its own time limit, cut to what the deadline leaves; a step that would get under 30 s
# is skipped and named at the end (exit 3 when steps were skipped and none failed), to be run by
# name in a second call. Each step's JSON is copied to OUT as soon as the step ends. On an H200
# the tests took 106 s and a compiled floor ~190 s, most of it compiling the two 7B-shaped
# variants: the floor steps now capture their graphs instead, and the compiled comparison comes
# later. Steps:
#   tests     the GPU tests (Triton kernels compiled for the device, CUDA engine == CPU engine,
#             CUDA-graph decode == eager and actually graphed, async adapter copies; structured
#             outputs' CUDA mask where xgrammar imports: the device image lacks it, carry its wheel)
#   floor     decode step vs the memory floor on a Llama-2-7B-shaped model with random bf16
#             weights made on the GPU, 32 adapters of ranks 8-64 on all seven projections, batch 32
#             (CUDA graphs captured over the eager forward, and eager; LoRA and base); floor128:
#             the same at batch 128, captured only; compiled: the batch-32 floor with torch.compile's
#             CUDA graphs (engine.cuda_graphs=compile; ~3 minutes of compiling), for the comparison
#   lora      the LoRA-operator benchmark
#   cold      the cold-start benchmark (CPU-assisted prefill vs on-demand loading vs cached)
#   peft      the same model, adapters and prompts through transformers + peft (the peer)
#   warm      cold vs warm restart of the 7B-shaped engine (compile cache empty vs present), and a
#             start with captured graphs
#   attention paged decode attention at batch 32 and 128 on the 7B shape: our Triton kernel vs
#             FlexAttention's paged form, both against the KV bytes' memory floor; and a mixed
#             step's attention (4 prompts of 512 tokens + the decode rows): the one-launch Triton
#             prefill kernel vs an SDPA call per sequence
#   overhead  the host's share of a compiled decode step (the tiny model's CUDA graph is short, so
#             a step's time beyond it is scheduling, inputs, sampling's read-back, detokenizing)
#   scripts/gpu_check.sh tests floor floor128      the named steps only (default: every step, as
#                                                  many as the deadline leaves room for)
#   FLOOR_MODES=capture scripts/gpu_check.sh floor the floor benchmark without its eager rows
# Results go to profiles/gpu/ (each JSON with the device, and the commit and command where the
# script records them); when OUT names a folder, the log and the JSON files are copied there too.
# The device image has torch/triton/transformers/peft but no network: run from the source tree.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
    CARASERVE_CACHE="${CARASERVE_CACHE:-/tmp/caraserve-cache}"
PY="${PYTHON:-python3}"
steps="${*:-tests floor peft cold floor128 warm attention compiled lora overhead}"
deadline=${DEADLINE_S:-570}
if ! [[ $deadline =~ ^[1-9][0-9]*$ ]]; then echo "DEADLINE_S must be a number of seconds, got '$deadline'" >&2; exit 2; fi
for s in $steps; do
    case $s in tests|floor|floor128|lora|cold|peft|warm|attention|compiled|overhead) ;;
        *) echo "unknown step '$s' (steps: tests floor floor128 lora cold peft warm attention compiled overhead)" >&2
           exit 2 ;;
    esac
done
want() { [[ " $steps " == *" $1 "* ]]; }
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA device here (torch.cuda.is_available() is false): run it on a GPU machine" >&2
    exit 2
fi
if [[ -n "${OUT:-}" ]]; then mkdir -p "$OUT" && exec > >(tee "$OUT/gpu_check.log") 2>&1; fi
mkdir -p profiles/gpu
stamp=$(mktemp)  # what this run wrote is newer: results committed from earlier runs are not copied to OUT
status=0
step=""  # the running step's `timeout`: stopped with this script, so no benchmark outlives it
trap 'if [[ -n $step ]]; then kill -TERM "$step" 2>/dev/null; wait "$step"; fi; exit 143' TERM INT
skipped=""
run() {  # run LIMIT_S NAME CMD...: one step under a time limit, its output to the console and the log
    local limit=$1 name=$2 t0=$SECONDS rc left=$((deadline - SECONDS))
    shift 2
    if ((left < 30)); then
        echo "=== $name: skipped, ${left}s left of the ${deadline}s deadline (run it by name in another call)"
        skipped+=" $name"
        return
    fi
    ((limit > left)) && limit=$left
    echo "=== $name (limit ${limit}s)"
    timeout -k 10 "$limit" "$@" 2>&1 &
    step=$!
    wait "$step"
    rc=$?
    step=""
    echo "=== $name: exit $rc after $((SECONDS - t0))s"
    [[ $rc == 0 ]] || status=1
    if [[ -n "${OUT:-}" ]]; then find profiles/gpu -name '*.json' -newer "$stamp" -exec cp {} "$OUT"/ \; 2>/dev/null || true; fi
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import torch, triton, transformers, peft; print("torch", torch.__version__, "triton", triton.__version__,
    "transformers", transformers.__version__, "peft", peft.__version__, "cuda", torch.cuda.is_available())'
if want tests; then
    # eager steps of the architectures whose layers differ most from Llama's (Phi: LayerNorms, attention
    # and MLP on one norm, gelu_new, partial rope); graphed steps for two of them
    ARCH=tests/test_arch_lora.py::test_on_cuda_matches_transformers_peft
    ARCHS="$ARCH[gemma2-true] $ARCH[gemma3-true]"
    for a in gemma gemma2 gemma3 granite phi3 qwen3 phi; do ARCHS="$ARCHS $ARCH[$a-false]"; done
    run 150 tests "$PY" -m pytest -q -p no:cacheprovider --tb=short -rfE tests/test_gpu.py tests/test_triton_ops.py \
        tests/test_triton_multi.py tests/test_triton_attention.py tests/test_layer_ops.py $ARCHS
fi
if want floor; then
    run 240 floor "$PY" scripts/bench_decode_floor.py --shape llama2-7b --batch 32 --adapters 32 --targets all \
        --modes "${FLOOR_MODES:-capture,false}" --out profiles/gpu/decode_floor_llama2-7b.json
fi
if want peft; then  # target: mixed-LoRA throughput >= 10x transformers + peft's
    run 150 peft "$PY" scripts/bench_peft_peer.py --shape llama2-7b --batch 32 --adapters 32 --targets all \
        --compile capture --out profiles/gpu/peft_peer_llama2-7b.json
fi
if want cold; then
    # Cold starts on the 7B shape with rank-64 adapters: CACHED vs on-demand vs CPU-assisted vs auto
    # (paper targets: CPU-assisted TTFT p50 within 1.10x of CACHED, mean latency >= 1.4x better than on-demand).
    run 120 cold "$PY" scripts/bench_cold_start.py --shape llama2-7b --ranks 64 --requests 48 --rate 4 \
        --threads 8 --torch-threads 1 --out profiles/gpu/bench_cold_start_llama2-7b.json
fi
if want floor128; then  # the larger batch the paged KV cache fits (captured only: eager adds little)
    run 150 floor128 "$PY" scripts/bench_decode_floor.py --shape llama2-7b --batch 128 --adapters 32 --targets all \
        --modes capture --out profiles/gpu/decode_floor_llama2-7b_b128.json
fi
if want warm; then  # target: warm restart <= 0.25x of the cold start (to the batch's last token)
    run 240 warm "$PY" scripts/bench_warm_start.py --shape llama2-7b --batch 8 --out profiles/gpu/warm_start_llama2-7b.json
fi
if want attention; then  # the kernel against FlexAttention's paged form (keep the faster, saying why)
    run 120 attention "$PY" scripts/bench_paged_attention.py --shape llama2-7b --batches 32,128 \
        --out profiles/gpu/bench_paged_attention.json
fi
if want compiled; then  # torch.compile's CUDA graphs on the floor workload: captured / compiled
    run 240 compiled "$PY" scripts/bench_decode_floor.py --shape llama2-7b --batch 32 --adapters 32 --targets all \
        --modes capture,true --out profiles/gpu/decode_floor_llama2-7b_compiled.json
fi
if want lora; then
    run 30 lora "$PY" scripts/bench_lora_ops.py --hidden 4096 --out profiles/gpu/bench_lora_ops.json
fi
if want overhead; then
    run 90 overhead "$PY" scripts/bench_step_overhead.py --device cuda --compile true --batches 32,128 \
        --workloads mixed --repeats 1 --steps 50 --out profiles/gpu/bench_step_overhead.json
fi
echo "gpu_check: steps '$steps' -> $([[ $status == 0 ]] && echo ok || echo FAILED)${skipped:+ (skipped:$skipped)}"
if [[ -n "${OUT:-}" ]]; then find profiles/gpu -name '*.json' -newer "$stamp" -exec cp {} "$OUT"/ \; 2>/dev/null || true; fi
rm -f "$stamp"
if [[ $status == 0 && -n $skipped ]]; then exit 3; fi
exit $status
