"""The garbage collector's pause histogram: fed from inside collections, which may start on any
thread at any allocation, so feeding it must never wait on a lock a scrape holds."""

from __future__ import annotations

import gc
import random
import sys
import threading

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from caraserve.config import EngineConfig
from caraserve.engine import Engine
from caraserve.serve.async_engine import AsyncEngine
from caraserve.serve.metrics import _PAUSE_BUCKETS, GcPauses, ServerMetrics


def test_a_collection_inside_a_metrics_scrape_does_not_deadlock():
    """A collection at every line of prometheus_client's code while /metrics renders (inside its
    metrics' locks too) on the rendering thread: the pause callback runs there and must finish.
    The old form (a prometheus Histogram observed from the callback) waited forever on the lock
    its own scrape held."""
    metrics = ServerMetrics(AsyncEngine(Engine(EngineConfig(compile="false", max_batch_size=2, max_seq_len=64)), 4))
    rendered = []

    def collect_at_every_line(frame, event, arg):
        if "prometheus_client" not in frame.f_code.co_filename:
            return collect_at_every_line if event == "call" else None
        if event == "line":
            gc.collect(0)
        return collect_at_every_line

    def render():
        sys.settrace(collect_at_every_line)
        try:
            rendered.append(metrics.render().decode())
        finally:
            sys.settrace(None)

    worker = threading.Thread(target=render, daemon=True)
    worker.start()
    worker.join(30)
    metrics.gc_monitor.close()  # (a deadlocked callback would otherwise stop every later collection)
    assert rendered, "a collection during the scrape deadlocked it"
    counts = [float(line.rsplit(" ", 1)[1]) for line in rendered[0].splitlines()
              if line.startswith('caraserve_gc_pause_seconds_count{generation="0"}')]
    assert counts and counts[0] >= 1


def test_pauses_render_as_prometheus_own_histogram_renders_them():
    """Every bucket, count and sum equal to prometheus_client's Histogram fed the same pauses,
    values on bucket bounds and past the last one included."""
    rng = random.Random(0)
    pauses = [(rng.choice([0, 1, 2]), rng.choice([*_PAUSE_BUCKETS, 0.0, 1e-6, 0.003, 0.7, 9.0])) for _ in range(500)]
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    pause = GcPauses("gc_pause_seconds", "pauses", _PAUSE_BUCKETS)
    ours.register(pause)
    reference = Histogram("gc_pause_seconds", "pauses", ["generation"], buckets=_PAUSE_BUCKETS, registry=theirs)
    for gen, seconds in pauses:
        pause.observe(gen, seconds)
        reference.labels(str(gen)).observe(seconds)

    def samples(registry):
        return sorted(line for line in generate_latest(registry).decode().splitlines()
                      if not line.startswith("#") and "_created" not in line)

    assert samples(ours) == samples(theirs)
    assert len(samples(ours)) == 3 * (len(_PAUSE_BUCKETS) + 3)
