"""A worker's own Prometheus endpoint (GENQ_METRICS_PORT): engine state and per-request latencies.

Names follow vLLM's (`vllm:time_to_first_token_seconds` -> `genq_time_to_first_token_seconds`), each
labelled with `model_name`. Engine gauges and counters are read at scrape time from the engine
service's latest stats snapshot (taken by its loop thread every GENQ_STATS_INTERVAL_SECONDS, so
a scrape never touches the engine). Latency histograms are fed by a job hook (`app.jobs.transitions`):

    queue time            job created -> claimed by this worker (what the job waited in the queue)
    time to first token   job created -> first token published (what the client waited)
    inter-token latency   between consecutive token outputs of one job (one per engine step)
    end-to-end latency    job created -> completed

The same server answers `/healthz`: 200 while the engine loop runs, 503 while the model loads or
after the loop stopped (the container healthcheck).
"""
from __future__ import annotations

import logging
import threading
import time
from datetime import datetime
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any, Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from app.infra.worker_reports import EXPORTED_ENGINE_STATS

if TYPE_CHECKING:
    from worker.engine_service import ServiceStats

log = logging.getLogger(__name__)

# Buckets as vLLM's (seconds), with a few shorter ones: small models answer in milliseconds.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
MAX_TRACKED_JOBS = 100_000   # jobs whose `completed` never comes (worker shutdown) age out past this


class _JobTiming:
    __slots__ = ("created", "last_output")

    def __init__(self, created: float):
        self.created = created
        self.last_output: float | None = None


