"""The batch task: start a batch (validate its lines, create its jobs, queue the first
`batch_max_in_flight` of them). Idempotent; each line's `completed` hook releases the next line and
the last one finalizes the batch (`app.batches.advance_on_completion`)."""
from __future__ import annotations

import logging

from celery import shared_task

from app import batches
from app.channels import TASK_START_BATCH
from app.openai_format import BATCH_PRIORITY

log = logging.getLogger(__name__)


@shared_task(name=TASK_START_BATCH, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def start_batch(self, batch_id: str) -> int:
    """Create the batch's jobs and queue the first ones at batch priority (below interactive
    requests, in the Celery queue and in the engine). A redelivery re-queues the batch's released,
    still-queued jobs."""
    from worker.celery_app import send_run_job
    from worker.runtime import get_runtime

    rt = get_runtime()
    with rt.sessions.begin() as session:
        job_ids = batches.start_batch(session, batch_id, rt.settings.model_name, rt.settings.batch_max_in_flight)
    for job_id in job_ids:
        send_run_job(self.app, rt.settings, job_id, BATCH_PRIORITY)
    batches.maybe_finalize(rt.sessions, batch_id)   # a batch of invalid lines only is done already
    log.info("batch %s: %d line(s) queued", batch_id, len(job_ids))
    return len(job_ids)
