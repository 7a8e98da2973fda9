"""fair sharing between API keys: api_keys.weight (1.0 for every existing key)

Revision ID: key_weight
Revises: batch_release
Create Date: 2026-11-27
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "key_weight"
down_revision = "batch_release"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("weight", sa.Float(), nullable=False, server_default=sa.text("1.0")))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("weight")
