"""Typed, validated configuration.

Entry points compose YAML with Hydra and hand the plain dict to `*.from_dict`; library code only
sees these frozen dataclasses, so `Engine(EngineConfig(...))` works from plain Python too.
`from_dict` checks every value against its field's annotation and refuses unknown keys, naming
the key as the command line spells it (`engine.max_batch_size`); the checks are in
caraserve/config_checks.py.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caraserve.config_checks import (  # noqa: F401  (re-exported)
    ConfigError,
    _check,
    _check_template,
    check_devices,
    check_fields,
    check_keys,
    dataclass_from_dict,
    inline_template,
    resolve_device,
    show,
    unknown_key,
)

DTYPES = ("float32", "float16", "bfloat16", "auto")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral", "pythonic")  # caraserve.serve.tool_parsers
REASONING_PARSERS = ("deepseek_r1", "qwen3")  # caraserve.serve.reasoning
SCHEDULING_POLICIES = ("fcfs", "priority")


@dataclass(frozen=True)
class ModelConfig:
    """Where the base model comes from and how it is placed.

    path: a Hugging Face folder, or "tiny" for the embedded default (made locally, cached).
    max_memory_bytes: per-device budget for accelerate's placement, keyed by CUDA device index or
    "cpu", e.g. {"0": 20_000_000_000, "1": 20_000_000_000} (on the command line
    'model.max_memory_bytes={0: 20e9, 1: 20e9}'); empty means "everything on engine.device".
    """

    path: str = "tiny"
    dtype: str = "auto"
    served_name: str = ""
    max_memory_bytes: dict[str, int] = field(default_factory=dict)
    # sampling defaults for what a request does not set (caraserve.model.generation_config): auto
    # = the model folder's generation_config.json (as vLLM's server), none = the engine's own, or
    # a folder holding a generation_config.json
    generation_config: str = "auto"
    # values over the file's, a null dropping one (vLLM's --override-generation-config), e.g.
    # 'model.override_generation_config={temperature: 0.5}' (checked by sampling_defaults)
    override_generation_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        check_fields(self, "model")
        _check(bool(self.path), "model.path must not be empty")
        _check(self.dtype in DTYPES, f"model.dtype={self.dtype!r} is not one of {DTYPES}")
        _check(bool(self.generation_config), "model.generation_config must be auto, none or a folder")
        for dev, budget in self.max_memory_bytes.items():
            _check(str(dev).isdigit() or dev == "cpu",
                   f"model.max_memory_bytes: the key {dev!r} must be a CUDA device index (0, 1, ...) or cpu")
            _check(budget > 0, f"model.max_memory_bytes.{dev}={budget} must be > 0")

    @classmethod
    def from_dict(cls, data, where="model"):
        return dataclass_from_dict(cls, data, where)


@dataclass(frozen=True)
class AdapterConfig:
    """The adapter catalogue (host tier) and the device slot pool.

    rank_buckets: slot ranks; an adapter goes to the smallest bucket >= its rank.
    device_slots: slots per bucket on the device (int: same for every bucket).
    host_mem_bytes: host-tier budget; least-recently-used adapters beyond it are dropped and
    re-read from disk when needed (-1 = a quarter of the machine's memory, 0 = unbounded).
    max_registered: adapters that may be registered at once (start-up and runtime loads).
    max_file_bytes: an adapter file (config or weights) larger than this is refused.
    resolve_dirs: a request naming an unregistered adapter `x` registers `<dir>/x` from the first
    of these folders that has it (read on first use, confined like a runtime load).
    """

    dir: str = "demo"
    rank_buckets: tuple[int, ...] = (8, 16, 32, 64, 128)
    device_slots: int = 4
    host_mem_bytes: int = -1
    allowed_roots: tuple[str, ...] = ()
    preload: str = "none"
    target_modules: tuple[str, ...] = LORA_TARGETS  # modules the device pool holds slots for
    max_registered: int = 16384
    max_file_bytes: int = 4 * 2**30
    resolve_dirs: tuple[str, ...] = ()

    def __post_init__(self):
        check_fields(self, "adapters")
        bad = [m for m in self.target_modules if m not in LORA_TARGETS]
        _check(not bad and len(self.target_modules) > 0,
               f"adapters.target_modules={self.target_modules} must be a non-empty subset of {LORA_TARGETS}")
        b = self.rank_buckets
        _check(len(b) > 0, "adapters.rank_buckets must not be empty")
        _check(all(isinstance(r, int) and r > 0 for r in b), f"adapters.rank_buckets={b} must be positive ints")
        _check(list(b) == sorted(set(b)), f"adapters.rank_buckets={b} must be strictly increasing")
        _check(self.device_slots >= 1, f"adapters.device_slots={self.device_slots} must be >= 1")
        _check(self.host_mem_bytes >= -1, "adapters.host_mem_bytes must be -1 (auto), 0 (unbounded) or > 0")
        _check(self.max_registered >= 1, f"adapters.max_registered={self.max_registered} must be >= 1")
        _check(self.max_file_bytes >= 1024, f"adapters.max_file_bytes={self.max_file_bytes} must be >= 1024")
        _check(self.preload in ("none", "host", "all"), f"adapters.preload={self.preload!r} must be none|host|all")

    @property
    def max_rank(self) -> int:
        return self.rank_buckets[-1]

    @classmethod
    def from_dict(cls, data, where="adapters"):
        return dataclass_from_dict(cls, data, where)


@dataclass(frozen=True)
class CpuAssistConfig:
    """CPU-assisted prefill of requests whose adapter is not on the device yet.

    mode: off = wait for the adapter copy (on-demand loading); on = prefill at once with the LoRA
    delta computed on the CPU; auto = on only when the thread plan predicts the CPU path ends
    the prefill before the copy would. plan_file: a plan written by scripts/profile_cpu_lora.py
    ("" = the project's profiles/cpu_lora_plan.json if present, else a default). threads: CPU worker threads
    (0 = all cores but one, at least one). emulate_copy_gbps: on a CPU-only machine the "device"
    copy is a memcpy; a value > 0 paces it at that bandwidth to emulate PCIe (benchmarks, tests).
    pipeline_layers: an adapter is copied in groups of this many layers, and a CPU-assisted
    prefill moves each group's layers to the device as soon as the group has landed (0 = about
    8 groups per adapter).
    """

    mode: str | bool = "off"  # YAML 1.1 and Hydra may hand over a bare on/off/true/false as a bool
    threads: int = 0
    plan_file: str = ""
    emulate_copy_gbps: float = 0.0
    pipeline_layers: int = 0

    def __post_init__(self):
        check_fields(self, "cpu_assist")
        if isinstance(self.mode, bool):  # YAML 1.1 reads a bare off/on as a boolean
            object.__setattr__(self, "mode", "on" if self.mode else "off")
        _check(self.mode in ("off", "on", "auto"), f"cpu_assist.mode={self.mode!r} must be off|on|auto")
        _check(self.threads >= 0, f"cpu_assist.threads={self.threads} must be >= 0")
        _check(self.emulate_copy_gbps == 0 or self.emulate_copy_gbps >= 1e-4,  # (slower: a copy would take hours)
               f"cpu_assist.emulate_copy_gbps={self.emulate_copy_gbps} must be 0 (off) or >= 0.0001 (0.1 MB/s)")
        _check(self.pipeline_layers >= 0, f"cpu_assist.pipeline_layers={self.pipeline_layers} must be >= 0")

    @classmethod
    def from_dict(cls, data, where="cpu_assist"):
        return dataclass_from_dict(cls, data, where)


@dataclass(frozen=True)
class SchedulerConfig:
    """SLO-aware admission inside one engine. With slo_ms > 0 and a latency model (perf_model:
    a JSON from scripts/profile_decode.py), a waiting request joins the running batch only while
    the predicted decode step of the enlarged batch stays within slo_ms (a lone request always
    runs). The model is refit online from the engine's own decode-step timings.

    rank_grouping: when more requests wait than the batch has room for, those whose rank bucket
    the running batch already has go first, so the decode step does not take on another bucket
    needlessly; a request that would break the SLO lets the ones behind it that fit go ahead.
    max_passed_over bounds both: a request overtaken that many times is not overtaken again.

    mixed_steps: a step carries every decoding request's next token and, with the rest of
    engine.max_tokens_per_step, prefill chunks; false: a step is either prefill or decode, and
    prefill goes first (a long prompt stalls every running request's next token).

    policy: "fcfs" (arrival order) or "priority" (vLLM's --scheduling-policy: a request's
    `priority`, lower first, then arrival; a running request of a lower priority is preempted
    for one of a strictly higher priority that finds no room; see caraserve.scheduler)."""

    slo_ms: float = 0.0
    perf_model: str = ""
    rank_grouping: bool = True
    max_passed_over: int = 8
    mixed_steps: bool = True
    policy: str = "fcfs"

    def __post_init__(self):
        check_fields(self, "scheduler")
        _check(self.slo_ms >= 0, f"scheduler.slo_ms={self.slo_ms} must be >= 0")
        _check(self.max_passed_over >= 0, f"scheduler.max_passed_over={self.max_passed_over} must be >= 0")
        _check(self.policy in SCHEDULING_POLICIES,
               f"scheduler.policy={self.policy!r} must be one of {'|'.join(SCHEDULING_POLICIES)}")
        _check(not (self.slo_ms > 0 and not self.perf_model),
               "scheduler.slo_ms needs scheduler.perf_model (a latency JSON from scripts/profile_decode.py)")

    @classmethod
    def from_dict(cls, data, where="scheduler"):
        return dataclass_from_dict(cls, data, where)


@dataclass(frozen=True)
class LimitsConfig:
    """Per-request limits, checked when a request is added (server and offline alike), so that
    the work a request brings stays bounded whatever a client sends.

    max_prompt_bytes: a text prompt's UTF-8 bytes, checked before it is tokenized.
    max_stop_strings / max_stop_chars: number of stop strings and their total length.
    max_stop_token_ids: number of stop token ids.
    max_bad_words: number of bad_words (twice that of bad_words_token_ids sequences: a word
    is two, as it starts a text and after a space), each at most max_stop_chars characters (a
    sequence max_stop_token_ids tokens).
    max_allowed_token_ids: number of allowed_token_ids (the sampler masks by them every step).
    max_logprobs: the largest `logprobs` (completions) / `top_logprobs` (chat) accepted.
    max_chat_messages: messages in one chat request.
    max_n: completions per request (`n`); each is a request of its own sharing the prompt's blocks.
    max_prompts: prompts in one completions request (a list of prompts, each with its n).
    """

    max_prompt_bytes: int = 2**20
    max_stop_strings: int = 16
    max_stop_chars: int = 4096
    max_stop_token_ids: int = 256
    max_bad_words: int = 64
    max_allowed_token_ids: int = 4096
    max_logprobs: int = 20
    max_chat_messages: int = 1024
    max_n: int = 16
    max_prompts: int = 64

    def __post_init__(self):
        check_fields(self, "limits")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            _check(value >= 0, f"limits.{f.name}={value} must be >= 0")
        _check(self.max_n >= 1, f"limits.max_n={self.max_n} must be >= 1 (every request has one completion)")
        _check(self.max_prompts >= 1, f"limits.max_prompts={self.max_prompts} must be >= 1 (a request has a prompt)")

    @classmethod
    def from_dict(cls, data, where="limits"):
        return dataclass_from_dict(cls, data, where)


@dataclass(frozen=True)
class EngineConfig:
    """Everything an Engine needs. device "auto" = cuda when present, else cpu."""

    model: ModelConfig = field(default_factory=ModelConfig)
    adapters: AdapterConfig = field(default_factory=AdapterConfig)
    cpu_assist: CpuAssistConfig = field(default_factory=CpuAssistConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    device: str = "auto"
    dtype: str = "auto"
    max_batch_size: int = 32  # requests running at once
    max_seq_len: int = 2048  # prompt + output tokens of one request
    max_tokens_per_step: int = 4096
    # Paged KV cache: blocks of kv_block_size tokens. Their number: num_kv_blocks when > 0, else
    # kv_cache_bytes when > 0, else on CUDA gpu_memory_utilization of the device's memory less
    # what the model and adapter pools took, and on CPU max_batch_size x max_seq_len tokens.
    kv_block_size: int = 16
    prefix_caching: bool = True  # requests share the KV blocks of a prompt prefix (same adapter) already computed
    num_kv_blocks: int = 0
    kv_cache_bytes: int = 0
    gpu_memory_utilization: float = 0.9
    compile: str | bool = "auto"  # engine.compile=true arrives as a bool; kept as "true"
    # How a CUDA decode step is graphed (engine.compile true or auto): "compile" = torch.compile
    # with CUDA-graph replay (inductor fuses the elementwise ops); "capture" = the eager forward
    # (fused Triton kernels, cuBLAS, Triton attention and LoRA) captured per batch bucket at
    # start-up with torch.cuda.graph, as SGLang does by default: nothing to compile.
    cuda_graphs: str = "compile"
    compile_cache_dir: str = "auto"  # auto = $CARASERVE_CACHE/compiled; "" = none (compile_cache.cache_folder)
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.model, (str, os.PathLike)):  # EngineConfig(model="/models/x"), as vLLM's LLM(model=...)
            object.__setattr__(self, "model", ModelConfig(path=self.model))
        check_fields(self, "engine")
        # (the upper bounds: far past any machine, and inside the int32/int64 the kernels take)
        _check(1 <= self.max_batch_size <= 2**20, f"engine.max_batch_size={self.max_batch_size} must be in 1..2^20")
        _check(2 <= self.max_seq_len <= 2**30, f"engine.max_seq_len={self.max_seq_len} must be in 2..2^30")
        _check(1 <= self.max_tokens_per_step <= 2**30,
               f"engine.max_tokens_per_step={self.max_tokens_per_step} must be in 1..2^30")
        # a full batch's decode rows alone must fit a step's tokens, with room left for prefill
        # (fewer starve every prompt admitted until decoders finish; vLLM asks the same)
        _check(self.max_tokens_per_step >= self.max_batch_size,
               f"engine.max_tokens_per_step={self.max_tokens_per_step} must be >= engine.max_batch_size="
               f"{self.max_batch_size} (a step holds one token of every running request)")
        _check(1 <= self.kv_block_size <= 4096, f"engine.kv_block_size={self.kv_block_size} must be in 1..4096")
        _check(self.num_kv_blocks >= 0, f"engine.num_kv_blocks={self.num_kv_blocks} must be >= 0 (0 = from memory)")
        _check(self.kv_cache_bytes >= 0, f"engine.kv_cache_bytes={self.kv_cache_bytes} must be >= 0 (0 = auto)")
        _check(0 < self.gpu_memory_utilization <= 1,
               f"engine.gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]")
        _check(self.dtype in DTYPES, f"engine.dtype={self.dtype!r} is not one of {DTYPES}")
        _check(str(self.compile).lower() in ("auto", "true", "false"),
               f"engine.compile={self.compile!r} must be auto|true|false")
        object.__setattr__(self, "compile", str(self.compile).lower())
        _check(self.cuda_graphs in ("compile", "capture"),
               f"engine.cuda_graphs={self.cuda_graphs!r} must be compile|capture")

    @classmethod
    def from_dict(cls, data, where="engine"):
        return dataclass_from_dict(cls, data, where)


@dataclass(frozen=True)
class ServerConfig:
    """The HTTP server. api_key empty = the CARASERVE_API_KEY environment variable, if set.

    admin_api_key: when set, adapter loading and unloading need this key instead of api_key.
    allow_runtime_lora: with neither key set, /v1/load_lora_adapter and /v1/unload_lora_adapter
    are off unless this is true (anyone who can reach the server could load adapters).
    timeout_keep_alive_s: an idle keep-alive connection is closed after this long.
    chat_template: the chat template of /v1/chat/completions, as a file or inline Jinja (vLLM's
    --chat-template), for models whose tokenizer has none or to replace it.
    limit_concurrency: requests beyond this many at once get 503 (health and metrics probes excepted).
    heap_trim_s: the engine thread hands the C heap's free pages back to the system when it goes
    idle and after every this many seconds of steps (glibc's malloc_trim; 0: never).
    stall_timeout_s: /health answers 503 once requests have waited this long on one step (0: never).
    log_requests: a log line for every request as it ends (vLLM's --enable-log-requests).
    tool_call_parser: the model's tool-call syntax, which serves tool_choice "auto" (vLLM's
    --tool-call-parser; "" refuses "auto"). reasoning_parser: how a thinking model's reasoning
    is told from its answer (vLLM's --reasoning-parser), which chat answers carry as `reasoning`.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str = ""
    api_key: str = ""
    admin_api_key: str = ""
    allow_runtime_lora: bool = False
    timeout_keep_alive_s: float = 5.0
    limit_concurrency: int = 1024
    max_queue: int = 256
    max_body_bytes: int = 4 * 2**20
    drain_timeout_s: float = 30.0
    unload_timeout_s: float = 60.0
    log_level: str = "info"
    chat_template: str = ""  # a Jinja file, or the template itself; "" = the tokenizer's own
    heap_trim_s: float = 10.0
    stall_timeout_s: float = 300.0
    log_requests: bool = False
    tool_call_parser: str = ""
    reasoning_parser: str = ""

    def __post_init__(self):
        check_fields(self, "server")
        for name, known in (("tool_call_parser", TOOL_CALL_PARSERS), ("reasoning_parser", REASONING_PARSERS)):
            value = getattr(self, name)
            _check(value in ("", *known), f"server.{name}={value!r} must be one of {'|'.join(known)} (or empty: none)")
        _check(0 <= self.port <= 65535, f"server.port={self.port} must be in 0..65535")
        _check(self.max_queue >= 1, f"server.max_queue={self.max_queue} must be >= 1")
        _check(self.max_body_bytes >= 1024, f"server.max_body_bytes={self.max_body_bytes} must be >= 1024")
        _check(self.drain_timeout_s >= 0, "server.drain_timeout_s must be >= 0")
        _check(not self.chat_template or inline_template(self.chat_template) or Path(self.chat_template).is_file(),
               f"server.chat_template={self.chat_template!r}: no such file, and not a Jinja template")
        if self.chat_template:  # a template that does not parse would fail every chat call as the caller's
            _check_template(self.chat_template)
        _check(self.host != "", "server.host is empty: give an address (0.0.0.0 for every interface)")
        _check(self.unload_timeout_s >= 0, f"server.unload_timeout_s={self.unload_timeout_s} must be >= 0")
        _check(self.timeout_keep_alive_s > 0, "server.timeout_keep_alive_s must be > 0")
        _check(self.limit_concurrency >= 1, f"server.limit_concurrency={self.limit_concurrency} must be >= 1")
        _check(self.heap_trim_s >= 0, f"server.heap_trim_s={self.heap_trim_s} must be >= 0 (0: never)")
        _check(self.stall_timeout_s >= 0, f"server.stall_timeout_s={self.stall_timeout_s} must be >= 0 (0: never)")
        _check(self.log_level in LOG_LEVELS,
               f"server.log_level={self.log_level!r} must be one of {'|'.join(LOG_LEVELS)}")

    @classmethod
    def from_dict(cls, data, where="server"):
        return dataclass_from_dict(cls, data, where)


ENGINE_SECTIONS = ("model", "adapters", "engine", "cpu_assist", "scheduler", "limits")


def engine_config(composed: dict[str, Any]) -> EngineConfig:
    """EngineConfig from a composed entry-point config with the ENGINE_SECTIONS keys (each one
    checked under its own name, as the command line spells it: `model.path`, `engine.seed`)."""
    engine = composed.get("engine") or {}
    _check(isinstance(engine, Mapping), f"engine={show(engine)} must be a mapping of keys")
    engine = dict(engine)
    nested = [f"engine.{name}" for name in ENGINE_SECTIONS if name in engine]
    _check(not nested, f"unknown key {', '.join(nested)}; those are sections of their own (model.*, adapters.*, ...)")
    # checked here, before the sections join it: a typo is told the keys `engine.` really takes
    check_keys(engine, {f.name for f in dataclasses.fields(EngineConfig) if f.init} - set(ENGINE_SECTIONS), "engine")
    engine["model"] = ModelConfig.from_dict(composed.get("model"))
    engine["adapters"] = AdapterConfig.from_dict(composed.get("adapters"))
    engine["cpu_assist"] = CpuAssistConfig.from_dict(composed.get("cpu_assist"))
    engine["scheduler"] = SchedulerConfig.from_dict(composed.get("scheduler"))
    engine["limits"] = LimitsConfig.from_dict(composed.get("limits"))
    return EngineConfig.from_dict(engine)
