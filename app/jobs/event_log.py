"""A job's event stream: the same events go to a replayable Redis stream (the log) and to the
job's pub/sub channel (live), written together in one pipeline.

Event ids are `<attempt>-<seq>`, used verbatim as Redis stream ids, so they order across worker
attempts and let SSE clients resume with `Last-Event-ID`: the log is read strictly after that id.
Types: `status` {status, attempt?}, `token` {text, token_ids}, `error` {type, message}, and `done`
{status, output, usage, error} which is always last.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable

from redis import Redis

from app.infra.channels import Channels

EVENT_TYPES = ("status", "token", "error", "done")


@dataclass(frozen=True, slots=True, order=True)
class EventId:
    attempt: int
    seq: int

    def __post_init__(self) -> None:
        if self.attempt < 0 or self.seq < 0 or (self.attempt, self.seq) == (0, 0):
            raise ValueError(f"invalid event id {self.attempt}-{self.seq}")

    def __str__(self) -> str:
        return f"{self.attempt}-{self.seq}"

    @property
    def next(self) -> "EventId":
        return EventId(self.attempt, self.seq + 1)

    @classmethod
    def parse(cls, text: str) -> "EventId":
        """Parse `<attempt>-<seq>`; raises ValueError for anything else."""
        attempt, sep, seq = text.strip().partition("-")
        if not sep or not attempt.isdigit() or not seq.isdigit():
            raise ValueError(f"event ids look like '1-5', got {text!r}")
        return cls(int(attempt), int(seq))


@dataclass(frozen=True, slots=True)
class JobEvent:
    id: EventId
    type: str
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.type not in EVENT_TYPES:
            raise ValueError(f"unknown event type {self.type!r}")

    def to_sse(self) -> str:
        return f"id: {self.id}\nevent: {self.type}\ndata: {json.dumps(self.data, separators=(',', ':'))}\n\n"

    def to_message(self) -> str:
        return json.dumps({"id": str(self.id), "type": self.type, "data": self.data}, separators=(",", ":"))

    @classmethod
    def from_message(cls, message: str | bytes) -> "JobEvent":
        body = json.loads(message)
        return cls(EventId.parse(body["id"]), body["type"], body["data"])

    @property
    def is_done(self) -> bool:
        return self.type == "done"


class EventLog:
    """Append / read one job's events. `redis` must decode responses (str, not bytes)."""

    def __init__(self, redis: Redis, channels: Channels, ttl_seconds: int):
        self.redis = redis
        self.channels = channels
        self.ttl_seconds = ttl_seconds

    def append(self, pipe, job_id: str, event: JobEvent) -> None:
        """Queue the log append and the live publish of `event` on a pipeline (log first)."""
        key = self.channels.job_events(job_id)
        pipe.xadd(key, {"type": event.type, "data": json.dumps(event.data, separators=(",", ":"))},
                  id=str(event.id))
        pipe.expire(key, self.ttl_seconds)
        pipe.publish(self.channels.job_live(job_id), event.to_message())

    def publish(self, job_id: str, events: Iterable[JobEvent]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for event in events:
            self.append(pipe, job_id, event)
        raise_first_error(pipe.execute(raise_on_error=False))

    def reset(self, job_id: str) -> None:
        """Forget a job's log (a new attempt regenerates from the start)."""
        self.redis.delete(self.channels.job_events(job_id))

    def read(self, job_id: str, after: EventId | None = None, until: EventId | None = None) -> list[JobEvent]:
        """Events strictly after `after` (all when None), up to and including `until`."""
        start = "-" if after is None else f"({after}"
        end = "+" if until is None else str(until)
        entries = self.redis.xrange(self.channels.job_events(job_id), min=start, max=end)
        return [JobEvent(EventId.parse(entry_id), fields["type"], json.loads(fields["data"]))
                for entry_id, fields in entries]


def raise_first_error(results: list) -> list:
    for result in results:
        if isinstance(result, Exception):
            raise result
    return results
