"""Celery tasks. They carry job ids only; the job lives in the database."""
from __future__ import annotations

import logging

from celery import shared_task

log = logging.getLogger(__name__)

from app.infra.broker import TASK_DELIVER_WEBHOOK, TASK_RUN_JOB, TASK_START_BATCH, send_run_job
from app.openai import batches
from app.openai.formats import BATCH_PRIORITY
from app.webhooks.delivery import deliver
from worker.runtime import get_runtime


@shared_task(name=TASK_RUN_JOB, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(job_id: str) -> str:
    """Generate one job on this process's engine, sharing every step with the other jobs."""

    return get_runtime().run_job(job_id)


@shared_task(name=TASK_DELIVER_WEBHOOK, acks_late=True, ignore_result=True)
def deliver_webhook(event_id: str, attempt: int) -> str:
    """One signed POST of a webhook event; schedules the next attempt itself (worker/webhooks.py)."""

    return deliver_in_worker(event_id, attempt)


@shared_task(name=TASK_START_BATCH, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def start_batch(self, batch_id: str) -> int:
    """Create the batch's jobs and queue the first ones at batch priority (below interactive
    requests, in the Celery queue and in the engine). A redelivery re-queues the batch's released,
    still-queued jobs."""

    rt = get_runtime()
    with rt.sessions.begin() as session:
        job_ids = batches.start_batch(session, batch_id, rt.settings.model_name, rt.settings.batch_max_in_flight)
    for job_id in job_ids:
        send_run_job(self.app, rt.settings, job_id, BATCH_PRIORITY)
    batches.maybe_finalize(rt.sessions, batch_id)   # a batch of invalid lines only is done already
    log.info("batch %s: %d line(s) queued", batch_id, len(job_ids))
    return len(job_ids)


def deliver_in_worker(event_id: str, attempt: int) -> str:
    """The Celery task's body in a `genq worker` process."""
    from celery import current_app


    runtime = get_runtime()
    return deliver(runtime.settings, runtime.sessions, current_app, event_id, attempt)
