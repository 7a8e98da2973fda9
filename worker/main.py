"""`genq worker`: load the engine, then run a Celery worker (threads pool) feeding it."""
from __future__ import annotations

import logging
import threading

from celery.signals import task_received, worker_shutdown, worker_shutting_down

from app import reactions
from app.infra.broker import TASK_RUN_JOB, make_celery, webhook_queue
from app.infra.settings import Settings
from app.jobs import transitions
from worker.metrics import MetricsServer, WorkerMetrics
from worker.runtime import WorkerRuntime, get_runtime, stop_runtime

log = logging.getLogger(__name__)


def run_worker(settings: Settings, *, loglevel: str = "INFO") -> None:
    metrics = WorkerMetrics(settings.model_name)
    server = None
    if settings.metrics_port is not None:      # bound before the model loads: a port clash fails fast
        server = MetricsServer(metrics, settings.metrics_host, settings.metrics_port).start()
    transitions.register(metrics.on_job_event)
    runtime = get_runtime(settings)            # load the model before taking any task
    # unhealthy too once a tensor-parallel engine has lost a rank (its stats say healthy: false)
    metrics.attach(runtime.service.stats, lambda: runtime.service.running and runtime.service.healthy)
    celery = make_celery(settings, runtime.redis_url, set_as_current=True)
    celery.conf.include = ["worker.tasks"]
    reactions.install(settings, runtime.sessions, celery)   # the log line, webhook events, batch progress
    _stop_gracefully(settings, runtime, server)
    _expect_jobs(runtime)
    celery.worker_main(_worker_argv(settings, runtime, loglevel))


def _expect_jobs(runtime: WorkerRuntime):
    """Each job task counts as arriving from the moment Celery's consumer receives it, before a
    task thread takes it: an engine about to step from nothing then waits for the whole burst
    (EngineService._gather) instead of prefilling the first job alone while the next ones are still
    between the broker and their claims (measured in docs/service.md)."""
    @task_received.connect(weak=False)
    def _received(request=None, **_):
        try:
            if request is not None and request.task_name == TASK_RUN_JOB and request.args:
                runtime.expect(str(request.args[0]))
        except Exception:   # a hint for the engine's gather only: never in the way of the task
            log.debug("could not read a received task's job id", exc_info=True)

    return _received


def _stop_gracefully(settings: Settings, runtime: WorkerRuntime, server: MetricsServer | None) -> None:
    @worker_shutting_down.connect(weak=False)
    def _drain(**_):
        # Celery stops taking tasks and waits for the running ones; past the drain timeout the
        # engine stops and its jobs go back to the queue for another worker.
        threading.Thread(target=runtime.drain, args=(settings.drain_seconds,), name="genq-drain",
                         daemon=True).start()

    @worker_shutdown.connect(weak=False)
    def _stop(**_):
        stop_runtime()
        if server is not None:
            server.stop()


def _worker_argv(settings: Settings, runtime: WorkerRuntime, loglevel: str) -> list[str]:
    quiet = ["--quiet"] if settings.log_format == "json" else []   # no banner among JSON lines
    return [*quiet, "worker", "--pool=threads", f"--concurrency={settings.worker_concurrency}",
            f"--queues={settings.queue},{webhook_queue(settings)}", f"--hostname=genq-{runtime.worker_id}@%h",
            f"--loglevel={loglevel}", "--without-mingle", "--without-gossip",
            *([] if settings.celery_events else ["--without-heartbeat"])]
