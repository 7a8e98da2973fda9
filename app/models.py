"""SQLAlchemy models. The schema changes only through Alembic migrations in `migrations/`."""
from __future__ import annotations

import os
import threading
import time
from datetime import datetime
from enum import Enum

from sqlalchemy import JSON, CheckConstraint, Index, Integer, LargeBinary, MetaData, String
from sqlalchemy import Float, ForeignKey, Text, UniqueConstraint
from sqlalchemy import text as sql_text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from app.db import NulSafeText, UTCDateTime, utcnow

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JSONType = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})
ALL_STATUSES = tuple(s.value for s in JobStatus)

# The predicates of the batch-line indexes; queries that should use them repeat these terms.
BATCH_HELD = "batch_id IS NOT NULL AND released_at IS NULL AND status = 'queued'"
BATCH_IN_FLIGHT = "released_at IS NOT NULL AND status IN ('queued', 'running')"

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"


_id_lock = threading.Lock()
_last_id = [0, 0]   # [milliseconds, random part] of the last id made by this process


def new_job_id() -> str:
    """26 URL-safe characters: 48 bits of milliseconds then 80 random bits (a lowercase ULID).

    Ids sort by creation time, so "newest first" and the list cursor are both plain id order.
    Within one millisecond a process counts up from its last id (ULID's monotonic mode), so its
    own jobs keep their submission order.
    """
    millis, rand = int(time.time() * 1000), int.from_bytes(os.urandom(10), "big")
    with _id_lock:
        if millis <= _last_id[0] and _last_id[1] < (1 << 80) - 1:
            millis, rand = _last_id[0], _last_id[1] + 1
        _last_id[:] = [millis, rand]
    value = (millis << 80) | rand
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_job_id)
    owner: Mapped[str | None] = mapped_column(String(64))      # API key id (security issue)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value)
    priority: Mapped[int] = mapped_column(Integer, default=0)   # lower = more urgent
    model: Mapped[str] = mapped_column(String(255))
    input: Mapped[dict] = mapped_column(JSONType)               # prompt | messages + sampling params
    meta: Mapped[dict | None] = mapped_column("metadata", JSONType)  # the client's own metadata
    output_text: Mapped[str | None] = mapped_column(NulSafeText())
    finish_reason: Mapped[str | None] = mapped_column(String(16))
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    cached_tokens: Mapped[int | None] = mapped_column(Integer)  # prompt tokens from the prefix cache
    error_type: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(NulSafeText())
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    first_token_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # per-sample outputs, only when a job asks for n > 1 or logprobs:
    # [{index, text, finish_reason, completion_tokens, logprobs?: [{token, logprob, top: [[token, logprob]]}]}]
    choices: Mapped[list | None] = mapped_column(JSONType)
    batch_id: Mapped[str | None] = mapped_column(String(40))    # the OpenAI-style batch this job is a line of
    custom_id: Mapped[str | None] = mapped_column(String(512))  # that line's custom_id
    # A batch line waits in the database until it is released (its task sent): at most
    # GENQ_BATCH_MAX_IN_FLIGHT lines of a batch are released and unfinished at once. NULL on a
    # batch line means held; jobs outside batches never use it.
    released_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (
        CheckConstraint("status IN ('queued', 'running', 'succeeded', 'failed', 'canceled')",
                        name="status_valid"),
        CheckConstraint("attempts >= 0", name="attempts_nonnegative"),
        Index("ix_jobs_owner_id", "owner", "id"),
        Index("ix_jobs_owner_status_id", "owner", "status", "id"),
        Index("ix_jobs_status_lease_expires_at", "status", "lease_expires_at"),
        Index("ix_jobs_batch_id_status", "batch_id", "status"),
        # Small partial indexes, so that releasing a line of a 50,000-line batch reads a few rows:
        # the held lines in release order, and the released lines still queued or running.
        Index("ix_jobs_batch_held", "batch_id", "id", sqlite_where=sql_text(BATCH_HELD),
              postgresql_where=sql_text(BATCH_HELD)),
        Index("ix_jobs_batch_in_flight", "batch_id", sqlite_where=sql_text(BATCH_IN_FLIGHT),
              postgresql_where=sql_text(BATCH_IN_FLIGHT)),
    )

    @property
    def job_status(self) -> JobStatus:
        return JobStatus(self.status)

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.status}>"


