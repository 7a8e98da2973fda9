"""Celery tasks. They carry job ids only; the job lives in the database."""
from __future__ import annotations

from celery import shared_task

from app.channels import TASK_RUN_JOB
from app.webhooks import TASK_DELIVER_WEBHOOK


@shared_task(name=TASK_RUN_JOB, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(job_id: str) -> str:
    """Generate one job on this process's engine, sharing every step with the other jobs."""
    from worker.runtime import get_runtime

    return get_runtime().run_job(job_id)


@shared_task(name=TASK_DELIVER_WEBHOOK, acks_late=True, ignore_result=True)
def deliver_webhook(event_id: str, attempt: int) -> str:
    """One signed POST of a webhook event; schedules the next attempt itself (worker/webhooks.py)."""
    from worker.webhooks import deliver_in_worker

    return deliver_in_worker(event_id, attempt)
