"""Following a job: its events as objects (replayed from the log, then live), and waiting for it
to end. SSE (app/api/sse.py) and OpenAI streaming (app/openai/stream.py) encode what `follow`
yields; `Prefer: wait`, a cancel's confirmation and a plain OpenAI request use `wait_for_final`.

`follow` subscribes to the job's pub/sub channel *before* it reads the log, so an event is either
in what it read or in what it receives next (often both: duplicates are dropped by id). A live
event that does not follow the last one yielded means something was missed; the gap is read back
from the log. It ends after `done`; a Redis failure is raised to the caller (RedisError).
"""
from __future__ import annotations

import logging
import time
from typing import Iterator

from redis.exceptions import RedisError

from app.jobs import store
from app.jobs.connections import Connections
from app.jobs.event_log import EventId, JobEvent
from app.jobs.models import FINAL_STATUSES, Job, JobStatus
from app.jobs.serialization import done_event_data

log = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 15.0
IDLE_CHECK_SECONDS = 1.0    # silence after which the database is asked whether the job ended


class Marker:
    """Something a stream may tell its client that is not an event."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


SUBSCRIBED = Marker("subscribed")   # listening now (a stream can send its headers, even for a queued job)
IDLE = Marker("idle")               # nothing for KEEPALIVE_SECONDS (a stream sends a keep-alive)


def follow(conn: Connections, job_id: str, owner: str | None,
           after: EventId | None = None) -> Iterator[JobEvent | Marker]:
    """The job's events after `after`, in order and each once, ending with `done`."""
    pubsub = conn.redis.pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe(conn.channels.job_live(job_id))
        yield SUBSCRIBED
        cursor = _Cursor(after)
        yield from cursor.take(conn.events.read(job_id, after=after))
        last_activity = last_yield = time.monotonic()
        final_seen = False
        while not cursor.done:
            message = pubsub.get_message(timeout=IDLE_CHECK_SECONDS)
            now = time.monotonic()
            if message is not None:
                event = JobEvent.from_message(message["data"])
                if cursor.is_new(event):
                    backlog = [event] if cursor.follows(event) else conn.events.read(
                        job_id, after=cursor.last, until=event.id)
                    yield from cursor.take(backlog)
                    last_activity = last_yield = now
                continue
            if now - last_activity >= IDLE_CHECK_SECONDS:
                last_activity = now
                job = final_job(conn, job_id, owner)
                if job is not None:
                    yield from cursor.take(conn.events.read(job_id, after=cursor.last))
                    if final_seen and not cursor.done:
                        # The job ended but its log has no `done` (expired, or never written):
                        # the database is the record.
                        yield from cursor.take([_synthesized_done(cursor.last, job)])
                    final_seen = True   # the worker writes the DB first, then publishes: wait once
            if not cursor.done and now - last_yield >= KEEPALIVE_SECONDS:
                last_yield = now
                yield IDLE
    finally:
        try:
            pubsub.close()
        except RedisError:
            pass


class _Cursor:
    """The id of the last event yielded; drops anything at or before it."""

    def __init__(self, last: EventId | None):
        self.last = last
        self.done = False

    def is_new(self, event: JobEvent) -> bool:
        return self.last is None or event.id > self.last

    def follows(self, event: JobEvent) -> bool:
        return self.last is not None and event.id == self.last.next

    def take(self, events) -> Iterator[JobEvent]:
        for event in events:
            if self.done:
                return
            if self.is_new(event):
                self.last = event.id
                self.done = event.is_done
                yield event


def final_job(conn: Connections, job_id: str, owner: str | None) -> Job | None:
    """The job if it has ended, else None."""
    with conn.sessions() as session:
        job = store.get_job(session, job_id, owner)
    if job is None or JobStatus(job.status) not in FINAL_STATUSES:
        return None
    return job


def _synthesized_done(last: EventId | None, job: Job) -> JobEvent:
    event_id = last.next if last is not None else EventId(job.attempts, 1) if job.attempts else EventId(0, 1)
    return JobEvent(event_id, "done", done_event_data(job))


def subscribe(conn: Connections, job_id: str):
    """A pub/sub subscribed to the job's live channel, or None when Redis is unreachable (a wait then
    asks the database only). Subscribe before the job's task is sent, and nothing is missed."""
    pubsub = conn.redis.pubsub()
    try:
        pubsub.subscribe(conn.channels.job_live(job_id))
    except RedisError:
        log.warning("could not subscribe to the events of job %s; waiting on the database", job_id)
        close_quietly(pubsub)
        return None
    return pubsub


def close_quietly(pubsub) -> None:
    if pubsub is not None:
        try:
            pubsub.close()
        except RedisError:
            pass


def wait_for_final(conn: Connections, pubsub, job_id: str, owner: str | None, seconds: float, *,
                   poll_database: bool = True) -> Job | None:
    """The job once it has ended, or None after `seconds`. Its `done` event ends the wait at once.
    With `poll_database` the database is asked every second too, so a lost event or a Redis failure
    only costs a second (with no `pubsub`, or once it failed, the database is polled); without it
    (a short wait that answers with the job as it is either way) the wait ends on a Redis failure."""
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        timeout = min(remaining, 1.0)
        message = None
        if pubsub is None:
            if not poll_database:
                return None
            time.sleep(timeout)
        else:
            try:
                message = pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)
            except RedisError:
                log.warning("lost the event channel while waiting for job %s", job_id, exc_info=True)
                pubsub = None
                continue
        if message is not None and not JobEvent.from_message(message["data"]).is_done:
            continue   # a token or status event: keep waiting
        if message is None and not poll_database:
            continue
        job = final_job(conn, job_id, owner)
        if job is not None:
            return job
    return None