BATCH_STATUSES = ("validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                  "cancelled")


class File(Base):
    """An uploaded or generated file (OpenAI's Files API: batch inputs, outputs and error files)."""
    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)     # "file-<ulid>"
    owner: Mapped[str | None] = mapped_column(String(64))
    purpose: Mapped[str] = mapped_column(String(32))                   # batch | batch_output
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(Integer)
    content: Mapped[bytes] = mapped_column(LargeBinary())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    __table_args__ = (Index("ix_files_owner_id", "owner", "id"),)


class Batch(Base):
    """A batch of requests from a JSONL file; each valid line runs as a low-priority job."""
    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)     # "batch_<ulid>"
    owner: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="validating")
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(String(40))
    output_file_id: Mapped[str | None] = mapped_column(String(40))
    error_file_id: Mapped[str | None] = mapped_column(String(40))
    completion_window: Mapped[str] = mapped_column(String(16))
    meta: Mapped[dict | None] = mapped_column("metadata", JSONType)
    errors: Mapped[dict | None] = mapped_column(JSONType)               # batch-level errors (the file was unusable)
    line_errors: Mapped[list | None] = mapped_column(JSONType)          # [{line, custom_id, code, message}]
    total: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    in_progress_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finalizing_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    expired_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    cancelling_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    cancelled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_batches_owner_id", "owner", "id"),)


class JobWebhook(Base):
    """A job's callback registration (`webhook`, `webhook_events_filter` at submission)."""
    __tablename__ = "job_webhooks"

    job_id: Mapped[str] = mapped_column(String(32), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    url: Mapped[str] = mapped_column(Text())
    events_filter: Mapped[list] = mapped_column(JSONType)          # ["start", "output", "completed"] subset
    base_url: Mapped[str] = mapped_column(Text())                  # the API's URL as the client called it
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class WebhookEvent(Base):
    """One event of one job to deliver; its id is the `webhook-id` every attempt carries."""
    __tablename__ = "webhook_events"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_job_id)
    job_id: Mapped[str] = mapped_column(String(32), ForeignKey("jobs.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(32))                  # job.started | job.output | job.completed
    url: Mapped[str] = mapped_column(Text())
    payload: Mapped[str] = mapped_column(Text())                   # the exact body, the same on every attempt
    status: Mapped[str] = mapped_column(String(16), default="pending")   # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime())  # an attempt in flight holds it
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (
        CheckConstraint("status IN ('pending', 'delivered', 'failed')", name="status_valid"),
        # A redelivered or duplicated start/finish can never make a second started/completed event.
        Index("uq_webhook_events_job_id_type_once", "job_id", "type", unique=True,
              sqlite_where=sql_text("type IN ('job.started', 'job.completed')"),
              postgresql_where=sql_text("type IN ('job.started', 'job.completed')")),
        Index("ix_webhook_events_job_id_id", "job_id", "id"),
        Index("ix_webhook_events_status_next_attempt_at", "status", "next_attempt_at"),
    )


class WebhookAttempt(Base):
    """One HTTP attempt at delivering an event."""
    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(32), ForeignKey("webhook_events.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    duration_seconds: Mapped[float] = mapped_column(Float)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text())
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (UniqueConstraint("event_id", "attempt"),)


# API keys live in app/keys.py; importing it here puts their table on Base.metadata for every
# process that knows the jobs table (Alembic's autogenerate and the schema check compare the two).
from app import keys as _keys  # noqa: E402,F401
