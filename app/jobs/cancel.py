"""The one cancel path (`POST /v1/jobs/{id}/cancel`, an OpenAI stream whose client hung up; a batch
that stops cancels its queued lines in one statement, `store.stop_batch_lines`, and tells the
workers of its running ones with `tell_workers_to_stop`).

A queued job is canceled in the database at once; no worker ever sees it, so this path writes its
event log itself (attempt 0: `status` canceled, then `done`) and announces the `completed`
transition. A running job is flagged in the database and its worker is told on the control channel
(it stops the generation and writes the canceled result itself).
"""
from __future__ import annotations

import json
import logging

from redis import Redis

from app.infra.channels import Channels
from app.jobs import store, transitions
from app.jobs.connections import Connections
from app.jobs.event_log import EventId, JobEvent
from app.jobs.serialization import done_event_data
from app.jobs.store import CancelOutcome

log = logging.getLogger(__name__)


def cancel(conn: Connections, job_id: str, owner: str | None) -> CancelOutcome:
    """Cancel a queued job now, or ask a running job's worker to stop it. Telling the workers may
    raise (Redis down); the database already records the cancel either way."""
    with conn.sessions.begin() as session:
        outcome = store.cancel_job(session, job_id, owner)
    if outcome is CancelOutcome.CANCELED:
        announce_canceled_while_queued(conn, job_id)
    elif outcome is CancelOutcome.REQUESTED:
        tell_workers_to_stop(conn.redis, conn.channels, job_id)
    return outcome


def announce_canceled_while_queued(conn: Connections, job_id: str) -> None:
    """No worker saw this job: write its event log (attempt 0) and announce its end."""
    events = [JobEvent(EventId(0, 1), "status", {"status": "canceled"}),
              JobEvent(EventId(0, 2), "done", done_event_data(store.canceled_result()))]
    try:
        conn.events.publish(job_id, events)
    except Exception:
        log.exception("could not publish the cancel events of job %s", job_id)
    transitions.emit("completed", job_id, status="canceled")


def tell_workers_to_stop(redis: Redis, channels: Channels, job_id: str) -> None:
    """The control message a worker running `job_id` stops it on (worker/runtime.py listens)."""
    redis.publish(channels.control, json.dumps({"type": "cancel", "job_id": job_id}))
