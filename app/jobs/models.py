"""The jobs table. The schema changes only through Alembic migrations in `migrations/`.
"""
from __future__ import annotations

from datetime import datetime
from enum import Enum

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Float,
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
# A job a worker may claim now: queued, and (a batch line) released. The fair claim's partial index.
CLAIMABLE = "status = 'queued' AND (batch_id IS NULL OR released_at IS NOT NULL)"

# Service tiers (OpenAI's `service_tier`): the lane a job waits in. With fair scheduling every job of
# the `default` lane is served before any of the `flex` lane (batch lines' default), whatever their
# priorities; priority orders jobs within a lane.
SERVICE_TIERS = {"default": 0, "flex": 1}
TIER_OF_LANE = {lane: tier for tier, lane in SERVICE_TIERS.items()}


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str | None] = mapped_column(String(64))      # API key id (security issue)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value)
    priority: Mapped[int] = mapped_column(Integer, default=0)   # lower = more urgent
    lane: Mapped[int] = mapped_column(Integer, default=0)       # SERVICE_TIERS: 0 default, 1 flex
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
    # Fair sharing (app/jobs/fair_queue.py): the cost charged to the owner's counter for this job, in
    # token units before the key's weight: an estimate from the claim on, the tokens served once final.
    # Set once per job, so a re-run after a lost worker is not charged twice.
    fair_charge: Mapped[float | None] = mapped_column(Float)

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
        # The claimable jobs in fair-claim order: the top (lane, priority), its owners, each one's oldest.
        Index("ix_jobs_claimable", "lane", "priority", "owner", "id", sqlite_where=sql_text(CLAIMABLE),
              postgresql_where=sql_text(CLAIMABLE)),
    )

    @property
    def job_status(self) -> JobStatus:
        return JobStatus(self.status)

    @property
    def service_tier(self) -> str:
        return TIER_OF_LANE.get(self.lane or 0, "default")

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.status}>"


class FairShare(Base):
    """One tenant's virtual token counter for the fair claim (app/jobs/fair_queue.py). The tenant is
    the jobs' owner (an API key id; "" for jobs without one); the row `*` holds the queue's virtual
    time, the floor a tenant back from idle is lifted to."""
    __tablename__ = "fair_shares"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    counter: Mapped[float] = mapped_column(Float, default=0.0)           # weighted cost served (charged)
    served_tokens: Mapped[int] = mapped_column(BigInteger, default=0)    # prompt + output tokens of its final jobs
    last_claim_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
