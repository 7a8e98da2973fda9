"""`genq worker`: load the engine, then run a Celery worker (threads pool) feeding it."""
from __future__ import annotations

import logging

from celery.signals import worker_shutdown, worker_shutting_down

from app.infra.broker import make_celery, webhook_queue
from app.infra.settings import Settings
from app.jobs import transitions
from app.jobs.transitions import log_job_transition
from app.openai.batches import advance_on_completion
from app.webhooks.dispatcher import dispatcher_for
from worker.metrics import MetricsServer, WorkerMetrics
from worker.runtime import get_runtime, stop_runtime

log = logging.getLogger(__name__)


def run_worker(settings: Settings, *, loglevel: str = "INFO") -> None:

    metrics = WorkerMetrics(settings.model_name)
    server = None
    if settings.metrics_port is not None:      # bound before the model loads: a port clash fails fast
        server = MetricsServer(metrics, settings.metrics_host, settings.metrics_port).start()
    transitions.register(log_job_transition)
    transitions.register(metrics.on_job_event)
    runtime = get_runtime(settings)            # load the model before taking any task
    # unhealthy too once a tensor-parallel engine has lost a rank (its stats say healthy: false)
    metrics.attach(runtime.service.stats,
                   lambda: runtime.service.running and runtime.service.stats().get("healthy", True))
    celery = make_celery(settings, runtime.redis_url, set_as_current=True)
    celery.conf.include = ["worker.tasks"]

    transitions.register(dispatcher_for(settings, runtime.sessions, celery))   # webhook events (docs/webhooks.md)

    # a batch line's end releases the next line; the last one finalizes the batch
    transitions.register(advance_on_completion(runtime.sessions, settings.batch_max_in_flight, runtime.send_job))

    @worker_shutting_down.connect(weak=False)
    def _drain(**_):
        # Celery stops taking tasks and waits for the running ones; past the drain timeout the
        # engine stops and its jobs go back to the queue for another worker.
        import threading

        threading.Thread(target=runtime.drain, args=(settings.drain_seconds,), name="genq-drain",
                         daemon=True).start()

    @worker_shutdown.connect(weak=False)
    def _stop(**_):
        stop_runtime()
        if server is not None:
            server.stop()

    quiet = ["--quiet"] if settings.log_format == "json" else []   # no banner among JSON lines
    celery.worker_main([
        *quiet, "worker", "--pool=threads", f"--concurrency={settings.worker_concurrency}",
        f"--queues={settings.queue},{webhook_queue(settings)}", f"--hostname=genq-{runtime.worker_id}@%h",
        f"--loglevel={loglevel}",
        "--without-mingle", "--without-gossip", *([] if settings.celery_events else ["--without-heartbeat"]),
    ])
