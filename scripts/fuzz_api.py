"""API fuzzer: bad and borderline requests mixed with good streaming ones, against a RUNNING server.

    python scripts/fuzz_api.py --url http://127.0.0.1:8000 [--api-key KEY] [--pid PID] [--seed 0]
        [--num-bad 300] [--num-good 30] [--max-tokens 32] [--concurrency 8] [--timeout 30]
        [--max-replays 80] [--output profiles/reliability/fuzz.json]

Clean run: the good requests (greedy streaming completions, fixed prompts, every model /v1/models
lists) alone, as the reference. Mixed run: the same shuffled (seeded) among --num-bad bad requests
(every class at least once) and the borderline ones, --concurrency at a time. Good ones must give the
reference's chunks and token counts; bad ones a 4xx (a 2xx is listed as "accepted"); borderline ones
a 200 or a 4xx. A 5xx, in-stream error, connection error or timeout is a failure. Then /health and one
more good request must work; VmRSS of --pid is read before/after; each distinct failing request is
replayed alone on a fresh connection (a culprit fails again, a bystander of another's failure does not).
Exit 0 only if every good request completed with equal tokens, no 5xx/error/timeout, healthy after.

The requests themselves (good, bad, borderline) are generated in scripts/fuzz_cases.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx
from fuzz_cases import Case, Ctx, bad_variants, border_cases, good_cases, pick_bad

OK = {"good": ("2xx",), "bad": ("4xx",), "border": ("2xx", "4xx")}  # the outcomes that pass, per kind


@dataclass
class Result:
    status: int | None = None
    body: str = ""
    error: str | None = None  # connection error, timeout, broken or failed stream
    chunks: list[str] = field(default_factory=list)
    tokens: int | None = None

    @property
    def outcome(self) -> str:
        if self.error is not None or self.status is None:
            return "5xx" if self.error and self.error.startswith("in-stream") else "err"
        return f"{self.status // 100}xx" if self.status // 100 in (2, 4, 5) else "err"

    def brief(self, n: int = 200) -> str:
        return f"{self.status} {(self.error or self.body)[:n]!r}"


async def body_chunks(data: bytes):
    for i in range(0, len(data), 65536):
        yield data[i:i + 65536]


async def read_sse(r: httpx.Response) -> Result:
    res, done, finish = Result(r.status_code), False, None
    async for line in r.aiter_lines():
        if line == "data: [DONE]":
            done = True
            break
        if not line.startswith("data: "):
            continue
        msg = json.loads(line[6:])
        if "error" in msg:
            res.error = f"in-stream error: {msg['error']}"
        for ch in msg.get("choices") or []:
            res.chunks.append(ch.get("text") or (ch.get("delta") or {}).get("content") or "")
            finish = ch.get("finish_reason") or finish
        res.tokens = (msg.get("usage") or {}).get("completion_tokens", res.tokens)
    if finish == "error":
        res.error = "in-stream error: finish_reason=error"
    elif not done and res.error is None:
        res.error = "stream ended without [DONE]"
    res.body = "".join(res.chunks)[:200]
    return res


async def send_once(client: httpx.AsyncClient, case: Case, timeout_s: float) -> Result:
    async def go():
        content = body_chunks(case.content) if case.chunked else case.content
        async with client.stream(case.method, case.path, content=content, headers=list(case.headers)) as r:
            if r.status_code == 200 and r.headers.get("content-type", "").startswith("text/event-stream"):
                return await read_sse(r)
            return Result(r.status_code, (await r.aread())[:300].decode("utf-8", "replace"))
    try:
        return await asyncio.wait_for(go(), timeout_s)
    except asyncio.TimeoutError:
        return Result(error=f"timeout after {timeout_s:g} s")
    except (httpx.HTTPError, ValueError) as e:
        return Result(error=f"{type(e).__name__}: {str(e)[:200]}")


async def run_cases(client, cases: list[Case], concurrency: int, timeout_s: float) -> list[list[Result]]:
    results: list[list[Result]] = [[] for _ in cases]
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(len(cases)):
        queue.put_nowait(i)

    async def worker():
        while not queue.empty():
            i = queue.get_nowait()
            sends = (send_once(client, cases[i], timeout_s) for _ in range(cases[i].repeat))
            results[i] = list(await asyncio.gather(*sends))
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def rss_kb(pid: int | None) -> int | None:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines() if pid else []
    return next((int(ln.split()[1]) for ln in lines if ln.startswith("VmRSS:")), None)


def short(content: bytes | None, n: int = 160) -> str:
    r = repr((content or b"")[: n * 2])
    return r if len(r) <= n else r[:n] + f"...({len(content or b'')} bytes)"


def provenance(argv: list[str], note: str) -> dict:
    def git(*a):
        root = Path(__file__).resolve().parent.parent
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=root).stdout.rstrip()
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor() or platform.machine())
    return {"command": " ".join([sys.executable, *argv]), "date": datetime.now(timezone.utc).isoformat(),
            "machine": cpu, "platform": platform.platform(), "git_commit": git("rev-parse", "HEAD"),
            "git_status": git("status", "--short").splitlines(), "note": note}


async def fetch_ctx(client: httpx.AsyncClient, tmp: str) -> Ctx:
    cards = (await client.get("/v1/models")).raise_for_status().json()["data"]
    base = next(c for c in cards if not c.get("parent"))
    roots = [c["root"] for c in cards if c.get("parent") and c.get("root")]
    return Ctx(base["id"], tuple(c["id"] for c in cards if c.get("parent")), int(base.get("max_model_len") or 2048),
               str(Path(roots[0]).parent) if roots else "/nonexistent-adapter-root", tmp)


def compare_good(good: list[Case], clean: list[list[Result]], mixed: list[list[Result]]) -> list[dict]:
    return [{"index": i, "body": short(c.content), "outcome": got.outcome, "error": got.error, "tokens": [ref.tokens,
             got.tokens], "clean": "".join(ref.chunks)[:120], "mixed": "".join(got.chunks)[:120]}
            for i, (c, [ref], [got]) in enumerate(zip(good, clean, mixed))
            if got.outcome != "2xx" or (got.chunks, got.tokens) != (ref.chunks, ref.tokens)]


def tabulate(cases: list[Case], results: list[list[Result]]) -> tuple[list[dict], list[tuple[Case, Result]]]:
    rows: dict[str, dict] = {}
    failing = []
    for c, rs in zip(cases, results):
        row = rows.setdefault(c.cls, {"class": c.cls, "kind": c.kind, "sent": 0, "2xx": 0, "4xx": 0, "5xx": 0,
                                      "err": 0, "statuses": Counter()})
        for r in rs:
            row["sent"] += 1
            row[r.outcome] += 1
            row["statuses"][str(r.status)] += 1
            if r.outcome not in OK[c.kind]:
                failing.append((c, r))
    return [dict(r, statuses=dict(r["statuses"])) for r in rows.values()], failing


def client(args, keepalive: bool = True) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=args.concurrency * 2, max_keepalive_connections=None if keepalive else 0)
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return httpx.AsyncClient(base_url=args.url, headers=headers, timeout=args.timeout, limits=limits)


async def replay_alone(args, cases: list[Case]) -> dict[tuple, str]:
    """Each distinct failing request once more, alone, on a fresh connection."""
    alone: dict[tuple, str] = {}
    async with client(args, keepalive=False) as c:
        for case in cases:
            key = (case.path, case.content, case.headers)
            if key not in alone and len(alone) < args.max_replays:
                r = await send_once(c, case, args.timeout)
                alone[key] = f"{r.outcome} {r.brief(100)}"
    return alone


async def fuzz(args) -> dict:
    t0 = time.perf_counter()
    async with client(args) as c:
        with tempfile.TemporaryDirectory(prefix="fuzz_api_") as tmp:
            ctx = await fetch_ctx(c, tmp)
            rng = random.Random(args.seed)
            good, variants, border = good_cases(ctx, args.num_good, args.max_tokens), bad_variants(ctx, rng), \
                border_cases(ctx)
            everything = good + pick_bad(variants, args.num_bad, rng) + border
            rss = {"start_kb": rss_kb(args.pid)}
            clean = await run_cases(c, good, args.concurrency, args.timeout)
            rss["after_clean_kb"] = rss_kb(args.pid)
            order = list(range(len(everything)))
            rng.shuffle(order)
            cases = [everything[i] for i in order]
            t1 = time.perf_counter()
            results = await run_cases(c, cases, args.concurrency, args.timeout)
            mixed_s = time.perf_counter() - t1
            by_index = dict(zip(order, results))
            health = await send_once(c, Case("health", "good", "/health", None, (), "GET"), args.timeout)
            again = await send_once(c, good[0], args.timeout)
            await asyncio.sleep(1.0)
            rss["end_kb"] = rss_kb(args.pid)
    rows, failing = tabulate(cases, results)
    alone = await replay_alone(args, [fc for fc, _ in failing if fc.kind != "good"]) if args.max_replays else {}
    broken = compare_good(good, clean, [by_index[i] for i in range(len(good))])
    again_ok = again.outcome == "2xx" and (again.chunks, again.tokens) == (clean[0][0].chunks, clean[0][0].tokens)

    def total(col, kinds=("good", "bad", "border")):
        return sum(r[col] for r in rows if r["kind"] in kinds)
    s = {"good_completed": total("2xx", ("good",)), "good_total": len(good),
         "clean_run_ok": all(r[0].outcome == "2xx" for r in clean), "bad_4xx": total("4xx", ("bad",)),
         "bad_total": total("sent", ("bad",)), "bad_accepted_2xx": total("2xx", ("bad",)),
         "border_200": total("2xx", ("border",)), "border_4xx": total("4xx", ("border",)), "5xx": total("5xx"),
         "errors_timeouts": total("err"), "healthy": health.status == 200 and again_ok,
         "health_status": health.status, "good_after_ok": again_ok, "rss_kb": rss, "mixed_run_s": round(mixed_s, 1),
         "total_s": round(time.perf_counter() - t0, 1), "distinct_bad_variants": len(variants)}
    s["tokens_equal"] = s["clean_run_ok"] and not broken
    s["fail_alone"] = sorted({fc.cls for fc, _ in failing if alone.get((fc.path, fc.content, fc.headers), "")[:3]
                              in ("5xx", "err")})
    s["passed"] = (s["good_completed"] == len(good) and s["tokens_equal"] and s["5xx"] == 0
                   and s["errors_timeouts"] == 0 and s["healthy"])

    def describe(fc: Case, r: Result) -> dict:
        d = {"class": fc.cls, "kind": fc.kind, "outcome": r.outcome, "body": short(fc.content), "response": r.brief()}
        key = (fc.path, fc.content, fc.headers)
        return dict(d, alone=alone[key]) if key in alone else d
    accepted = [fc.kind == "bad" and r.outcome == "2xx" for fc, r in failing]
    border_out = [{"class": bc.cls, "outcome": [r.outcome for r in rs], "response": [r.brief(100) for r in rs]}
                  for bc, rs in zip(cases, results) if bc.kind == "border"]
    return {"header": provenance(sys.argv, args.note), "args": vars(args), "summary": s, "classes": rows,
            "failures": [describe(fc, r) for (fc, r), a in zip(failing, accepted) if not a],
            "bad_accepted": [describe(fc, r) for (fc, r), a in zip(failing, accepted) if a], "border": border_out,
            "broken_good": broken}


def report(res: dict) -> None:
    print(f"{'class':44} {'kind':6} {'sent':>5} {'2xx':>5} {'4xx':>5} {'5xx':>5} {'err':>5}")
    for r in sorted(res["classes"], key=lambda r: (r["kind"], r["class"])):
        flag = " <-" if r["5xx"] or r["err"] or (r["kind"] == "bad" and r["2xx"]) else ""
        cols = " ".join(f"{r[k]:5}" for k in ("sent", "2xx", "4xx", "5xx", "err"))
        print(f"{r['class'][:44]:44} {r['kind']:6} {cols}{flag}")
    for title, items, samples in (
            ("FAILURES (5xx / error / timeout; alone = that request replayed by itself)", res["failures"], 2),
            ("bad requests accepted (2xx)", res["bad_accepted"], 1),
            ("good requests broken in the mixed run", res["broken_good"], 2)):
        by_class: dict[str, list[dict]] = {}
        for f in items:
            by_class.setdefault(f.get("class", "good:stream"), []).append(f)
        if items:
            print(f"\n{title}: {len(items)}")
        for cls, fs in sorted(by_class.items(), key=lambda kv: not any(f.get("alone", "")[:3] == "5xx" for f in kv[1])):
            alone = Counter(f["alone"].split(" ")[0] for f in fs if "alone" in f)
            print(f"  {cls} x{len(fs)}" + (f" (alone: {dict(alone)})" if alone else ""))
            for f in fs[:samples]:
                print("     " + json.dumps({k: v for k, v in f.items() if k not in ("class", "kind")})[:300])
    border = sorted(f"{b['class'].split(':', 1)[1]}={'/'.join(b['outcome'])}" for b in res["border"])
    print("\nborderline: " + ", ".join(border))
    s = res["summary"]
    print(f"\ngood completed {s['good_completed']}/{s['good_total']}, tokens equal: {s['tokens_equal']}; "
          f"bad 4xx {s['bad_4xx']}/{s['bad_total']} (accepted 2xx: {s['bad_accepted_2xx']}); "
          f"border 200/4xx: {s['border_200']}/{s['border_4xx']}; 5xx: {s['5xx']}; errors/timeouts: "
          f"{s['errors_timeouts']} (classes failing alone: {', '.join(s['fail_alone']) or 'none'}); "
          f"healthy: {s['healthy']}; RSS kB: {s['rss_kb']}; "
          f"mixed run {s['mixed_run_s']} s, total {s['total_s']} s -> {'PASS' if s['passed'] else 'FAIL'}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--api-key", default="")
    p.add_argument("--pid", type=int, default=None, help="the server's process id, for VmRSS before/after")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-bad", type=int, default=300)
    p.add_argument("--num-good", type=int, default=30)
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of the good requests")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds before a request counts as hung")
    p.add_argument("--max-replays", type=int, default=80, help="failing requests replayed alone (0: none)")
    p.add_argument("--output", default="", help="JSON report path (e.g. profiles/reliability/fuzz.json)")
    p.add_argument("--note", default="", help="free text for the header (e.g. which build the server runs)")
    args = p.parse_args()
    try:  # a server that is not there is one line, not a report of nothing but connection errors
        httpx.get(args.url.rstrip("/") + "/health", timeout=10)
    except httpx.HTTPError as e:
        print(f"cannot reach {args.url}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    res = asyncio.run(fuzz(args))
    report(res)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(res, indent=1, default=str))
    return 0 if res["summary"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
