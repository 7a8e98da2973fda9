"""Server-Sent Events for one job: replay from the event log, then follow the live channel.

The stream subscribes to the job's pub/sub channel *before* it reads the log, so an event is
either in what it read or in what it receives next (often both: duplicates are dropped by id).
A live event that does not follow the last one sent means something was missed; the gap is read
back from the log. The stream ends after `done`, or with an `error` event (no id, so a client's
Last-Event-ID still points at the last real event) when the stream's Redis connection fails.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Iterator

from redis.exceptions import RedisError

from app.api.services import Services
from app.jobs import store
from app.jobs.event_log import EventId, JobEvent
from app.jobs.models import FINAL_STATUSES, JobStatus
from app.jobs.serialization import done_event_data

log = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 15.0
IDLE_CHECK_SECONDS = 1.0    # silence after which the database is asked whether the job ended


def stream_job_events(svc: Services, job_id: str, owner: str | None, after: EventId | None) -> Iterator[str]:
    try:
        yield from _stream(svc, job_id, owner, after)
    except RedisError as exc:
        # Never hang on a dead connection: say so and end; the client resumes with Last-Event-ID.
        log.warning("event stream of job %s lost Redis: %s", job_id, exc)
        data = {"type": "stream_interrupted",
                "message": "the event stream lost its connection to Redis; reconnect with Last-Event-ID to resume"}
        yield f"event: error\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _stream(svc: Services, job_id: str, owner: str | None, after: EventId | None) -> Iterator[str]:
    pubsub = svc.redis.pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe(svc.channels.job_live(job_id))
        yield ": stream of job events\n\n"   # sends the headers now, even for a queued job
        cursor = _Cursor(after)
        for event in svc.events.read(job_id, after=after):
            yield from cursor.send(event)
            if cursor.done:
                return
        last_activity = last_write = time.monotonic()
        final_seen = False
        while True:
            message = pubsub.get_message(timeout=IDLE_CHECK_SECONDS)
            now = time.monotonic()
            if message is not None:
                event = JobEvent.from_message(message["data"])
                if cursor.is_new(event):
                    backlog = [event] if cursor.follows(event) else svc.events.read(
                        job_id, after=cursor.last, until=event.id)
                    for item in backlog:
                        yield from cursor.send(item)
                        if cursor.done:
                            return
                    last_activity = last_write = now
                continue
            if now - last_activity >= IDLE_CHECK_SECONDS:
                last_activity = now
                job = _final_job(svc, job_id, owner)
                if job is not None:
                    for item in svc.events.read(job_id, after=cursor.last):
                        yield from cursor.send(item)
                        if cursor.done:
                            return
                    if final_seen:
                        # The job ended but its log has no `done` (expired, or never written):
                        # the database is the record.
                        yield from cursor.send(_synthesized_done(cursor.last, job))
                        return
                    final_seen = True   # the worker writes the DB first, then publishes: wait once
            if now - last_write >= KEEPALIVE_SECONDS:
                last_write = now
                yield ": keep-alive\n\n"
    finally:
        try:
            pubsub.close()
        except RedisError:
            pass


class _Cursor:
    """The id of the last event sent; drops anything at or before it."""

    def __init__(self, last: EventId | None):
        self.last = last
        self.done = False

    def is_new(self, event: JobEvent) -> bool:
        return self.last is None or event.id > self.last

    def follows(self, event: JobEvent) -> bool:
        return self.last is not None and event.id == self.last.next

    def send(self, event: JobEvent) -> Iterator[str]:
        if self.done or not self.is_new(event):
            return
        self.last = event.id
        self.done = event.is_done
        yield event.to_sse()


def _final_job(svc: Services, job_id: str, owner: str | None):
    with svc.sessions() as session:
        job = store.get_job(session, job_id, owner)
    if job is None or JobStatus(job.status) not in FINAL_STATUSES:
        return None
    return job


def _synthesized_done(last: EventId | None, job) -> JobEvent:
    event_id = last.next if last is not None else EventId(job.attempts, 1) if job.attempts else EventId(0, 1)
    return JobEvent(event_id, "done", done_event_data(job))
