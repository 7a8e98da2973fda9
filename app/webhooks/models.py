"""The webhook tables: a job's registration, its events and their delivery attempts.
"""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy import text as sql_text
from sqlalchemy.orm import Mapped, mapped_column

from app.infra.db import Base, JSONType, UTCDateTime, utcnow
from app.infra.ids import new_id


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

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
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
