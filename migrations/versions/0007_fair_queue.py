"""fair sharing in the queue: jobs.lane (service tier), jobs.fair_charge, the claimable-jobs index,
and the fair_shares counters

Revision ID: fair_queue
Revises: key_weight
Create Date: 2026-11-29
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from app.infra.db import UTCDateTime

revision = "fair_queue"
down_revision = "key_weight"
branch_labels = None
depends_on = None

CLAIMABLE = "status = 'queued' AND (batch_id IS NULL OR released_at IS NOT NULL)"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("lane", sa.Integer(), nullable=False, server_default=sa.text("0")))
        batch.add_column(sa.Column("fair_charge", sa.Float(), nullable=True))
    # Batch lines queued before this revision move to the flex lane, as new ones start there.
    op.execute("UPDATE jobs SET lane = 1 WHERE batch_id IS NOT NULL")
    op.create_index("ix_jobs_claimable", "jobs", ["lane", "priority", "owner", "id"],
                    sqlite_where=sa.text(CLAIMABLE), postgresql_where=sa.text(CLAIMABLE))
    op.create_table(
        "fair_shares",
        sa.Column("tenant", sa.String(64), primary_key=True),
        sa.Column("counter", sa.Float(), nullable=False, server_default=sa.text("0")),
        sa.Column("served_tokens", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        sa.Column("last_claim_at", UTCDateTime(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("fair_shares")
    op.drop_index("ix_jobs_claimable", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("fair_charge")
        batch.drop_column("lane")
