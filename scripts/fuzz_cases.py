"""The requests of the API fuzzer (scripts/fuzz_api.py): good greedy streaming completions, the
tables of bad values (wrong types, out-of-range numbers, unknown models, huge bodies, broken
encodings, bad headers, methods and paths, adapter loads outside the adapter root) and of
borderline ones (a 200 or a 4xx both pass), and `pick_bad`, which draws --num-bad of the bad ones.

Every generator takes the server's `Ctx` (its base model, adapters, context length, adapter root
and a scratch folder for symlinks) and returns `Case`s, which the script sends and judges.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

PROMPTS = ("def fibonacci(n):", "import os\nimport sys\n", "The capital of France is", "Once upon a time",
           "SELECT * FROM users WHERE", "// quicksort in C\nvoid sort(int *a, int n) {", "Dear Sir or Madam,",
           "1, 1, 2, 3, 5, 8,")
MISSING = object()  # a field left out of the body
BIG_BODY = 5 * 1024 * 1024  # above the default server.max_body_bytes (4 MiB)
JSON_TYPE = (("content-type", b"application/json"),)


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
    """Wrong-typed values per field of /v1/completions and /v1/chat/completions. A sampling field
    sent as null takes its default (as OpenAI's and vLLM's servers read it; a null or missing
    model is the base model's), so null is wrong only for the required fields (prompt, messages).
    Bools for ints and floats are wrong types too, though pydantic's lax mode takes them."""
    ints, floats = ["abc", True, {"a": 1}, [1], 1.5, "1e3"], ["hot", True, {"v": 1}, [0.5], "NaN"]
    bools, strs = ["maybe", 2, {"a": 1}, [True], 0.5], [5, True, {"a": 1}, ["x"], 1.5]
    sampling = {"model": strs, "max_tokens": ints, "temperature": floats, "top_p": floats,
                "n": ints, "stream": bools, "stop": [5, {"a": 1}, [1, 2], [None], [["a"]], True],
                "seed": ints, "logprobs": ["abc", {"a": 1}, [1], 1.5], "user": strs, "top_k": ints,
                "ignore_eos": bools, "stop_token_ids": ["1", [1.5], [True], [[1]], {"a": 1}, 5, ["x"]]}
    cmpl = dict(sampling, echo=bools, prompt=[5, True, {"a": 1}, None, [True, 1], [[1, "a"]], [1.5], [[]],
                                                      [], [["a"]], [None], [[1], ["a"]], ["a", 5]])
    def msgs(content, role="user"):
        return [{"role": role, "content": content}]
    chat = dict(sampling, max_completion_tokens=ints, messages=[
        "hi", {"role": "user"}, [], [1], None, [None], msgs("x", 5), [{"content": "x"}], msgs(5), msgs([1, 2]),
        msgs([{"type": "text", "text": 5}]), msgs([{"type": 7}]),
        msgs([{"type": "text", "text": ["a"]}])])
    return cmpl, chat


def range_table(ctx: Ctx) -> dict:
    inf = float("inf")
    return {"temperature": [float("nan"), -1, 1e300, inf, -inf], "top_p": [0, -0.1, 1.5, float("nan")],
            "top_k": [-5, 2**70, 2**63, -(2**63)], "seed": [2**64, -(2**70), 2**100],
            "max_tokens": [0, -1, 2**70, 2**63, -(2**70), ctx.max_len + 1], "n": [0, -1, 2**70],
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
        # (a body without `model` is for the base model, as vLLM's: a border case, not a bad one)
        name = "prompt" if ep == "cmpl" else "messages"
        out.append(jcase(f"missing:{ep}.{name}", path, with_fields(base, **{name: MISSING})))
        for name, values in range_table(ctx).items():
            if (ep, name) not in (("chat", "prompt"), ("cmpl", "max_completion_tokens")):
                hot = {"temperature": 1} if name in ("top_k", "top_p", "seed") else {}  # greedy would skip them
                out += [jcase(f"range:{ep}.{name}", path, with_fields(base, **{name: v}, **hot)) for v in values]
        out += [jcase(f"range:{ep}.stream+{k}", path, with_fields(base, **{"stream": True, "temperature": t, k: v}))
                for k, v, t in (("top_k", 2**70, 1), ("seed", 2**64, 1), ("temperature", 1e300, 1e300))]
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
    return out + encoding_variants(cmpl) + header_variants(cmpl) + admin_variants(ctx) + constraint_variants(cmpl, chat)


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                      "properties": {"a": {"enum": [1, 2]}}}}}]


