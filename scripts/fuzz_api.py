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

PROMPTS = ("def fibonacci(n):", "import os\nimport sys\n", "The capital of France is", "Once upon a time",
           "SELECT * FROM users WHERE", "// quicksort in C\nvoid sort(int *a, int n) {", "Dear Sir or Madam,",
           "1, 1, 2, 3, 5, 8,")
MISSING = object()  # a field left out of the body
BIG_BODY = 5 * 1024 * 1024  # above the default server.max_body_bytes (4 MiB)
JSON_TYPE = (("content-type", b"application/json"),)
OK = {"good": ("2xx",), "bad": ("4xx",), "border": ("2xx", "4xx")}  # the outcomes that pass, per kind


@dataclass(frozen=True)
class Case:
    cls: str
    kind: str  # good | bad | border
    path: str
    content: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = JSON_TYPE
    method: str = "POST"
    chunked: bool = False  # sent as a chunked body (no content-length)
    repeat: int = 1  # sent this many times at once (duplicate X-Request-Id)
    heavy: bool = False  # never repeated when padding up to --num-bad


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


@dataclass(frozen=True)
class Ctx:
    base: str
    adapters: tuple[str, ...]
    max_len: int
    adapter_root: str
    tmp: str


def dumps(obj) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


def jcase(cls, path, body, kind="bad", heavy=False, headers=()) -> Case:
    return Case(cls, kind, path, dumps(body), JSON_TYPE + tuple(headers), heavy=heavy)


def with_fields(base: dict, **kw) -> dict:
    body = dict(base)
    for k, v in kw.items():
        body[k] = v
        if v is MISSING:
            del body[k]
    return body


def good_cases(ctx: Ctx, n: int, max_tokens: int) -> list[Case]:
    models = (ctx.base,) + ctx.adapters
    return [jcase("good:stream", "/v1/completions", {
        "model": models[i % len(models)], "prompt": PROMPTS[i % len(PROMPTS)], "stream": True, "temperature": 0,
        "max_tokens": max_tokens, "stream_options": {"include_usage": True}}, kind="good") for i in range(n)]


def type_tables() -> tuple[dict, dict]:
    """Wrong-typed values per field of /v1/completions and /v1/chat/completions (null only where the
    field is not nullable). Bools for ints and floats are wrong types too, though pydantic's lax mode
    takes them."""
    ints, floats = ["abc", True, {"a": 1}, [1], 1.5, "1e3"], ["hot", True, {"v": 1}, [0.5], "NaN"]
    bools, strs = ["maybe", 2, {"a": 1}, [True], 0.5], [5, True, {"a": 1}, ["x"], 1.5]
    sampling = {"model": strs + [None], "max_tokens": ints, "temperature": floats + [None], "top_p": floats + [None],
                "n": ints + [None], "stream": bools + [None], "stop": [5, {"a": 1}, [1, 2], [None], [["a"]], True],
                "seed": ints, "logprobs": ["abc", {"a": 1}, [1], 1.5], "user": strs, "top_k": ints + [None],
                "ignore_eos": bools + [None], "stop_token_ids": ["1", [1.5], [True], [[1]], {"a": 1}, 5, ["x"]]}
    cmpl = dict(sampling, echo=bools + [None], prompt=[5, True, {"a": 1}, None, [True, 1], [[1, "a"]], [1.5], [[]],
                                                      [], [["a"]], [None], [[1], [2]], ["a", "b"]])
    def msgs(content, role="user"):
        return [{"role": role, "content": content}]
    chat = dict(sampling, max_completion_tokens=ints, messages=[
        "hi", {"role": "user"}, [], [1], None, [None], msgs("x", 5), [{"content": "x"}], msgs(5), msgs([1, 2]),
        msgs("x", "nobody"), msgs([{"type": "text", "text": 5}]), msgs([{"type": 7}]),
        msgs([{"type": "text", "text": ["a"]}])])
    return cmpl, chat


