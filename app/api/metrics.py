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
from prometheus_client.core import GaugeMetricFamily

from app.infra.broker import queue_depth
from app.infra.worker_reports import EXPORTED_ENGINE_STATS, live_workers
from app.jobs import store
from app.jobs.models import ALL_STATUSES

log = logging.getLogger(__name__)


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
        with self.app.app_context():
            svc = self.services_getter()
            try:
                with svc.sessions() as session:
                    counts = store.count_by_status(session)
                for status in ALL_STATUSES:
                    jobs.add_metric([status], counts.get(status, 0))
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
        yield workers
        yield depth
        yield from engine.values()
