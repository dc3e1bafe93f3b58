"""Online serving benchmark: drives a RUNNING OpenAI-compatible server over HTTP with a seeded Poisson load.

    python scripts/bench_serve.py [--url http://127.0.0.1:8000] [--rate 4] [--requests 64] [--duration-s 600]
        [--adapters demo-r8,demo-r16,model] [--popularity uniform|zipf] [--prompt-tokens 64]
        [--output-tokens 64] [--slo-ms 40] [--seed 0] [--api-key KEY] [--concurrency-limit N]
        [--out profiles/cpu/bench_serve.json]

Start the server first (e.g. `python -m caraserve.serve server.port=8000`). Every request is a streamed
`POST /v1/completions` (`stream: true`, `stream_options.include_usage`, `ignore_eos: true`,
`max_tokens = --output-tokens`) whose `model` is the base model or one of its LoRA adapters, drawn
uniformly or Zipf-like (exponent 1.2, in `--adapters` order) from the list; the default list is every
adapter that `GET /v1/models` reports plus the base model (its first entry). Prompts are `--prompt-tokens`
words drawn from a seeded generator; arrivals are a seeded Poisson process of `--rate` requests/s
(`--rate 0`: all at once). Sending stops after `--requests` requests or `--duration-s` seconds,
whichever comes first; requests still running at the `--duration-s` cap are cancelled and counted as
errors, so the script always stops by itself.

Per request it measures
  TTFT   request sent -> first chunk with non-empty text
  TPOT   (last token time - first token time) / (output tokens - 1); output tokens from the final
         `usage` chunk when the server sends one, else the number of non-empty text chunks
  E2E    request sent -> end of the stream
  per-token latency = E2E / output tokens; a request meets the SLO when it is <= --slo-ms
and reports (also split by base-model vs adapter requests) the request and error counts, throughput
(output tokens/s and completed requests/s over the wall time from the first send to the last reply),
TTFT/TPOT/E2E p50 and p99 and SLO attainment (the fraction of ALL sent requests that completed and met
the SLO: a failed request counts as a miss). A table goes to stdout, a progress bar to stderr, and
every request's record plus a header {device, platform, url, created, args} to the --out JSON.

The comparison peer is any other OpenAI-compatible server given the same model and adapters and
measured by this same script with the same arguments, e.g. vLLM:

    python -m vllm.entrypoints.openai.api_server --model DIR --enable-lora \\
        --lora-modules demo-r8=DIR/demo-r8 ... --port 8001
    python scripts/bench_serve.py --url http://127.0.0.1:8001 --adapters demo-r8,...,DIR <same args>

(vLLM serves the base model under the `--model` value and lists adapters with a `parent`, as here.)
By default the URL must be a loopback address (--allow-remote lifts that).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
from tqdm import tqdm

WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there one all we their been has more when will would who so no time people year "
    "new work first way may day use man many part state world system number program data model server "
    "request token memory engine batch kernel adapter layer weight matrix vector query value cache graph "
    "river mountain city market paper letter music garden window morning evening summer winter table chair"
).split()

ZIPF_EXPONENT = 1.2
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (without /v1)")
    p.add_argument("--rate", type=float, default=4.0, help="mean arrival rate, requests/s (Poisson); 0 = all at once")
    p.add_argument("--requests", type=int, default=64, help="requests to send")
    p.add_argument("--duration-s", type=float, default=600.0,
                   help="wall-clock cap: no sends after it, running requests cancelled at it")
    p.add_argument("--adapters", default="",
                   help="comma list of model names to draw from; default: all adapters of /v1/models + the base")
    p.add_argument("--popularity", choices=("uniform", "zipf"), default="uniform")
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length in words (approximate tokens)")
    p.add_argument("--output-tokens", type=int, default=64, help="max_tokens of every request (with ignore_eos)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--slo-ms", type=float, default=40.0, help="per-token latency SLO (E2E / output tokens), ms")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default="", help="sent as `Authorization: Bearer KEY`")
    p.add_argument("--concurrency-limit", type=int, default=0, help="at most this many requests in flight (0 = none)")
    p.add_argument("--request-timeout-s", type=float, default=300.0, help="per-request read timeout")
    p.add_argument("--device", default="cpu", help="label of the server's device, written to the JSON header")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --url")
    p.add_argument("--out", default="profiles/cpu/bench_serve.json", help="JSON results: every request, the summary")
    args = p.parse_args(argv)
    if args.requests < 1 or args.output_tokens < 1 or args.prompt_tokens < 1:
        p.error("--requests, --output-tokens and --prompt-tokens must be >= 1")
    if args.rate < 0 or args.duration_s <= 0 or args.concurrency_limit < 0:
        p.error("--rate must be >= 0, --duration-s > 0, --concurrency-limit >= 0")
    host = urlparse(args.url).hostname or ""
    if host not in LOOPBACK and not args.allow_remote:
        p.error(f"--url host {host!r} is not a loopback address (pass --allow-remote to bench a remote server)")
    args.url = args.url.rstrip("/")
    return args


def pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


async def fetch_models(client: httpx.AsyncClient, url: str) -> tuple[str, list[str]]:
    """(base model name, adapter names) from /v1/models: the base is the first card without a parent."""
    r = await client.get(f"{url}/v1/models")
    r.raise_for_status()
    cards = r.json()["data"]
    bases = [c["id"] for c in cards if not c.get("parent")]
    if not bases:
        raise SystemExit(f"{url}/v1/models lists no base model (every card has a parent)")
    return bases[0], [c["id"] for c in cards if c.get("parent")]


def make_workload(args, models: list[str]) -> list[dict]:
    """Seeded: arrival offsets (s), model and prompt of every request."""
    rng = random.Random(args.seed)
    if args.popularity == "zipf":
        weights = [1.0 / (i + 1) ** ZIPF_EXPONENT for i in range(len(models))]
    else:
        weights = [1.0] * len(models)
    t, work = 0.0, []
    for i in range(args.requests):
        if i and args.rate > 0:
            t += rng.expovariate(args.rate)
        model = rng.choices(models, weights)[0]
        prompt = " ".join(rng.choice(WORDS) for _ in range(args.prompt_tokens))
        work.append({"index": i, "arrival_s": t, "model": model, "prompt": prompt})
    return work


async def one_request(client: httpx.AsyncClient, args, item: dict, base: str) -> dict:
    rec = {"index": item["index"], "model": item["model"], "is_base": item["model"] == base,
           "arrival_s": item["arrival_s"], "status": None, "error": None, "ttft_s": None, "tpot_s": None,
           "e2e_s": None, "output_tokens": 0, "text_chunks": 0, "usage_tokens": None, "prompt_tokens": None,
           "finish_reason": None}
    payload = {"model": item["model"], "prompt": item["prompt"], "max_tokens": args.output_tokens,
               "temperature": args.temperature, "ignore_eos": True, "stream": True,
               "stream_options": {"include_usage": True}}
    token_times: list[float] = []
    finish_time = None  # the chunk with finish_reason: the last token's, even when its text is empty
    done = False
    t0 = time.perf_counter()
    rec["sent_s"] = t0
    try:
        async with client.stream("POST", f"{args.url}/v1/completions", json=payload) as resp:
            rec["status"] = resp.status_code
            if resp.status_code != 200:
                body = (await resp.aread()).decode("utf-8", "replace")
                rec["error"] = f"HTTP {resp.status_code}: {body[:300]}"
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if "error" in chunk:
                    rec["error"] = f"stream error: {json.dumps(chunk['error'])[:300]}"
                    continue
                for choice in chunk.get("choices") or []:
                    if choice.get("text"):
                        token_times.append(now)
                    if choice.get("finish_reason"):
                        rec["finish_reason"] = choice["finish_reason"]
                        finish_time = now
                usage = chunk.get("usage")
                if usage:
                    rec["usage_tokens"] = usage.get("completion_tokens")
                    rec["prompt_tokens"] = usage.get("prompt_tokens")
    except asyncio.CancelledError:
        rec["error"] = "cancelled at the --duration-s cap"
        rec["e2e_s"] = time.perf_counter() - t0
        return rec
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        rec["error"] = f"{type(e).__name__}: {e}"[:300]
    end = time.perf_counter()
    rec["e2e_s"] = end - t0
    rec["end_s"] = end
    rec["text_chunks"] = len(token_times)
    tokens = rec["usage_tokens"] if rec["usage_tokens"] is not None else len(token_times)
    rec["output_tokens"] = tokens
    if token_times:
        rec["ttft_s"] = token_times[0] - t0
        last = max(token_times[-1], finish_time or 0.0)
        if tokens > 1:
            rec["tpot_s"] = (last - token_times[0]) / (tokens - 1)
        gaps = np.diff(token_times + ([finish_time] if finish_time and finish_time > token_times[-1] else []))
        rec["max_gap_s"] = float(gaps.max()) if len(gaps) else 0.0  # longest silence between chunks
    if rec["error"] is None:
        if not done:
            rec["error"] = "stream ended without [DONE]"
        elif rec["finish_reason"] in ("error", "abort"):
            rec["error"] = f"finish_reason={rec['finish_reason']}"
        elif tokens == 0:
            rec["error"] = "no output tokens"
    return rec


async def run(args) -> tuple[list[dict], float, str, list[str], list[str]]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limit = args.concurrency_limit or args.requests
    client = httpx.AsyncClient(
        headers=headers,
        timeout=httpx.Timeout(connect=10.0, read=args.request_timeout_s, write=30.0, pool=None),
        limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit),
    )
    async with client:
        base, adapters = await fetch_models(client, args.url)
        models = [m.strip() for m in args.adapters.split(",") if m.strip()] or adapters + [base]
        work = make_workload(args, models)
        sem = asyncio.Semaphore(limit)
        bar = tqdm(total=len(work), desc="requests", file=sys.stderr, unit="req")
        start = time.perf_counter()
        deadline = start + args.duration_s

        async def send(item):
            try:
                async with sem:
                    rec = await one_request(client, args, item, base)
            except asyncio.CancelledError:  # still waiting for a --concurrency-limit slot at the cap
                return {"index": item["index"], "model": item["model"], "is_base": item["model"] == base,
                        "arrival_s": item["arrival_s"], "status": None, "output_tokens": 0,
                        "error": "cancelled at the --duration-s cap (never sent)"}
            rec["queued_s"] = rec.pop("sent_s") - start - item["arrival_s"]  # client-side wait for a slot
            bar.update(1)
            return rec

        tasks, not_sent = [], []
        for item in work:
            if start + item["arrival_s"] >= deadline:
                not_sent.append(item)
                continue
            delay = start + item["arrival_s"] - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(item)))
        if tasks:
            await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
        for t in tasks:
            if not t.done():
                t.cancel()
        records = list(await asyncio.gather(*tasks))
        bar.close()
        ends = [r["end_s"] for r in records if "end_s" in r]
        wall = (max(ends) if ends else time.perf_counter()) - start
        for r in records:
            r.pop("end_s", None)
        for item in not_sent:
            records.append({"index": item["index"], "model": item["model"], "is_base": item["model"] == base,
                            "arrival_s": item["arrival_s"], "status": None,
                            "error": "not sent: --duration-s cap reached", "output_tokens": 0})
        records.sort(key=lambda r: r["index"])
    return records, wall, base, adapters, models


def summarize(records: list[dict], wall: float, slo_ms: float) -> dict:
    ok = [r for r in records if r["error"] is None]
    tokens = sum(r["output_tokens"] for r in ok)
    per_token = [r["e2e_s"] / r["output_tokens"] for r in ok if r["output_tokens"]]
    met = sum(1 for x in per_token if x * 1000 <= slo_ms)
    errors: dict[str, int] = {}
    for r in records:
        if r["error"] is not None:
            key = str(r["status"]) if r["status"] not in (None, 200) else r["error"].split(":")[0]
            errors[key] = errors.get(key, 0) + 1

    def stats(key):
        xs = [r[key] for r in ok if r.get(key) is not None]
        return {"p50": pct(xs, 50), "p99": pct(xs, 99), "mean": float(np.mean(xs)) if xs else None}

    return {
        "requests": len(records), "completed": len(ok), "errors": len(records) - len(ok), "error_kinds": errors,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall if wall > 0 else None,
        "requests_per_s": len(ok) / wall if wall > 0 else None,
        "ttft_s": stats("ttft_s"), "tpot_s": stats("tpot_s"), "e2e_s": stats("e2e_s"),
        "max_gap_s": max((r.get("max_gap_s") or 0.0 for r in ok), default=None),
        "per_token_latency_s": {"p50": pct(per_token, 50), "p99": pct(per_token, 99)},
        "slo_ms": slo_ms, "slo_attainment": met / len(records) if records else None,
        "usage_vs_chunks_mismatch": sum(1 for r in ok if r.get("usage_tokens") is not None
                                        and r["usage_tokens"] != r.get("text_chunks")),
        "short_outputs": sum(1 for r in ok if r["output_tokens"] < r["max_tokens"]),
    }


def fmt(v, scale=1.0, digits=1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v * scale:.{digits}f}"


def print_table(groups: dict[str, dict], wall: float, slo_ms: float) -> None:
    names = list(groups)
    rows = [
        ("requests", lambda s: str(s["requests"])),
        ("errors", lambda s: str(s["errors"])),
        ("output tok/s", lambda s: fmt(s["output_tokens_per_s"])),
        ("requests/s", lambda s: fmt(s["requests_per_s"], digits=2)),
        ("TTFT p50 (ms)", lambda s: fmt(s["ttft_s"]["p50"], 1000)),
        ("TTFT p99 (ms)", lambda s: fmt(s["ttft_s"]["p99"], 1000)),
        ("TPOT p50 (ms)", lambda s: fmt(s["tpot_s"]["p50"], 1000)),
        ("TPOT p99 (ms)", lambda s: fmt(s["tpot_s"]["p99"], 1000)),
        ("E2E p50 (ms)", lambda s: fmt(s["e2e_s"]["p50"], 1000)),
        ("E2E p99 (ms)", lambda s: fmt(s["e2e_s"]["p99"], 1000)),
        ("ms/token p50", lambda s: fmt(s["per_token_latency_s"]["p50"], 1000)),
        (f"SLO<= {slo_ms:g}ms/tok", lambda s: fmt(s["slo_attainment"], 100) + "%"
         if s["slo_attainment"] is not None else "-"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"wall {wall:.2f} s (first send to last reply); throughput over that wall")
    print(f"{'':<{width}}  " + "  ".join(f"{n:>10}" for n in names))
    for label, get in rows:
        print(f"{label:<{width}}  " + "  ".join(f"{get(groups[n]):>10}" for n in names))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        records, wall, base, adapters, models = asyncio.run(run(args))
    except httpx.HTTPError as e:
        print(f"cannot reach {args.url}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    for r in records:
        r["max_tokens"] = args.output_tokens
    groups = {
        "all": summarize(records, wall, args.slo_ms),
        "base": summarize([r for r in records if r["is_base"]], wall, args.slo_ms),
        "adapters": summarize([r for r in records if not r["is_base"]], wall, args.slo_ms),
    }
    per_model = {m: summarize([r for r in records if r["model"] == m], wall, args.slo_ms) for m in models}
    print_table(groups, wall, args.slo_ms)
    kinds = groups["all"]["error_kinds"]
    if kinds:
        print("errors: " + ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())))
        first = next(r for r in records if r["error"] is not None)
        print(f"first error (request {first['index']}, {first['model']}): {first['error']}")
    if groups["all"]["usage_vs_chunks_mismatch"]:
        print(f"note: {groups['all']['usage_vs_chunks_mismatch']} requests had usage.completion_tokens != "
              "non-empty text chunks (tokens counted from usage)")
    if (groups["all"]["max_gap_s"] or 0.0) > 1.0:
        print(f"note: a stream went silent for {groups['all']['max_gap_s']:.2f} s between two chunks "
              "(per-request max_gap_s in the JSON)")
    if groups["all"]["short_outputs"]:
        print(f"note: {groups['all']['short_outputs']} completed requests returned fewer than "
              f"{args.output_tokens} tokens despite ignore_eos")
    result = {
        "header": {"device": args.device, "platform": platform.platform(), "python": platform.python_version(),
                   "url": args.url, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "args": {**vars(args), "api_key": "***" if args.api_key else ""}},
        "server": {"base_model": base, "adapters": adapters, "models_drawn": models},
        "wall_s": wall,
        "summary": groups,
        "per_model": per_model,
        "requests": records,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
