"""The files and batches tables (OpenAI's Files and Batch APIs).
"""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    Index,
    Integer,
    LargeBinary,
    String,
)
from sqlalchemy.orm import Mapped, mapped_column

from app.infra.db import Base, JSONType, UTCDateTime, utcnow

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
