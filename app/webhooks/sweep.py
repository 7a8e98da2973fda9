"""Re-sending what a crash or an outage lost: overdue deliveries, and job.completed events of
finished jobs that never got one. The worker's reconciler runs it periodically.
"""
from __future__ import annotations

import logging
from datetime import timedelta

from app.infra.broker import send_delivery
from app.infra.db import utcnow
from app.jobs.models import Job
from app.jobs.serialization import job_to_dict
from app.webhooks import store
from app.webhooks.dispatcher import write_event

log = logging.getLogger(__name__)


def sweep_webhooks(settings, sessions, celery, *, grace_seconds: float = 60.0, lookback_seconds: float = 24 * 3600,
          now=None) -> int:
    """Re-send what a crash or an outage lost; returns how many tasks it sent. Safe to run from
    several processes at once (attempts are claimed; once-per-job events are unique).

    - finished jobs (within `lookback_seconds`, at least `grace_seconds` ago) that asked for
      `completed` but have no job.completed event get one;
    - pending events whose next attempt is overdue by `grace_seconds` and not in flight get their
      task sent again.
    """
    now = now or utcnow()
    sent = 0
    with sessions() as session:
        missing = store.finished_without_completed_event(session, now - timedelta(seconds=lookback_seconds),
                                                         now - timedelta(seconds=grace_seconds))
        payloads = [(registration, job_to_dict(session.get(Job, registration.job_id), registration.base_url))
                    for registration in missing]
    for registration, data in payloads:
        if write_event(sessions, celery, settings, "job.completed", registration, data) is not None:
            sent += 1
    with sessions() as session:
        due = store.due_events(session, now - timedelta(seconds=grace_seconds), now)
    for event_id, attempt in due:
        try:
            send_delivery(celery, settings, event_id, attempt)
            sent += 1
        except Exception:
            log.exception("sweep: could not send webhook event %s", event_id)
    return sent
