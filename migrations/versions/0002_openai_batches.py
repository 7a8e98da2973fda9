"""OpenAI-compatible endpoints and batches: files, batches; per-sample outputs and batch lines on jobs

Revision ID: openai_batches
Revises: 0001
Create Date: 2026-11-25
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from app.infra.db import UTCDateTime

revision = "openai_batches"
down_revision = "0001"
branch_labels = None
depends_on = None

JSONType = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("choices", JSONType, nullable=True))
        batch.add_column(sa.Column("batch_id", sa.String(40), nullable=True))
        batch.add_column(sa.Column("custom_id", sa.String(512), nullable=True))
    op.create_index("ix_jobs_batch_id_status", "jobs", ["batch_id", "status"])
    op.create_table(
        "files",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("owner", sa.String(64), nullable=True),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("bytes", sa.Integer(), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_files"),
    )
    op.create_index("ix_files_owner_id", "files", ["owner", "id"])
    op.create_table(
        "batches",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("owner", sa.String(64), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("input_file_id", sa.String(40), nullable=False),
        sa.Column("output_file_id", sa.String(40), nullable=True),
        sa.Column("error_file_id", sa.String(40), nullable=True),
        sa.Column("completion_window", sa.String(16), nullable=False),
        sa.Column("metadata", JSONType, nullable=True),
        sa.Column("errors", JSONType, nullable=True),
        sa.Column("line_errors", JSONType, nullable=True),
        sa.Column("total", sa.Integer(), nullable=False),
        *[sa.Column(name, UTCDateTime(), nullable=name != "created_at") for name in (
            "created_at", "expires_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at",
            "expired_at", "cancelling_at", "cancelled_at")],
        sa.PrimaryKeyConstraint("id", name="pk_batches"),
    )
    op.create_index("ix_batches_owner_id", "batches", ["owner", "id"])


def downgrade() -> None:
    op.drop_index("ix_batches_owner_id", table_name="batches")
    op.drop_table("batches")
    op.drop_index("ix_files_owner_id", table_name="files")
    op.drop_table("files")
    op.drop_index("ix_jobs_batch_id_status", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("custom_id")
        batch.drop_column("batch_id")
        batch.drop_column("choices")
