"""`genq worker`: load the engine, then run a Celery worker (threads pool) feeding it."""
from __future__ import annotations

import logging

from celery.signals import worker_shutdown

from app.settings import Settings

log = logging.getLogger(__name__)


def run_worker(settings: Settings, *, loglevel: str = "INFO") -> None:
    from worker.celery_app import make_celery
    from worker.runtime import get_runtime, stop_runtime

    runtime = get_runtime(settings)            # load the model before taking any task
    celery = make_celery(settings, runtime.redis_url, set_as_current=True)
    celery.conf.include = ["worker.tasks"]
    import worker.tasks  # noqa: F401  (registers the shared task on this app)

    @worker_shutdown.connect(weak=False)
    def _stop(**_):
        stop_runtime()

    celery.worker_main([
        "worker", "--pool=threads", f"--concurrency={settings.worker_concurrency}",
        f"--queues={settings.queue}", f"--hostname=genq-{runtime.worker_id}@%h", f"--loglevel={loglevel}",
        "--without-mingle", "--without-gossip", "--without-heartbeat",
    ])