def range_table(ctx: Ctx) -> dict:
    inf = float("inf")
    return {"temperature": [float("nan"), -1, 1e-50, 1e300, inf, -inf], "top_p": [0, -0.1, 1.5, 1e-320, float("nan")],
            "top_k": [-5, 2**70, 2**63, -(2**63)], "seed": [2**64, -(2**70), 2**100],
            "max_tokens": [0, -1, 2**70, 2**63, -(2**70), ctx.max_len + 1], "n": [2, 0, -1, 2**70],
            "logprobs": [10**6, -1, 2**70], "stop_token_ids": [[2**70], [-1], [2**63], [10**12], [-(2**70)]],
            "prompt": [[10**7], [-1], [2**70], [2**31], [0, 2**63], list(range(ctx.max_len + 1))],
            "max_completion_tokens": [0, -1, 2**70]}


def bad_variants(ctx: Ctx, rng: random.Random) -> list[Case]:
    cmpl = {"model": ctx.base, "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    chat = {"model": ctx.base, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
    out = []
    for (ep, path, base), types in zip((("cmpl", "/v1/completions", cmpl), ("chat", "/v1/chat/completions", chat)),
                                       type_tables()):
        for name, values in types.items():
            out += [jcase(f"type:{ep}.{name}", path, with_fields(base, **{name: v})) for v in values]
        for name in ("model", "prompt" if ep == "cmpl" else "messages"):
            out.append(jcase(f"missing:{ep}.{name}", path, with_fields(base, **{name: MISSING})))
        for name, values in range_table(ctx).items():
            if (ep, name) not in (("chat", "prompt"), ("cmpl", "max_completion_tokens")):
                hot = {"temperature": 1} if name in ("top_k", "top_p", "seed") else {}  # greedy would skip them
                out += [jcase(f"range:{ep}.{name}", path, with_fields(base, **{name: v}, **hot)) for v in values]
        out += [jcase(f"range:{ep}.stream+{k}", path, with_fields(base, **{"stream": True, "temperature": t, k: v}))
                for k, v, t in (("top_k", 2**70, 1), ("seed", 2**64, 1), ("temperature", 1e-50, 1e-50),
                                ("top_p", 1e-320, 1))]
        out += [jcase(f"{cls.replace('@', ep)}", path, with_fields(base, **kw), heavy=True) for cls, kw in (
            ("range:@.stop_token_ids_1e5", {"stop_token_ids": list(range(10**5))}),
            ("huge:@.stop_1e4", {"stop": [f"s{i}" for i in range(10**4)]}),
            ("huge:@.stop_1MB", {"stop": ["x" * 2**20]}))]
        models = ("no-such-model", "", ctx.base.upper(), " " + ctx.base, "../" + ctx.base, "x" * 10**4, "\ud800",
                  "m\x00")
        out += [jcase(f"model:{ep}.unknown", path, with_fields(base, model=m)) for m in models]
    words = " ".join(rng.choice(("lorem", "ipsum", "dolor", "sit", "amet")) for _ in range(600_000))
    out += [jcase(cls, path, body, heavy=True) for cls, path, body in (
        ("huge:cmpl.prompt_3MB", "/v1/completions", with_fields(cmpl, prompt=words)),
        ("huge:cmpl.prompt_ids_1e5", "/v1/completions", with_fields(cmpl, prompt=[rng.randrange(100, 1000)] * 10**5)),
        ("huge:chat.messages_5000", "/v1/chat/completions", with_fields(chat, messages=chat["messages"] * 5000)),
        ("huge:body_5MB", "/v1/completions", with_fields(cmpl, prompt="a" * BIG_BODY)))]
    out.append(Case("huge:chunked_5MB", "bad", "/v1/completions", dumps(with_fields(cmpl, prompt="a" * BIG_BODY)),
                    chunked=True, heavy=True))
    return out + encoding_variants(cmpl) + header_variants(cmpl) + admin_variants(ctx)


def encoding_variants(cmpl: dict) -> list[Case]:
    ok, model = dumps(cmpl), cmpl["model"].encode()
    raw = [("invalid_utf8", b'{"model": "%s", "prompt": "\xff\xfe\xc3("}' % model, JSON_TYPE),
           ("invalid_utf8_key", b'{"mo\xffdel": 1}', JSON_TYPE), ("not_json", b"hello world", JSON_TYPE),
           ("truncated_json", ok[:-5], JSON_TYPE), ("empty_body", b"", JSON_TYPE), ("json_array", b"[1, 2]", JSON_TYPE),
           ("json_null", b"null", JSON_TYPE), ("json_number", b"5", JSON_TYPE),
           ("deep_nesting_1e5", b'{"model": "%s", "prompt": %s1%s}' % (model, b"[" * 10**5, b"]" * 10**5), JSON_TYPE),
           ("deep_object_1e5", b'{"x": ' + b'{"a": ' * 10**5 + b"1" + b"}" * 10**5 + b"}", JSON_TYPE),
           ("lone_surrogate_prompt", dumps(with_fields(cmpl, prompt="a\ud800b")), JSON_TYPE),
           ("lone_surrogate_stop", dumps(with_fields(cmpl, stop=["\udfff"])), JSON_TYPE),
           ("content_type_text", ok, (("content-type", b"text/plain"),)),
           ("content_type_form", ok, (("content-type", b"application/x-www-form-urlencoded"),)),
           ("content_type_garbage", ok, (("content-type", b"\xff/\xfe"),)), ("no_content_type", ok, ())]
    return [Case(f"enc:{name}", "bad", "/v1/completions", body, hdrs, heavy=name.startswith("deep"))
            for name, body, hdrs in raw]


def header_variants(cmpl: dict) -> list[Case]:
    ids = [b"x" * 129, b"has space", b"", b"\xff\xfe", b"a/b", b"\xe2\x9c\x93", b"../../etc", b"a\tb"]
    return [jcase("header:x-request-id", "/v1/completions", cmpl, headers=[("x-request-id", i)]) for i in ids] + [
        Case("method:get_completions", "bad", "/v1/completions", None, (), "GET"),
        Case("method:put_models", "bad", "/v1/models", dumps({}), method="PUT"),
        Case("path:unknown", "bad", "/v1/nothing-here", dumps(cmpl)),
        Case("path:dotdot", "bad", "/v1/../../etc/passwd", None, (), "GET")]


def admin_variants(ctx: Ctx) -> list[Case]:
    tmp, root = Path(ctx.tmp), ctx.adapter_root
    (tmp / "to_etc").symlink_to("/etc")
    (tmp / "to_root_parent").symlink_to(Path(root).parent)
    paths = ["/etc", "/tmp", f"{root}/../..", f"{root}/../../../etc", str(tmp / "to_etc"), str(tmp / "to_root_parent"),
             "/tmp/a\x00b", f"{root}/\x00", root, f"{root}/no-such-adapter", "", "~root/../etc", "/dev/zero", "\ud800"]
    load = [{"lora_name": f"fuzz{i}", "lora_path": p} for i, p in enumerate(paths)]
    load += [{}, {"lora_name": "fuzz-x"}, {"lora_path": root}, {"lora_name": 5, "lora_path": root},
             {"lora_name": "fuzz-y", "lora_path": 5}, {"lora_name": None, "lora_path": None},
             {"lora_name": "", "lora_path": "/etc"}, {"lora_name": "../x", "lora_path": root},
             {"lora_name": "a/b", "lora_path": root}, {"lora_name": "n" * 5000, "lora_path": root},
             {"lora_name": ctx.base, "lora_path": root}, {"lora_name": "\ud800", "lora_path": root}]
    if ctx.adapters:  # a served name, pointing at a sibling folder inside the root
        load.append({"lora_name": ctx.adapters[0], "lora_path": f"{root}/{ctx.adapters[-1]}"})
    unload = [{"lora_name": "no-such-adapter"}, {"lora_name": ""}, {"lora_name": ctx.base}, {"lora_name": "x" * 5000},
              {"lora_name": "\ud800"}, {}, {"lora_name": 5}, {"lora_name": None}, {"lora_name": [ctx.base]}]
    return ([jcase("admin:load", "/v1/load_lora_adapter", b) for b in load]
            + [jcase("admin:unload", "/v1/unload_lora_adapter", b) for b in unload]
            + [Case("admin:load_not_json", "bad", "/v1/load_lora_adapter", b"{lora_name: x}")])


def border_cases(ctx: Ctx) -> list[Case]:
    cmpl = {"model": ctx.adapters[0] if ctx.adapters else ctx.base, "prompt": "Hello", "max_tokens": 8}
    chat = {"model": ctx.base, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
    ids = list(range(100, 108))
    c = [("temperature_1e-6", dict(temperature=1e-6)), ("top_p_1e-9", dict(top_p=1e-9)),
         ("seed_2**63-1", dict(seed=2**63 - 1, temperature=1)), ("seed_0", dict(seed=0, temperature=1)),
         ("seed_-1", dict(seed=-1, temperature=1)), ("top_k_1e9", dict(top_k=10**9)), ("top_k_0", dict(top_k=0)),
         ("top_k_1", dict(top_k=1, temperature=1)), ("temperature_-0.0", dict(temperature=-0.0)),
         ("unicode_prompt", dict(prompt="Ünïcödé ✓ 中文 עברית")), ("emoji_prompt", dict(prompt="🦙🔥👩‍👩‍👧‍👦" * 20)),
         ("nul_prompt", dict(prompt="a\x00b\x00")), ("control_chars_prompt", dict(prompt="\x01\x1b[31m\x7f\r\n")),
         ("empty_stop_list", dict(stop=[])), ("empty_prompt", dict(prompt="")), ("space_prompt", dict(prompt=" ")),
         ("empty_string_stop", dict(stop=[""])), ("stop_space", dict(stop=" ")), ("stop_emoji", dict(stop=["🦙"])),
         ("max_tokens_1", dict(max_tokens=1)), ("logprobs_0", dict(logprobs=0)), ("logprobs_5", dict(logprobs=5)),
         ("logprobs_true", dict(logprobs=True)), ("batched_prompt_1", dict(prompt=["Hello"])),
         ("batched_ids_1", dict(prompt=[ids])), ("prompt_ids", dict(prompt=ids)), ("ignore_eos", dict(ignore_eos=True)),
         ("stop_token_ids_empty", dict(stop_token_ids=[])), ("user_10k", dict(user="u" * 10000)), ("n_1", dict(n=1)),
         ("max_tokens_8.0", dict(max_tokens=8.0)), ("seed_str", dict(seed="7", temperature=1)),
         ("unknown_fields", dict(frequency_penalty=0.5, best_of=1, suffix="x", logit_bias={"1": 5})),
         ("stream_options_bad", dict(stream=True, stream_options="yes")),
         ("stream_usage", dict(stream=True, stream_options={"include_usage": True})),
         ("max_tokens_fill_context", dict(prompt=ids, max_tokens=ctx.max_len - len(ids), temperature=0))]
    out = [jcase(f"border:cmpl.{n}", "/v1/completions", with_fields(cmpl, **kw), "border") for n, kw in c]
    parts = [{"type": "text", "text": "Hi"}, {"type": "image_url"}]
    h = [("chat_parts", dict(messages=[{"role": "user", "content": parts}])),
         ("chat_system", dict(messages=[{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"}])),
         ("chat_null_content", dict(messages=[{"role": "user", "content": None}])),
         ("chat_both_limits", dict(max_tokens=4, max_completion_tokens=6)),
         ("chat_no_max_tokens", dict(max_tokens=MISSING)), ("chat_stream", dict(stream=True))]
    out += [jcase(f"border:{n}", "/v1/chat/completions", with_fields(chat, **kw), "border") for n, kw in h]
    body = dumps(with_fields(cmpl, temperature=0))
    return out + [
        Case("border:enc.bom", "border", "/v1/completions", b"\xef\xbb\xbf" + body),
        Case("border:enc.utf16", "border", "/v1/completions", body.decode().encode("utf-16")),
        Case("border:enc.duplicate_keys", "border", "/v1/completions", body[:-1] + b', "max_tokens": 2}'),
        Case("border:enc.charset", "border", "/v1/completions", body,
             (("content-type", b"application/json; charset=utf-8"),)),
        Case("border:duplicate_request_id", "border", "/v1/completions", dumps(with_fields(cmpl, max_tokens=48)),
             JSON_TYPE + (("x-request-id", b"fuzz-dup-1"),), repeat=2)]


def pick_bad(variants: list[Case], n: int, rng: random.Random) -> list[Case]:
    """One variant of every class first, then the other variants, then repeats of light ones, up to n."""
    rng.shuffle(variants)
    firsts = list({v.cls: v for v in reversed(variants)}.values())
    rest = [v for v in variants if id(v) not in {id(f) for f in firsts}]
    light = [v for v in variants if not v.heavy]
    return (firsts + rest)[:n] + [rng.choice(light) for _ in range(n - len(variants))]


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
    res = asyncio.run(fuzz(args))
    report(res)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(res, indent=1, default=str))
    return 0 if res["summary"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
