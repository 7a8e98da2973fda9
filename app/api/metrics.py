"""Prometheus metrics: HTTP traffic of this API process, plus job counts (database) and every live
worker's engine stats (Redis), read at scrape time.

With several gunicorn processes the HTTP counters are per process (set PROMETHEUS_MULTIPROC_DIR
and prometheus_client's multiprocess mode to merge them); the job and engine gauges are global.
"""
from __future__ import annotations

import logging
import time

from flask import Flask, g, request
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from app.infra.broker import queue_depth
from app.infra.worker_reports import EXPORTED_ENGINE_STATS, live_workers
from app.jobs import fair_queue, store
from app.jobs.models import ALL_STATUSES

log = logging.getLogger(__name__)

# genq_key_queue_wait_seconds: fixed buckets, over this many of the most recently submitted started jobs.
KEY_WAIT_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 300)
KEY_WAIT_WINDOW = 10_000


class Metrics:
    def __init__(self):
        disable_created_metrics()   # the *_created series only add noise to every scrape
        self.registry = CollectorRegistry()
        self.requests = Counter("genq_http_requests", "HTTP requests handled", ["method", "endpoint", "status"],
                                registry=self.registry)
        self.latency = Histogram("genq_http_request_duration_seconds", "Time to the response headers",
                                 ["method", "endpoint"], registry=self.registry,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.jobs_submitted = Counter("genq_jobs_submitted", "Jobs accepted by POST /v1/jobs",
                                      registry=self.registry)

    def init_app(self, app: Flask, services_getter) -> None:
        self.registry.register(_StateCollector(app, services_getter))

        @app.before_request
        def _start_timer():
            g.metrics_start = time.perf_counter()

        @app.after_request
        def _record(response):
            endpoint = request.url_rule.rule if request.url_rule else "unmatched"
            start = g.get("metrics_start")
            if start is not None:
                self.latency.labels(request.method, endpoint).observe(time.perf_counter() - start)
            self.requests.labels(request.method, endpoint, str(response.status_code)).inc()
            if endpoint == "/v1/jobs" and request.method == "POST" and response.status_code in (201, 202):
                self.jobs_submitted.inc()
            return response


class _StateCollector:
    def __init__(self, app: Flask, services_getter):
        self.app = app
        self.services_getter = services_getter

    def collect(self):
        jobs = GaugeMetricFamily("genq_jobs", "Jobs in the database by status", labels=["status"])
        engine = {name: GaugeMetricFamily(f"genq_engine_{name}", f"Worker engine stat {name}",
                                          labels=["worker", "model"]) for name in EXPORTED_ENGINE_STATS}
        workers = GaugeMetricFamily("genq_workers", "Workers that reported recently")
        depth = GaugeMetricFamily("genq_queue_depth", "Jobs in the broker queue that no worker has taken yet",
                                  labels=["queue"])
        key_jobs = GaugeMetricFamily("genq_key_jobs", "Jobs in the database by API key (\"\": no key) and status",
                                     labels=["key", "status"])
        key_prompt = CounterMetricFamily("genq_key_prompt_tokens", "Prompt tokens of each API key's finished jobs",
                                         labels=["key"])
        key_completion = CounterMetricFamily("genq_key_completion_tokens",
                                             "Completion tokens of each API key's finished jobs", labels=["key"])
        key_served = CounterMetricFamily(
            "genq_key_served_tokens", "Tokens (prompt computed + output) each API key's jobs were served, as the "
            "fair queue settled them (GENQ_SCHEDULING=fair)", labels=["key"])
        key_counter = GaugeMetricFamily(
            "genq_key_fair_counter", "Each API key's virtual token counter in the fair queue (weighted service; "
            "the smallest is served next)", labels=["key"])
        key_wait = HistogramMetricFamily(
            "genq_key_queue_wait_seconds",
            f"Queue wait (started_at - created_at) by API key, over the {KEY_WAIT_WINDOW} most recently "
            "submitted jobs that have started (a window recomputed at each scrape, not a running counter)",
            labels=["key"])
        with self.app.app_context():
            svc = self.services_getter()
            try:
                with svc.sessions() as session:
                    counts = store.count_by_status(session)
                    usage = store.usage_by_owner(session)
                    waits = store.recent_queue_waits(session, KEY_WAIT_WINDOW)
                    shares = fair_queue.shares(session)
                for status in ALL_STATUSES:
                    jobs.add_metric([status], counts.get(status, 0))
                for key, figures in sorted(usage.items()):
                    for status in ALL_STATUSES:
                        key_jobs.add_metric([key, status], figures.jobs.get(status, 0))
                    key_prompt.add_metric([key], figures.prompt_tokens)
                    key_completion.add_metric([key], figures.completion_tokens)
                _add_wait_histograms(key_wait, waits)
                for key, share in sorted(shares.items()):
                    key_served.add_metric([key], share["served_tokens"])
                    key_counter.add_metric([key], share["counter"])
            except Exception:
                log.exception("metrics: could not count jobs")
            try:
                depth.add_metric([svc.settings.queue], queue_depth(svc.redis, svc.channels, svc.settings.queue))
                reports = live_workers(svc.redis, svc.channels)
                workers.add_metric([], len(reports))
                for report in reports:
                    labels = [report["worker_id"], str(report.get("model", ""))]
                    for name in EXPORTED_ENGINE_STATS:
                        value = report.get("engine", {}).get(name)
                        if isinstance(value, (int, float)):
                            engine[name].add_metric(labels, value)
            except Exception:
                log.exception("metrics: could not read worker stats")
        yield jobs
        yield key_jobs
        yield key_prompt
        yield key_completion
        yield key_wait
        yield key_served
        yield key_counter
        yield workers
        yield depth
        yield from engine.values()


def _add_wait_histograms(family: HistogramMetricFamily, waits: list[tuple[str, float]]) -> None:
    by_key: dict[str, list[float]] = {}
    for key, seconds in waits:
        by_key.setdefault(key, []).append(seconds)
    for key, seconds in sorted(by_key.items()):
        buckets = [(floatToGoString(bound), sum(1 for s in seconds if s <= bound)) for bound in KEY_WAIT_BUCKETS]
        family.add_metric([key], buckets + [("+Inf", len(seconds))], sum(seconds))
