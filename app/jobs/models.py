"""The jobs table. The schema changes only through Alembic migrations in `migrations/`.
"""
from __future__ import annotations

from datetime import datetime
from enum import Enum

from sqlalchemy import (
    CheckConstraint,
    Index,
    Integer,
    String,
)
from sqlalchemy import text as sql_text
from sqlalchemy.orm import Mapped, mapped_column

from app.infra.db import Base, JSONType, NulSafeText, UTCDateTime, utcnow
from app.infra.ids import new_id


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


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
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
