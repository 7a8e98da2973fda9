"""API keys: who a request comes from, and what it may do.

A key is shown once, when it is created (`gq_` + 43 URL-safe characters, 256 random bits); the
database keeps only its SHA-256 (a key has the entropy of a random token, so a fast hash is as good
as a slow one, and lookups stay one indexed SELECT). A key's id (`key_...`) is the owner of the jobs
it submits. Its weight is its share of the engine under contention (fair sharing, docs/engine.md):
a key of weight 2 gets about twice the tokens of a key of weight 1. Each key carries the secret its jobs' webhooks are signed with (Standard Webhooks:
`whsec_` + base64 of 32 random bytes), which must be kept in clear to sign, and its own quotas (None
means the service-wide default from the settings).
"""
from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Float, Integer, String, select, text, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from app.infra.db import Base, UTCDateTime, utcnow
from app.infra.ids import new_id
from app.infra.webhook_secrets import generate_secret

KEY_PREFIX = "gq_"
DISPLAY_CHARS = 10          # what `genq keys list` shows of a key: "gq_" + 7 characters
DEFAULT_WEIGHT = 1.0        # a key's share under contention; jobs without a key count as weight 1 too
MAX_WEIGHT = 100.0          # a sane upper bound: one key may not starve everyone else out


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)     # sha256 hex of the key
    display_prefix: Mapped[str] = mapped_column(String(16))
    webhook_secret: Mapped[str] = mapped_column(String(128))
    rate_limit_per_minute: Mapped[int | None] = mapped_column(Integer)
    max_active_jobs: Mapped[int | None] = mapped_column(Integer)
    max_tokens: Mapped[int | None] = mapped_column(Integer)
    weight: Mapped[float] = mapped_column(Float, default=DEFAULT_WEIGHT, server_default=text("1.0"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True, slots=True)
class KeyIdentity:
    """What a request knows about its caller (a plain value: ORM objects stay in their session)."""
    id: str
    name: str
    webhook_secret: str
    rate_limit_per_minute: int | None
    max_active_jobs: int | None
    max_tokens: int | None
    weight: float = DEFAULT_WEIGHT

    @classmethod
    def of(cls, key: ApiKey) -> "KeyIdentity":
        return cls(key.id, key.name, key.webhook_secret, key.rate_limit_per_minute, key.max_active_jobs,
                   key.max_tokens, DEFAULT_WEIGHT if key.weight is None else float(key.weight))


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8", "surrogatepass")).hexdigest()


def check_weight(weight: float) -> float:
    """A valid key weight as a float: finite, > 0 and <= MAX_WEIGHT (ValueError otherwise)."""
    try:
        value = float(weight)
    except (TypeError, ValueError):
        raise ValueError(f"weight must be a number, got {weight!r}") from None
    if isinstance(weight, bool) or not math.isfinite(value) or not 0 < value <= MAX_WEIGHT:
        raise ValueError(f"weight must be > 0 and <= {MAX_WEIGHT:g}, got {weight!r}")
    return value


def create_key(session: Session, name: str, *, rate_limit_per_minute: int | None = None,
               max_active_jobs: int | None = None, max_tokens: int | None = None,
               weight: float = DEFAULT_WEIGHT) -> tuple[ApiKey, str]:
    """Insert a new key; returns it and its plaintext (shown once, never stored)."""
    if not name or len(name) > 255:
        raise ValueError("a key name must be 1 to 255 characters")
    for label, value in (("rate_limit_per_minute", rate_limit_per_minute), ("max_active_jobs", max_active_jobs),
                         ("max_tokens", max_tokens)):
        if value is not None and value <= 0:
            raise ValueError(f"{label} must be > 0, got {value}")
    weight = check_weight(weight)
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(id=new_id("key_"), name=name, key_hash=hash_key(plaintext),
                 display_prefix=plaintext[:DISPLAY_CHARS], webhook_secret=generate_secret(),
                 rate_limit_per_minute=rate_limit_per_minute, max_active_jobs=max_active_jobs,
                 max_tokens=max_tokens, weight=weight, created_at=utcnow())
    session.add(key)
    session.flush()
    return key, plaintext


def authenticate(session: Session, plaintext: str) -> KeyIdentity | None:
    """The live key whose plaintext this is; None for unknown, malformed or revoked keys."""
    if not plaintext.startswith(KEY_PREFIX) or len(plaintext) > 128:
        return None
    digest = hash_key(plaintext)
    key = session.scalars(select(ApiKey).where(ApiKey.key_hash == digest)).one_or_none()
    # The lookup is by hash, so timing says nothing about the key; compare anyway, for clarity.
    if key is None or key.revoked or not hmac.compare_digest(key.key_hash, digest):
        return None
    return KeyIdentity.of(key)


def list_keys(session: Session, include_revoked: bool = False) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.created_at)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    return list(session.scalars(query))


def revoke_key(session: Session, id_or_prefix: str) -> list[str]:
    """Revoke the key with this id, or the one key whose displayed prefix or plaintext this is.

    Returns the ids revoked (empty if nothing matched; ValueError if a prefix is ambiguous).
    """
    matches = session.scalars(select(ApiKey).where(
        (ApiKey.id == id_or_prefix) | (ApiKey.display_prefix == id_or_prefix)
        | (ApiKey.key_hash == hash_key(id_or_prefix)), ApiKey.revoked_at.is_(None))).all()
    if len(matches) > 1:
        raise ValueError(f"{id_or_prefix!r} matches {len(matches)} keys; give the key id")
    ids = [key.id for key in matches]
    if ids:
        session.execute(update(ApiKey).where(ApiKey.id.in_(ids)).values(revoked_at=utcnow())
                        .execution_options(synchronize_session=False))
    return ids


def webhook_secret_of_owner(session: Session, owner: str | None) -> str | None:
    """The signing secret of the key that owns a job (None for jobs from before keys existed)."""
    if owner is None:
        return None
    return session.scalar(select(ApiKey.webhook_secret).where(ApiKey.id == owner))


def key_weight(session: Session, key_id: str | None) -> float:
    """A job owner's weight for fair sharing (one indexed SELECT of one column, for the worker when a
    job starts; the fair claim reads it with its candidates): DEFAULT_WEIGHT for jobs without an
    owner and for unknown keys. A revoked key keeps its weight: its jobs already admitted still run."""
    if key_id is None:
        return DEFAULT_WEIGHT
    weight = session.scalar(select(ApiKey.weight).where(ApiKey.id == key_id))
    return DEFAULT_WEIGHT if weight is None else float(weight)
