"""The batch task: start a batch (validate its lines, create its jobs, queue the first
`batch_max_in_flight` of them). Idempotent; each line's `completed` hook releases the next line and
the last one finalizes the batch (`app.batches.advance_on_completion`)."""
from __future__ import annotations

import logging
from datetime import timedelta

from celery import shared_task

from app import batches
from app.channels import TASK_START_BATCH
from app.db import utcnow
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


def sweep(settings, sessions, redis, channels, celery) -> tuple[int, int]:
    """The reconciler's batch sweep: expire batches past their completion window (nobody has to
    read them first), and re-send the start task of batches still `validating` after
    `requeue_after_seconds` (the API could not queue it, or it was lost). Returns (expired, re-sent)."""
    now = utcnow()
    with sessions() as session:
        expired, stuck = batches.batches_due(
            session, expired_before=now, stuck_before=now - timedelta(seconds=settings.requeue_after_seconds))
    for batch_id in expired:
        batches.expire(sessions, redis, channels, batch_id)
    for batch_id in stuck:
        celery.send_task(TASK_START_BATCH, args=[batch_id], queue=settings.queue, priority=0)
    if expired or stuck:
        log.warning("batch sweep: %d batch(es) expired, %d start task(s) re-sent", len(expired), len(stuck))
    return len(expired), len(stuck)
