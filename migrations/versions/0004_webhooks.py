"""webhooks: job_webhooks, webhook_events, webhook_attempts

Revision ID: webhooks
Revises: api_keys
Create Date: 2026-11-25
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from app.infra.db import UTCDateTime

revision = "webhooks"
down_revision = "api_keys"
branch_labels = None
depends_on = None

JSONType = sa.JSON().with_variant(JSONB(), "postgresql")
ONCE_PER_JOB = "type IN ('job.started', 'job.completed')"


def upgrade() -> None:
    op.create_table(
        "job_webhooks",
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("events_filter", JSONType, nullable=False),
        sa.Column("base_url", sa.Text(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", name="pk_job_webhooks"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_job_webhooks_job_id_jobs", ondelete="CASCADE"),
    )
    op.create_table(
        "webhook_events",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=True),
        sa.Column("locked_until", UTCDateTime(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("completed_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_webhook_events"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_webhook_events_job_id_jobs", ondelete="CASCADE"),
        sa.CheckConstraint("status IN ('pending', 'delivered', 'failed')", name="ck_webhook_events_status_valid"),
    )
    op.create_index("uq_webhook_events_job_id_type_once", "webhook_events", ["job_id", "type"], unique=True,
                    sqlite_where=sa.text(ONCE_PER_JOB), postgresql_where=sa.text(ONCE_PER_JOB))
    op.create_index("ix_webhook_events_job_id_id", "webhook_events", ["job_id", "id"])
    op.create_index("ix_webhook_events_status_next_attempt_at", "webhook_events", ["status", "next_attempt_at"])
    op.create_table(
        "webhook_attempts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(32), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("duration_seconds", sa.Float(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_webhook_attempts"),
        sa.ForeignKeyConstraint(["event_id"], ["webhook_events.id"], name="fk_webhook_attempts_event_id_webhook_events",
                                ondelete="CASCADE"),
        sa.UniqueConstraint("event_id", "attempt", name="uq_webhook_attempts_event_id_attempt"),
    )


def downgrade() -> None:
    op.drop_table("webhook_attempts")
    op.drop_index("ix_webhook_events_status_next_attempt_at", table_name="webhook_events")
    op.drop_index("ix_webhook_events_job_id_id", table_name="webhook_events")
    op.drop_index("uq_webhook_events_job_id_type_once", table_name="webhook_events")
    op.drop_table("webhook_events")
    op.drop_table("job_webhooks")
