"""Files (OpenAI's Files API): uploaded batch inputs, generated batch outputs and error files.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.infra.db import utcnow
from app.infra.ids import new_id, well_formed_id
from app.openai.models import File

BATCH_PURPOSE = "batch"
OUTPUT_PURPOSE = "batch_output"
FILE_ID_PREFIX = "file-"


def owned_by(column, owner: str | None):
    return column.is_(None) if owner is None else column == owner


def timestamp(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp())


def create_file(session: Session, *, owner: str | None, purpose: str, filename: str, content: bytes) -> File:
    file = File(id=new_id(FILE_ID_PREFIX), owner=owner, purpose=purpose, filename=filename, bytes=len(content),
                content=content, created_at=utcnow())
    session.add(file)
    return file


def get_file(session: Session, file_id: str, owner: str | None) -> File | None:
    if not well_formed_id(file_id, FILE_ID_PREFIX):
        return None
    return session.scalars(select(File).where(File.id == file_id, owned_by(File.owner, owner))).one_or_none()


def list_files(session: Session, owner: str | None, limit: int = 100) -> list[File]:
    return list(session.scalars(select(File).where(owned_by(File.owner, owner)).order_by(File.id.desc())
                                .limit(limit)))


def file_to_dict(file: File) -> dict[str, Any]:
    return {"id": file.id, "object": "file", "bytes": file.bytes, "created_at": timestamp(file.created_at),
            "filename": file.filename, "purpose": file.purpose, "status": "processed", "status_details": None,
            "expires_at": None}
