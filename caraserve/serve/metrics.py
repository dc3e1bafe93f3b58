"""Prometheus metrics of one server, in a registry of its own (no process-global state)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from caraserve.lora.device_pool import AdapterState
from caraserve.request import FinishReason, RequestOutput
from caraserve.serve.gateway_metrics import VllmRequestMetrics
from caraserve.serve.gc_monitor import GcMonitor

log = logging.getLogger(__name__)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_PAUSE_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class EngineCounters(Collector):
    """Counts the engine keeps itself, read at scrape time and typed as counters (name -> (help,
    read)); Prometheus exposes each as name_total."""

    def __init__(self, counters: dict[str, tuple[str, Callable[[], float]]]):
        self.counters = counters

    def collect(self):
        for name, (doc, read) in self.counters.items():
            yield CounterMetricFamily(name, doc, value=read())


class GcPauses(Collector):
    """The garbage collector's pauses as a histogram by generation, fed from inside the collector
    (GcMonitor's callback, on whatever thread allocated). It takes no lock: a collection can start
    at any allocation, also one a thread makes while holding a metric's lock (prometheus_client's
    are not reentrant, and its own histogram's observe takes the lock its collect holds), and a
    callback waiting on that lock would wait forever. Two collections never run at once, so the
    plain list updates below have one writer; a scrape reads them as they are."""

    def __init__(self, name: str, doc: str, buckets: tuple[float, ...]):
        self.name, self.doc, self.bounds = name, doc, buckets
        # generation -> [count per bucket (the last one +Inf), sum of seconds]; CPython's three
        # made up front, so a scrape never sees the dict grow
        self._gens: dict[str, list] = {str(g): [0] * (len(buckets) + 1) + [0.0] for g in range(3)}

    def observe(self, generation: int, seconds: float) -> None:
        row = self._gens.get(str(generation))
        if row is None:  # (not CPython's 0-2: made inside the collection, so no scrape is iterating)
            row = self._gens.setdefault(str(generation), [0] * (len(self.bounds) + 1) + [0.0])
        i = next((i for i, b in enumerate(self.bounds) if seconds <= b), len(self.bounds))
        row[i] += 1
        row[-1] += seconds

    def collect(self):
        family = HistogramMetricFamily(self.name, self.doc, labels=["generation"])
        for gen, row in self._gens.copy().items():
            row = list(row)
            cumulative, total = [], 0
            for bound, n in zip((*map(floatToGoString, self.bounds), "+Inf"), row[:-1]):
                total += n
                cumulative.append((bound, total))
            family.add_metric([gen], cumulative, sum_value=row[-1])
        yield family


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, async_engine, model_name: str | None = None, log_requests: bool = False):
        """model_name: the served model's, for vLLM's per-request series (gateway_metrics); None: none.
        log_requests: a log line for each request as it ends (server.log_requests)."""
        self.log_requests = log_requests
        self.registry = r = CollectorRegistry()
        self.vllm = VllmRequestMetrics(r, model_name, _LATENCY_BUCKETS) if model_name is not None else None
        self.requests = Counter("caraserve_requests", "Requests by final status", ["status"], registry=r)
        self.ttft = Histogram("caraserve_ttft_seconds", "Time to first token", ["adapter"],
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("caraserve_tpot_seconds", "Time per output token after the first", ["adapter"],
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("caraserve_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("caraserve_prompt_tokens", "Prompt tokens of requests that got their first token",
                                     registry=r)
        self.e2e = Histogram("caraserve_e2e_request_latency_seconds", "Arrival to finish, of every finished request",
                             ["status"], buckets=_LATENCY_BUCKETS, registry=r)
        engine = async_engine.engine
        Gauge("caraserve_queue_length", "Requests waiting", registry=r).set_function(lambda: async_engine.num_waiting)
        Gauge("caraserve_running_batch_size", "Requests running", registry=r).set_function(
            lambda: async_engine.num_running)
        Gauge("caraserve_requests_waiting_for_adapter", "Waiting requests whose adapter is not on the device yet "
              "(no free slot, or its copy in flight)", registry=r).set_function(
            lambda: waiting_for_adapter(engine))
        Gauge("caraserve_adapter_slots_used", "Device adapter slots in use", registry=r).set_function(
            engine.pool.used_slots)
        Gauge("caraserve_adapter_slots_total", "Device adapter slots", registry=r).set_function(
            lambda: sum(len(b.slots) for b in engine.pool.buckets))
        Gauge("caraserve_adapters_resident", "Adapters in a device slot (loaded or loading)",
              registry=r).set_function(engine.pool.used_slots)
        Gauge("caraserve_kv_blocks_used", "Paged KV cache blocks held by requests", registry=r).set_function(
            lambda: engine.kv.used_blocks)
        Gauge("caraserve_kv_blocks_total", "Paged KV cache blocks", registry=r).set_function(
            lambda: engine.kv.num_blocks)
        Gauge("caraserve_kv_blocks_cached", "Paged KV blocks published for prefix reuse (held or not)",
              registry=r).set_function(lambda: engine.kv.cached_blocks)
        r.register(EngineCounters({  # exposed as caraserve_..._total
            "caraserve_adapter_loads": ("Adapter copies to the device", lambda: engine.pool.loads),
            "caraserve_adapter_evictions": ("Adapters evicted from the device", lambda: engine.pool.evictions),
            "caraserve_prefix_cache_query_tokens": ("Prompt tokens looked up in the prefix cache",
                                                    lambda: engine.kv.query_tokens),
            "caraserve_prefix_cache_hit_tokens": ("Prompt tokens found in the prefix cache",
                                                  lambda: engine.kv.hit_tokens),
            "caraserve_preemptions": ("Running requests preempted to recompute (KV blocks ran out, or a higher "
                                      "priority needed room)",
                                      lambda: engine.scheduler.num_preemptions),
        }))
        self._host_tier(engine.store, r)
        self.gc_pause = GcPauses("caraserve_gc_pause_seconds", "Python garbage-collection pauses", _PAUSE_BUCKETS)
        r.register(self.gc_pause)
        self.gc_monitor = GcMonitor(self.gc_pause.observe)

    def _host_tier(self, store, r: CollectorRegistry) -> None:
        """The adapters' host tier: what it holds, how often it had to read, how long reads took."""
        stat = {
            "caraserve_adapters_registered": ("Adapters registered", lambda s: s.registered),
            "caraserve_adapters_cached": ("Adapters whose weights are in host memory", lambda s: s.cached),
            "caraserve_host_tier_bytes": ("Bytes of adapter weights in host memory", lambda s: s.cached_bytes),
            "caraserve_host_tier_budget_bytes": ("Host-tier budget (0 = unbounded)", lambda s: s.budget_bytes),
        }
        for name, (doc, get) in stat.items():
            Gauge(name, doc, registry=r).set_function(lambda get=get: get(store.stats()))
        r.register(EngineCounters({
            "caraserve_host_tier_hits": ("Adapter weight lookups answered from memory", lambda: store.stats().hits),
            "caraserve_host_tier_misses": ("Adapter weight lookups that waited on a disk read",
                                           lambda: store.stats().misses),
            "caraserve_adapter_disk_reads": ("Adapter weight reads from disk", lambda: store.stats().disk_reads),
        }))
        self.disk_read = Histogram("caraserve_adapter_disk_read_seconds", "Adapter weight read time",
                                   buckets=_LATENCY_BUCKETS, registry=r)
        store.on_read = self.disk_read.observe

    def observe(self, out: RequestOutput) -> None:
        """Every output of every request (the engine thread's): TTFT and the prompt's tokens with
        the output that carries its first token (streamed: at once; final-only: at the end),
        the rest when it finishes."""
        self.tokens.inc(len(out.new_token_ids))
        kind, vllm = "cold" if out.cold_start else "warm", self.vllm
        if vllm is not None:
            vllm.generation_tokens.inc(len(out.new_token_ids))
        if out.new_token_ids and len(out.new_token_ids) == len(out.output_ids) and out.ttft_s is not None:
            self.ttft.labels(kind).observe(out.ttft_s)
            self.prompt_tokens.inc(out.prompt_tokens)
            if vllm is not None:
                vllm.ttft.observe(out.ttft_s)
                vllm.prompt_tokens.inc(out.prompt_tokens)
        if not out.finished:
            return
        self.requests.labels(out.finish_reason.value).inc()
        if self.log_requests:
            log.info("request %s finished: %s, adapter %s (%s), %d prompt + %d generated tokens, TTFT %s, e2e %s%s",
                     out.request_id, out.finish_reason.value, out.adapter or "none", kind, out.prompt_tokens,
                     len(out.output_ids), _seconds(out.ttft_s), _seconds(out.e2e_s),
                     f": {out.error}" if out.error else "")
        if out.e2e_s is not None:
            self.e2e.labels(out.finish_reason.value).observe(out.e2e_s)
            if vllm is not None:
                vllm.e2e.observe(out.e2e_s)
        if vllm is not None and out.finish_reason is not FinishReason.ERROR:
            vllm.success.labels(vllm.model_name, out.finish_reason.openai).inc()
        if out.ttft_s is not None and out.e2e_s is not None and len(out.output_ids) > 1:
            self.tpot.labels(kind).observe((out.e2e_s - out.ttft_s) / (len(out.output_ids) - 1))

    def rejected(self, reason: str) -> None:
        self.requests.labels(f"rejected_{reason}").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def waiting_for_adapter(engine) -> int:
    """Queued requests whose adapter is not resident on the device (scrape time, off the engine
    thread: a copy of the queue, and each adapter's state as of now)."""
    resident = AdapterState.RESIDENT
    return sum(1 for r in list(engine.scheduler.waiting) if r.adapter is not None and
               engine.pool.state(r.adapter) is not resident)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"
