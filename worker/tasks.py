"""Every Celery task genq runs. Tasks carry ids only (the job, batch or webhook event lives in the
database), are acknowledged late, and are idempotent: a redelivered task finds its work done or
taken and does nothing. The API sends them by name (app/infra/broker.py)."""
from __future__ import annotations

import logging

from celery import shared_task

from app.infra.broker import TASK_DELIVER_WEBHOOK, TASK_RUN_JOB, TASK_START_BATCH, send_run_job
from app.infra.retry import retry_outage
from app.openai import batches
from app.openai.formats import BATCH_PRIORITY
from app.webhooks.delivery import deliver
from worker.runtime import get_runtime

log = logging.getLogger(__name__)


@shared_task(name=TASK_RUN_JOB, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(job_id: str) -> str:
    """Generate one job on this process's engine, sharing every step with the other jobs."""
    return get_runtime().run_job(job_id)


@shared_task(name=TASK_DELIVER_WEBHOOK, bind=True, acks_late=True, ignore_result=True)
def deliver_webhook(self, event_id: str, attempt: int) -> str:
    """One signed POST of a webhook event; schedules the next attempt itself (app/webhooks/delivery.py)."""
    runtime = get_runtime()
    return deliver(runtime.settings, runtime.sessions, self.app, event_id, attempt)


@shared_task(name=TASK_START_BATCH, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def start_batch(self, batch_id: str) -> int:
    """Create the batch's jobs and queue the first ones at batch priority (below interactive
    requests, in the Celery queue and in the engine). A redelivery re-queues the batch's released,
    still-queued jobs."""
    rt = get_runtime()

    def start() -> list[str]:
        with rt.sessions.begin() as session:
            return batches.start_batch(session, batch_id, rt.settings.model_name, rt.settings.batch_max_in_flight)

    # Through an outage: retried (a start is conditional: a second one re-sends the released lines);
    # should the database stay down, the batch stays `validating` and the batch sweep re-sends this task.
    job_ids = retry_outage(start, what=f"batch {batch_id}: start", seconds=batches.DB_RETRY_SECONDS)
    for job_id in job_ids:
        try:
            send_run_job(self.app, rt.settings, job_id, BATCH_PRIORITY)
        except Exception:   # released in the database: the reconciler sends it
            log.warning("batch %s: could not send the task of line %s; the reconciler will", batch_id, job_id,
                        exc_info=True)
    # A batch of invalid lines only is done already (else the batch sweep finalizes it).
    retry_outage(lambda: batches.maybe_finalize(rt.sessions, batch_id), what=f"batch {batch_id}: finalize",
                 seconds=batches.DB_RETRY_SECONDS)
    log.info("batch %s: %d line(s) queued", batch_id, len(job_ids))
    return len(job_ids)