def constraint_variants(cmpl: dict, chat: dict) -> list[Case]:
    """Structured outputs and forced tool calls that cannot be served: each a 4xx naming why."""
    bad = [("guided_regex", "([a"), ("guided_regex", 5), ("guided_choice", []), ("guided_choice", "ab"),
           ("guided_choice", [""]), ("guided_json", {"type": "nosuchtype"}), ("guided_json", "{"),
           ("guided_grammar", "root ::= "), ("structured_outputs", {"regex": "a", "json": "{}"}),
           ("structured_outputs", {"nosuchkind": 1}), ("structured_outputs", "a+"),
           ("response_format", {"type": "xml"}), ("response_format", {"type": "json_schema"}),
           ("guided_decoding_backend", "outlines")]
    out = [jcase(f"constraint:cmpl.{name}", "/v1/completions", with_fields(cmpl, **{name: v})) for name, v in bad]
    calls = [dict(tools=TOOLS), dict(tools=TOOLS, tool_choice="auto"), dict(tool_choice="required"),
             dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "g"}}),
             dict(tools=TOOLS, tool_choice="required", guided_regex="a"), dict(tools=TOOLS * 2, tool_choice="required"),
             dict(tools=[{"type": "function", "function": {"name": "f", "parameters": 1}}], tool_choice="required"),
             dict(tools=TOOLS, tool_choice={"type": "function"})]
    return out + [jcase("constraint:chat.tool_choice", "/v1/chat/completions", with_fields(chat, **kw)) for kw in calls]


def encoding_variants(cmpl: dict) -> list[Case]:
    ok, model = dumps(cmpl), cmpl["model"].encode()
    raw = [("invalid_utf8", b'{"model": "%s", "prompt": "\xff\xfe\xc3("}' % model, JSON_TYPE),
           ("invalid_utf8_key", b'{"mo\xffdel": 1}', JSON_TYPE), ("not_json", b"hello world", JSON_TYPE),
           ("truncated_json", ok[:-5], JSON_TYPE), ("empty_body", b"", JSON_TYPE), ("json_array", b"[1, 2]", JSON_TYPE),
           ("json_null", b"null", JSON_TYPE), ("json_number", b"5", JSON_TYPE),
           ("deep_nesting_1e5", b'{"model": "%s", "prompt": %s1%s}' % (model, b"[" * 10**5, b"]" * 10**5), JSON_TYPE),
           ("deep_object_1e5", b'{"x": ' + b'{"a": ' * 10**5 + b"1" + b"}" * 10**5 + b"}", JSON_TYPE),
           ("lone_surrogate_prompt", dumps(with_fields(cmpl, prompt="a\ud800b")), JSON_TYPE),
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
    # Valid edges: tiny temperatures sample greedily, a tiny top_p keeps one token, a stop string
    # no text can hold never matches, a role the template passes through is the template's call.
    c = [("temperature_1e-6", dict(temperature=1e-6)), ("top_p_1e-9", dict(top_p=1e-9)),
         ("temperature_1e-50", dict(temperature=1e-50)), ("top_p_1e-320", dict(top_p=1e-320, temperature=1)),
         ("lone_surrogate_stop", dict(stop=["\udfff"])),
         ("stream_temperature_1e-50", dict(stream=True, temperature=1e-50)),
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
         ("n_2", dict(n=2)),  # n completions: up to the server's limits.max_n
         ("max_tokens_8.0", dict(max_tokens=8.0)), ("seed_str", dict(seed="7", temperature=1)),
         ("other_fields", dict(frequency_penalty=0.5, best_of=1, logit_bias={"1": 5})),
         ("unknown_fields", dict(foo=1, metadata={"k": "v"})), ("suffix", dict(suffix="x")),
         ("stream_options_bad", dict(stream=True, stream_options="yes")),
         ("stream_usage", dict(stream=True, stream_options={"include_usage": True})),
         ("max_tokens_fill_context", dict(prompt=ids, max_tokens=ctx.max_len - len(ids), temperature=0)),
         ("no_model", dict(model=MISSING)),
         ("guided_regex", dict(guided_regex="[a-z]{1,5}")), ("guided_choice_logprobs", dict(guided_choice=["a", "b"],
                                                                                            logprobs=2)),
         ("structured_json_ignore_eos", dict(structured_outputs={"json_object": True}, ignore_eos=True))]
    out = [jcase(f"border:cmpl.{n}", "/v1/completions", with_fields(cmpl, **kw), "border") for n, kw in c]
    parts = [{"type": "text", "text": "Hi"}, {"type": "image_url"}]
    h = [("chat_parts", dict(messages=[{"role": "user", "content": parts}])),
         ("chat_system", dict(messages=[{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"}])),
         ("chat_null_content", dict(messages=[{"role": "user", "content": None}])),
         ("null_sampling_fields", dict(temperature=None, top_p=None, n=None, stream=None, top_k=None)),
         ("chat_both_limits", dict(max_tokens=4, max_completion_tokens=6)),
         ("chat_no_max_tokens", dict(max_tokens=MISSING)), ("chat_stream", dict(stream=True)),
         ("chat_unknown_role", dict(messages=[{"role": "nobody", "content": "x"}])),
         ("chat_no_model", dict(model=MISSING)),
         ("chat_json_object", dict(response_format={"type": "json_object"}, max_tokens=16)),
         ("chat_json_schema_stream", dict(stream=True, response_format={"type": "json_schema", "json_schema": {
             "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}})),
         ("chat_tool_required", dict(tools=TOOLS, tool_choice="required")),
         ("chat_tool_named_stream", dict(stream=True, tools=TOOLS,
                                         tool_choice={"type": "function", "function": {"name": "f"}})),
         ("chat_guided_choice_n", dict(guided_choice=["yes", "no"], n=2, temperature=1, seed=3))]
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
