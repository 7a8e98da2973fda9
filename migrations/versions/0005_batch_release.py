"""batch lines are released a few at a time: jobs.released_at and two partial indexes

Revision ID: batch_release
Revises: webhooks
Create Date: 2026-11-26
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from app.infra.db import UTCDateTime

revision = "batch_release"
down_revision = "webhooks"
branch_labels = None
depends_on = None

# as app.jobs.models.BATCH_HELD / BATCH_IN_FLIGHT (a migration keeps its own copy: the models may change)
BATCH_HELD = "batch_id IS NOT NULL AND released_at IS NULL AND status = 'queued'"
BATCH_IN_FLIGHT = "released_at IS NOT NULL AND status IN ('queued', 'running')"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("released_at", UTCDateTime(), nullable=True))
    # Lines of batches started before this revision were all queued at once: they count as released.
    op.execute("UPDATE jobs SET released_at = created_at WHERE batch_id IS NOT NULL")
    op.create_index("ix_jobs_batch_held", "jobs", ["batch_id", "id"], sqlite_where=sa.text(BATCH_HELD),
                    postgresql_where=sa.text(BATCH_HELD))
    op.create_index("ix_jobs_batch_in_flight", "jobs", ["batch_id"], sqlite_where=sa.text(BATCH_IN_FLIGHT),
                    postgresql_where=sa.text(BATCH_IN_FLIGHT))


def downgrade() -> None:
    op.drop_index("ix_jobs_batch_in_flight", table_name="jobs")
    op.drop_index("ix_jobs_batch_held", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("released_at")
