"""Engine: add_request / step / generate / abort. Owns every component; holds no global state."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

from caraserve.adapter_catalog import AdapterCatalog
from caraserve.config import EngineConfig, check_devices, resolve_device
from caraserve.cpu_assist.handoff import handoff_for
from caraserve.cpu_assist.thread_plan import ThreadPlan
from caraserve.engine_api import EngineConveniences
from caraserve.graphs import DecodeGraphs
from caraserve.input_checks import check_limits, prompt_ids, with_bad_words_ids
from caraserve.kv_cache import KVCache, context_limit, plan_blocks
from caraserve.lora.adapter_files import AdapterError, AdapterReadError, without_name
from caraserve.lora.device_pool import AdapterState
from caraserve.lora.host_store import AdapterInfo, check_adapter_dir
from caraserve.model.generation_config import sampling_defaults, with_defaults
from caraserve.model.llama import CausalLM, check_triton_prefill
from caraserve.model.loader import eos_token_ids, load_hf_config, load_model, load_tokenizer_or_none, resolve_dtype
from caraserve.model.tiny import resolve_paths
from caraserve.output_processor import OutputProcessor
from caraserve.perf.model import DecodeFeatures, PerfModel
from caraserve.request import (
    ErrorCause,
    FinishReason,
    Request,
    RequestError,
    RequestOutput,
    RequestState,
    SamplingParams,
)
from caraserve.runner import ModelRunner
from caraserve.scheduler import Scheduler
from caraserve.state import EngineState
from caraserve.step_isolation import NONFINITE, StepIsolation, describe
from caraserve.structured_output import CONFLICT, Grammars

log = logging.getLogger(__name__)


class Engine(EngineConveniences):
    """The serving engine. `model` may be a prebuilt CausalLM (benchmarks build random ones on the
    device); otherwise `config.model.path` is loaded. On CPU in float32 the engine packs the
    model's weights (CausalLM.pack_weights): a caller that writes them later packs again."""

    def __init__(self, config: EngineConfig | None = None, model: CausalLM | None = None):
        self.config = cfg = config or EngineConfig()
        self.device = torch.device(resolve_device(cfg.device))
        check_devices(cfg.model.max_memory_bytes)
        # files the settings name, read before the model: a bad one is a ConfigError, not a late traceback
        path = cfg.scheduler.perf_model
        self.perf_model = PerfModel.load(path, "scheduler.perf_model", self.device.type,
                                         cfg.model.path) if path else None
        ca = cfg.cpu_assist
        thread_plan = ThreadPlan.load(ca.plan_file, ca.threads) if ca.mode != "off" else None
        if model is None:
            model_path, adapter_dir = resolve_paths(cfg)
            if adapter_dir is not None:
                check_adapter_dir(adapter_dir)  # before the model loads: a typo costs no load
            self._load(model_path)
        else:
            model_path = Path(cfg.model.path)
            adapter_dir = resolve_paths(replace(cfg, model=replace(cfg.model, path=str(model_path))))[1]
            self.model, self.tokenizer, self._eos_ids, self.sampling_defaults = model, None, set(), {}
            self.dtype = model.model.embed_tokens.weight.dtype
        self.model_path = model_path
        self.model.pack_weights(cfg.max_batch_size)  # CPU float32 only; a no-op elsewhere
        args = self.model.args
        self.max_seq_len = min(cfg.max_seq_len, args.max_position)
        if self.max_seq_len < cfg.max_seq_len:
            log.warning("engine.max_seq_len=%d is past the model's %d positions: requests are limited to %d tokens",
                        cfg.max_seq_len, args.max_position, self.max_seq_len)
        self.catalog = AdapterCatalog(cfg.adapters, cfg.cpu_assist, args, self.dtype, self.model.layer_devices(),
                                      adapter_dir)
        # after the model and the adapter pool: on CUDA the KV cache takes the memory they left
        self.kv = KVCache(plan_blocks(cfg, args, self.dtype, self.device, self.max_seq_len), cfg.kv_block_size,
                          args.num_kv_heads, args.head_dim, self.dtype, self.model.layer_devices())
        self.max_seq_len, self._context_why = context_limit(self.kv, self.max_seq_len)
        self.outputs = OutputProcessor(self.tokenizer, self._eos_ids, self.max_seq_len)
        self.grammars = Grammars(self.tokenizer, args.vocab_size, self._eos_ids)  # structured outputs
        self.store, self.pool = self.catalog.store, self.catalog.pool
        check_triton_prefill(self.model, cfg.kv_block_size, self.dtype)  # CUDA only
        self.model.use_lora(self.pool)
        self.adapter_errors = self.catalog.errors
        self.handoff, assist = handoff_for(ca, thread_plan, self.model.args, self.pool.emulate_copy_gbps)
        self.scheduler = Scheduler.for_engine(cfg, self.kv, self.pool, self.store, assist, self.perf_model,
                                              args.long_rope_from)
        self.graphs = DecodeGraphs.for_engine(cfg, self.model, self.kv.layers, self.pool, self.max_seq_len, model_path,
                                              self.dtype, self.device)
        self.runner = ModelRunner(self.model, self.kv, self.pool, self.device, self.graphs, self.store, self.handoff)
        self.isolation = StepIsolation(self.runner)
        self._requests: dict[str, Request] = {}
        self._generators: dict[str, torch.Generator] = {}
        self._seed_rng = torch.Generator().manual_seed(cfg.seed)
        self._ids = itertools.count()
        self._lock = threading.RLock()
        if cfg.adapters.preload != "none":
            self.catalog.preload(cfg.adapters.preload)

    def _load(self, model_path: Path) -> None:
        cfg = self.config
        hf_config = load_hf_config(model_path)
        dtype_name = cfg.dtype if cfg.dtype != "auto" else cfg.model.dtype
        self.dtype = resolve_dtype(dtype_name, hf_config)
        if self.device.type == "cpu" and dtype_name == "auto" and self.dtype != torch.float32:
            self.dtype = torch.float32  # half-precision matmuls are slow on CPUs without bf16 units
        self.model = load_model(model_path, str(self.dtype).removeprefix("torch."), str(self.device),
                                cfg.model.max_memory_bytes or None)
        self.tokenizer = load_tokenizer_or_none(model_path)
        self._eos_ids = eos_token_ids(model_path, hf_config, self.tokenizer)
        self.sampling_defaults = sampling_defaults(model_path, cfg.model.generation_config,  # for unset fields
                                                   cfg.model.override_generation_config)

    def close(self) -> None:
        """Ends the engine's worker threads (CPU-assist lanes, adapter reads), after which it takes
        no requests. `with Engine(...) as engine:` closes it at the end of the block."""
        if self.handoff is not None:
            self.handoff.close()
        self.store.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def warm_up(self) -> None:
        """Compiles or captures now, on the thread that will run the steps (variants compiled on
        another made later CPU steps slower), what can be made ahead so no request waits for it:
        compile=true on CPU the one variant, on CUDA with cuda_graphs=capture every bucket's graphs."""
        if self.graphs is not None and (self.config.compile == "true" or self.graphs.capture):
            self.graphs.warm_up()

    def idle(self) -> bool:
        """Work for a moment with nothing to step: compiles one pending decode-step variant
        (engine.compile=auto). True when it did something (call again while idle)."""
        with self._lock:
            if self.graphs is None or self.has_unfinished():
                return False
            return self.graphs.compile_pending()

    # ---- adapters -------------------------------------------------------------------------
    def register_adapter(self, name: str, path: str | Path) -> AdapterInfo:
        """Validates and registers one adapter at run time (AdapterCatalog.register)."""
        return self.catalog.register(name, path)

    def unregister_adapter(self, name: str) -> None:
        """Removes an adapter; refused (AdapterError) while requests use it."""
        with self._lock:
            if self.scheduler.holds_adapter(name) or any(
                r.adapter == name for r in self._requests.values() if not r.finished
            ):
                raise AdapterError(f"adapter {name!r} is in use by running requests")
            self.catalog.remove(name)

    def adapter_state(self, name: str) -> str:
        """host | loading | resident"""
        return self.pool.state(name).value

    def adapters(self) -> list[AdapterInfo]:
        return self.catalog.infos()

    def preload_all(self) -> None:
        self.catalog.preload("all")  # every adapter resident (the CACHED baseline): a free slot each

    def snapshot(self) -> EngineState:
        """The live state a router reads (`/v1/state`, a Ray replica's routing stats): running and
        queued requests with their ranks and remaining output tokens, resident adapters, every
        adapter's rank, and a copy of the latency model the scheduler keeps refitting."""
        with self._lock:
            ranks = {info.name: info.rank for info in self.store.infos()}
            return EngineState.of(self.scheduler, self.kv, ranks,
                                  frozenset(n for n in ranks if self.pool.state(n) is AdapterState.RESIDENT))

    # ---- requests -------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None, adapter: str | None = None,
                    request_id: str | None = None, after: str | None = None, final_only: bool = False,
                    arrival_s: float | None = None) -> str:
        """Validates and queues a request; raises RequestError (nothing changes) when it is bad.
        after: the id of a request of the same prompt in flight (the n completions of one API
        call): this one is admitted once that one's prefill is done, and shares its blocks.
        final_only: `step` returns this request's output only when it ends (its new tokens and
        text then being all of them), sparing per-step outputs a caller waiting for the end does
        not read. arrival_s: when it arrived (time.perf_counter(); default now), for its TTFT."""
        if self.store.closed:  # (its adapter reads and CPU-assist lanes are gone)
            raise RuntimeError("the engine is closed (Engine.close): make a new one")
        params = params or SamplingParams(**with_defaults({}, (), self.sampling_defaults))  # the model's defaults
        if params.n != 1:
            raise RequestError(f"n={params.n}: an engine request generates one sequence (Engine.generate and the "
                               "server run n of them)")
        self.check_params(params)
        params = with_bad_words_ids(params, self.tokenizer, self.config.limits, self.model.args.vocab_size)
        prompt_ids = self.encode(prompt)
        if adapter is not None:
            self.catalog.check(adapter)
        self.check_fits(len(prompt_ids), params)
        grammar = self.grammars.matcher(params.structured_outputs) if params.structured_outputs else None
        with self._lock:
            rid = request_id if request_id is not None else f"req-{next(self._ids)}"
            if rid in self._requests and not self._requests[rid].finished:
                raise RequestError(f"request id {rid!r} is already in flight")
            req = Request(rid, prompt_ids, params, adapter, after=self._requests.get(after) if after else None,
                          final_only=final_only, grammar=grammar,
                          arrival_s=time.perf_counter() if arrival_s is None else arrival_s)
            # its KV depends on the adapter's registration (a reload is another) and the cache salt
            req.adapter_key = (f"{adapter}#{self.store.info(adapter).uid}" if adapter is not None else "") + (
                f"\0salt:{params.cache_salt}" if params.cache_salt is not None else "")
            if not params.greedy:
                seed = params.seed if params.seed is not None else int(
                    torch.randint(0, 2**62, (1,), generator=self._seed_rng))
                self._generators[rid] = torch.Generator(self.device).manual_seed(seed)
            self._requests[rid] = req
            self.scheduler.add(req)
        return rid

    def resolve_adapter(self, name: str) -> bool:
        """Registers an unknown adapter from adapters.resolve_dirs (AdapterCatalog.resolve)."""
        return self.catalog.resolve(name)

    def check_fits(self, prompt_tokens: int, params: SamplingParams) -> None:
        """Refuses (RequestError) a prompt of this length that, with params.max_tokens, exceeds the
        context length (never more than the whole KV cache holds)."""
        if prompt_tokens + params.max_tokens > self.max_seq_len:
            raise RequestError(f"prompt ({prompt_tokens} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                               f"context length {self.max_seq_len}{self._context_why}")

    def check_params(self, params: SamplingParams) -> None:
        """Refuses (RequestError naming the field) sampling parameters beyond engine.limits, the
        vocabulary (`input_checks.check_limits`) or the scheduling policy; structured outputs are
        checked as they compile, in add_request (or before, off the engine thread: `grammars.compile`)."""
        check_limits(params, self.config.limits, self.model.args.vocab_size, self._eos_ids)
        self.scheduler.check(params)

    def encode(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        """Token ids of a prompt; RequestError when it is not one (`input_checks.prompt_ids`)."""
        return prompt_ids(prompt, self.tokenizer, self.config.limits, self.max_seq_len, self.model.args.vocab_size,
                          add_special_tokens, self._context_why)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stops a request and frees its slots; its final output, or None when it is unknown or
        already finished."""
        with self._lock:
            req = self._requests.get(request_id)
            if req is None or req.finished:
                return None
            self._finish(req, FinishReason.ABORT)
            return self.outputs.aborted(req)

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    def request(self, request_id: str) -> Request | None:
        """The request while it is in flight (finished requests are forgotten)."""
        return self._requests.get(request_id)

    # ---- stepping -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Runs one scheduled batch; returns an output for every request that made progress or
        ended. A fault in one request's part of the step fails that request only
        (caraserve.step_isolation); EngineDeadError means no request explains it."""
        with self._lock:
            outs = self._fail_rejected()
            batch = self.scheduler.schedule()
            outs += self._fail_rejected()
            if batch is None:
                return outs
            t0 = time.perf_counter()
            logits, reqs, failed = self.isolation.forward(batch)  # logits row j: reqs[j]
            outs += [self._fail(r, f"the model step failed on this request ({why})") for r, why in failed]
            chunk = dict(zip(map(id, batch.requests), batch.chunk_lens))
            emitting, rows = [], []  # the requests that emit a token, their logits rows
            for j, req in enumerate(reqs):
                if req.state is RequestState.PREFILL:  # (a mixed step's other rows decode)
                    req.num_computed += chunk[id(req)]
                    if req.num_computed < req.prefill_len:
                        continue  # chunked prefill: more of the prompt to go
                    req.state = RequestState.DECODE
                emitting.append(req)
                rows.append(j)
            if not emitting:
                self.scheduler.publish(batch.requests)
                return outs
            if len(rows) < len(reqs):
                logits = logits.index_select(0, torch.tensor(rows, device=logits.device))
            tokens, logprobs, tops, bad = self.isolation.sample(
                logits, emitting, [self._generators.get(r.request_id) for r in emitting], self.outputs.eos_ids)
            now = time.perf_counter()  # sampling read the tokens back: the step has finished
            if batch.num_decode and self.perf_model is not None and not failed and not bad:
                self._observe_step(batch, now - t0)
            outs += [self._fail_sampling(emitting[i], why) for i, why in bad.items()]
            reqs = emitting
            if bad:
                reqs, tokens, logprobs, tops = ([x for i, x in enumerate(xs) if i not in bad]
                                                for xs in (emitting, tokens, logprobs, tops))
            for r, t, lp, top in zip(reqs, tokens, logprobs, tops):
                self.outputs.add_token(r, t, lp, top, now)
            self.scheduler.publish(batch.requests)  # the blocks this step filled, before any is freed
            return outs + self.outputs.step_outputs(reqs, tokens, self._finish)

    def _fail_sampling(self, req: Request, why: str) -> RequestOutput:
        """Ends a request whose sampling failed; non-finite logits on an adapter's are the adapter's doing."""
        if why == NONFINITE and req.adapter is not None:
            return self._fail(req, f"adapter {req.adapter!r} cannot be used ({NONFINITE})", ErrorCause.ADAPTER)
        if why == CONFLICT:
            return self._fail(req, CONFLICT, ErrorCause.PARAMS)
        return self._fail(req, f"sampling failed on this request ({why})")

    def _fail_rejected(self) -> list[RequestOutput]:
        """Ends the requests the scheduler could not admit for a reason of their own."""
        outs = []
        for req, e in self.scheduler.take_rejected():
            if isinstance(e, AdapterReadError):  # this machine's (a router retries elsewhere); the next use reads again
                why = f"adapter {req.adapter!r} could not be read ({e}); retry"
                outs.append(self._fail(req, why, ErrorCause.ENGINE))
            elif isinstance(e, AdapterError):
                why = f"adapter {req.adapter!r} cannot be used ({without_name(e, req.adapter)})"
                outs.append(self._fail(req, why, ErrorCause.ADAPTER))
            else:
                outs.append(self._fail(req, f"its adapter cannot be used ({describe(e)})"))
        return outs

    def _fail(self, req: Request, why: str, cause: ErrorCause = ErrorCause.REQUEST) -> RequestOutput:
        req.error, req.error_cause = why, cause
        self.kv.unpublish(req.block_table[: req.published_blocks])  # its KV may be what went wrong
        self._finish(req, FinishReason.ERROR)
        return self.outputs.output(req, [], "")

    def _observe_step(self, batch, seconds: float) -> None:
        """Online refit of the latency model from this machine's own decode and mixed steps."""
        ranks = [self.scheduler.rank_of(r) for r in batch.requests]
        n = batch.num_decode
        self.perf_model.observe(DecodeFeatures.of(ranks[:n], batch.chunk_lens[n:], ranks[n:]), seconds)

    def fail_all(self, message: str, cause: ErrorCause = ErrorCause.ENGINE) -> list[RequestOutput]:
        """Finishes every unfinished request with an error: for faults of the engine as a whole
        (EngineDeadError, a lost device) or a shutdown, never for one request's fault."""
        with self._lock:
            outs = []
            for req in list(self._requests.values()):
                req.error, req.error_cause = message, cause
                self._finish(req, FinishReason.ERROR)
                outs.append(self.outputs.output(req, [], ""))
            return outs

    def _finish(self, req: Request, reason: FinishReason) -> None:
        req.state = RequestState.FINISHED
        req.finish_reason = reason
        req.finish_s = time.perf_counter()
        self.scheduler.finish(req)
        self._generators.pop(req.request_id, None)
        self._requests.pop(req.request_id, None)
