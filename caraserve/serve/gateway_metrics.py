"""vLLM-compatible metrics, so Kubernetes endpoint pickers route to caraserve replicas unchanged.

The Gateway API Inference Extension (and llm-d and KServe, which build on it) scrape each model
server's /metrics and, for vLLM, read:
  vllm:num_requests_waiting / vllm:num_requests_running   queue depth and batch size (gauges)
  vllm:kv_cache_usage_perc   the fraction of the KV cache's blocks in use (0-1), for KV-aware scorers
  vllm:num_preemptions_total requests preempted (KV blocks ran out, or a higher priority needed room) (counter)
  vllm:prefix_cache_queries_total / vllm:prefix_cache_hits_total   prompt tokens looked up in and
      found in the prefix cache (counters; their ratio is the hit rate)
  vllm:lora_requests_info{max_lora, running_lora_adapters, waiting_lora_adapters}
      one sample whose value is the time it was taken (vLLM sets it to the current time); the
      labels name the adapters of running and waiting requests (comma-separated) and how many
      adapters the server holds on the device at once. A LoRA-affinity scorer sends a request to
      a server already running its adapter, else to one with room for another adapter.
This collector computes them at scrape time, one series each (vLLM's own gauge keeps a series
per label combination ever seen; a scraper takes the newest, which is the only one here).
`VllmRequestMetrics` keeps vLLM's per-request series under vLLM's names too, for dashboards made
for vLLM: vllm:prompt_tokens_total, vllm:generation_tokens_total,
vllm:time_to_first_token_seconds, vllm:e2e_request_latency_seconds and
vllm:request_success_total{finished_reason} (stop, length, abort).
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry


class GatewayMetrics(Collector):
    def __init__(self, async_engine, model_name: str):
        self.async_engine, self.model_name = async_engine, model_name

    def collect(self):
        engine = self.async_engine.engine
        sched, pool, kv = engine.scheduler, engine.pool, engine.kv
        running, waiting = list(sched.running), list(sched.waiting)  # copies: the engine thread moves them
        for name, doc, value in (("vllm:num_requests_running", "Requests in the running batch", len(running)),
                                 ("vllm:num_requests_waiting", "Requests waiting to be scheduled",
                                  self.async_engine.num_waiting)):
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric([self.model_name], value)
            yield g
        usage = GaugeMetricFamily("vllm:kv_cache_usage_perc", "Fraction of the KV cache in use (1 = all)",
                                  labels=["model_name"])
        usage.add_metric([self.model_name], kv.used_blocks / kv.num_blocks)
        yield usage
        preempted = CounterMetricFamily("vllm:num_preemptions", "Requests preempted (KV blocks ran out, or a "
                                        "higher priority needed room)",
                                        labels=["model_name"])
        preempted.add_metric([self.model_name], sched.num_preemptions)
        yield preempted
        for name, doc, value in (("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                  kv.query_tokens),
                                 ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", kv.hit_tokens)):
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric([self.model_name], value)
            yield c
        info = GaugeMetricFamily("vllm:lora_requests_info", "Running and waiting LoRA adapters (value: unix time)",
                                 labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        max_lora = sum(len(b.slots) for b in pool.buckets)
        names = [",".join(sorted({r.adapter for r in reqs if r.adapter})) for reqs in (running, waiting)]
        info.add_metric([str(max_lora), *names], time.time())
        yield info


class VllmRequestMetrics:
    """vLLM's per-request series of one served model, fed by ServerMetrics.observe."""

    def __init__(self, registry: CollectorRegistry, model_name: str, buckets):
        self.model_name = model_name
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens", ["model_name"],
                                     registry=registry).labels(model_name)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens", ["model_name"],
                                         registry=registry).labels(model_name)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token", ["model_name"],
                              buckets=buckets, registry=registry).labels(model_name)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Arrival to finish", ["model_name"],
                             buckets=buckets, registry=registry).labels(model_name)
        self.success = Counter("vllm:request_success", "Requests finished (not failed), by finish reason",
                               ["model_name", "finished_reason"], registry=registry)


def add_gateway_metrics(registry: CollectorRegistry, async_engine, model_name: str) -> None:
    registry.register(GatewayMetrics(async_engine, model_name))
