"""Server-Sent Events for one job (`GET /v1/jobs/{id}/events`): what `app.jobs.follow` yields,
encoded. Each event carries its id (resume with Last-Event-ID); a comment opens the stream at once
(the headers go out even for a queued job) and keeps an idle one alive. When the stream's Redis
connection fails it ends with an `error` event without an id, so a client's Last-Event-ID still
points at the last real event; with Redis down before the stream opens, the request is a 503.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Generator, Iterator

from redis.exceptions import RedisError

from app.jobs.connections import Connections
from app.jobs.event_log import EventId, JobEvent
from app.jobs.follow import IDLE, SUBSCRIBED, Marker, follow

log = logging.getLogger(__name__)

_COMMENTS = {SUBSCRIBED: ": stream of job events\n\n", IDLE: ": keep-alive\n\n"}


def sse_stream(conn: Connections, job_id: str, owner: str | None, after: EventId | None) -> Iterator[str]:
    """The stream, subscribed already: with Redis down this raises (a RedisError: the view answers
    503 + Retry-After) instead of opening a stream that could only say it failed."""
    events = follow(conn, job_id, owner, after)
    first = next(events)   # SUBSCRIBED, once the subscription is made
    return _encoded(job_id, first, events)


def _encoded(job_id: str, first: Marker, events: Generator[JobEvent | Marker, None, None]) -> Iterator[str]:
    try:
        yield _COMMENTS[first]
        for item in events:
            yield _COMMENTS[item] if isinstance(item, Marker) else item.to_sse()
    except RedisError as exc:
        # Never hang on a dead connection: say so and end; the client resumes with Last-Event-ID.
        log.warning("event stream of job %s lost Redis: %s", job_id, exc)
        data = {"type": "stream_interrupted",
                "message": "the event stream lost its connection to Redis; reconnect with Last-Event-ID to resume"}
        yield f"event: error\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
    finally:
        events.close()   # the client went away: unsubscribe now