class WorkerMetrics:
    def __init__(self, model_name: str = ""):
        disable_created_metrics()
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self._stats: Callable[[], ServiceStats | None] | None = None
        self._healthy: Callable[[], bool] = lambda: False
        labels = ["model_name"]
        r = self.registry
        self.queue_time = Histogram("genq_request_queue_time_seconds", "Job created -> claimed by a worker",
                                    labels, buckets=REQUEST_BUCKETS, registry=r)
        self.ttft = Histogram("genq_time_to_first_token_seconds", "Job created -> first token",
                              labels, buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("genq_inter_token_latency_seconds", "Time between a job's consecutive token outputs",
                             labels, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("genq_e2e_request_latency_seconds", "Job created -> completed",
                             labels, buckets=REQUEST_BUCKETS, registry=r)
        self.request_prompt_tokens = Histogram("genq_request_prompt_tokens", "Prompt tokens per finished job",
                                               labels, buckets=TOKEN_BUCKETS, registry=r)
        self.request_generation_tokens = Histogram("genq_request_generation_tokens",
                                                   "Generated tokens per finished job",
                                                   labels, buckets=TOKEN_BUCKETS, registry=r)
        self.success = Counter("genq_request_success", "Jobs finished by this worker, by finish reason",
                               ["model_name", "finished_reason"], registry=r)
        self.jobs = Counter("genq_worker_jobs", "Jobs this worker finished, by final status",
                            ["model_name", "status"], registry=r)
        self.registry.register(_EngineCollector(self))
        self._timings: dict[str, _JobTiming] = {}
        self._lock = threading.Lock()

    def attach(self, stats: Callable[[], ServiceStats | None], healthy: Callable[[], bool]) -> None:
        """Start reporting an engine: `stats` returns its latest snapshot, `healthy` whether its loop runs."""
        self._stats, self._healthy = stats, healthy

    def healthy(self) -> bool:
        return self._stats is not None and self._healthy()

    def engine_stats(self) -> dict[str, Any]:
        snapshot = self._stats() if self._stats is not None else None
        return snapshot.as_dict() if snapshot is not None else {}

    # -- the job hook ---------------------------------------------------------------------------

    def on_job_event(self, event: str, job_id: str, details: dict[str, Any]) -> None:
        now = time.time()
        if event == "started":
            self._started(job_id, details, now)
        elif event == "output":
            self._output(job_id, now)
        elif event == "completed":
            self._completed(job_id, details, now)
        elif event == "released":   # unfinished here; the worker that finishes it counts it
            with self._lock:
                self._timings.pop(job_id, None)

    def _started(self, job_id: str, details: dict[str, Any], now: float) -> None:
        created = _timestamp(details.get("created_at"))
        started = _timestamp(details.get("started_at")) or now
        if created is None:
            return
        self.queue_time.labels(self.model_name).observe(max(started - created, 0.0))
        with self._lock:
            self._timings[job_id] = _JobTiming(created)   # a retry starts the clock of its attempt anew
            if len(self._timings) > MAX_TRACKED_JOBS:
                del self._timings[next(iter(self._timings))]

    def _output(self, job_id: str, now: float) -> None:
        timing = self._timings.get(job_id)
        if timing is None:
            return
        if timing.last_output is None:
            self.ttft.labels(self.model_name).observe(max(now - timing.created, 0.0))
        else:
            self.itl.labels(self.model_name).observe(now - timing.last_output)
        timing.last_output = now

    def _completed(self, job_id: str, details: dict[str, Any], now: float) -> None:
        with self._lock:
            timing = self._timings.pop(job_id, None)
        status = details.get("status") or "unknown"
        self.jobs.labels(self.model_name, status).inc()
        if timing is None:
            return
        self.e2e.labels(self.model_name).observe(max(now - timing.created, 0.0))
        if details.get("finish_reason"):
            self.success.labels(self.model_name, details["finish_reason"]).inc()
        if details.get("prompt_tokens") is not None:
            self.request_prompt_tokens.labels(self.model_name).observe(details["prompt_tokens"])
        if details.get("completion_tokens") is not None:
            self.request_generation_tokens.labels(self.model_name).observe(details["completion_tokens"])


def _timestamp(value: datetime | float | None) -> float | None:
    if value is None:
        return None
    return value.timestamp() if isinstance(value, datetime) else float(value)


class _EngineCollector:
    """Engine gauges and counters from the latest stats snapshot, at scrape time."""

    def __init__(self, metrics: WorkerMetrics):
        self.metrics = metrics

    def collect(self):
        stats = self.metrics.engine_stats()
        if not stats:
            return
        labels = [self.metrics.model_name]
        for key, stat in EXPORTED_ENGINE_STATS.items():
            if stat.kind == "gauge":
                family = GaugeMetricFamily(stat.metric, stat.help, labels=["model_name"])
                family.add_metric(labels, stats.get(key, 0))
                yield family
        used, total = stats.get("kv_blocks_used", 0), stats.get("kv_blocks_total", 0)
        usage = GaugeMetricFamily("genq_kv_cache_usage_perc", "KV cache usage (1 = full)", labels=["model_name"])
        usage.add_metric(labels, used / total if total else 0.0)
        yield usage
        for key, stat in EXPORTED_ENGINE_STATS.items():
            if stat.kind == "counter":
                family = CounterMetricFamily(stat.metric, stat.help, labels=["model_name"])
                family.add_metric(labels, stats.get(key, 0))
                yield family


# -- the HTTP endpoint ------------------------------------------------------------------------------

class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args) -> None:   # scrapes every few seconds would flood the log
        pass


class MetricsServer:
    """`/metrics` (Prometheus text format) and `/healthz` on host:port, in a daemon thread."""

    def __init__(self, metrics: WorkerMetrics, host: str, port: int):
        self.metrics = metrics
        self._prometheus = make_wsgi_app(metrics.registry)
        try:
            self._server = make_server(host, port, self._app, server_class=_ThreadingServer,
                                       handler_class=_QuietHandler)
        except OSError as exc:
            raise RuntimeError(f"cannot serve worker metrics on {host}:{port} ({exc}); give each worker on "
                               "this host its own GENQ_METRICS_PORT") from None
        self.host, self.port = host, self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="genq-metrics", daemon=True)

    def _app(self, environ, start_response):
        if environ.get("PATH_INFO") == "/healthz":
            healthy = self.metrics.healthy()
            body = b'{"status":"ok"}' if healthy else b'{"status":"unavailable"}'
            start_response("200 OK" if healthy else "503 Service Unavailable",
                           [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        return self._prometheus(environ, start_response)

    def start(self) -> "MetricsServer":
        self._thread.start()
        log.info("worker metrics on http://%s:%d/metrics", self.host, self.port)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
