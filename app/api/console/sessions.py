"""Console sign-ins, kept on the server.

Signing in with an API key creates a session: a random token (256 bits) that goes to the browser in
an HttpOnly cookie, and a record in Redis under the SHA-256 of that token (a copy of Redis gives
no usable cookie) holding the key's id, the session's CSRF token and when it began. The key itself
is never stored, nor put in a URL. Every request looks the key up again by its id, so a revoked key
ends its sessions at once. Records expire after SESSION_TTL_SECONDS; signing out deletes it.
"""
from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import asdict, dataclass

from redis import Redis
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.infra.channels import Channels
from app.tenancy.keys import ApiKey, KeyIdentity

SESSION_TTL_SECONDS = 8 * 3600
TOKEN_BYTES = 32
MAX_TOKEN_CHARS = 64       # token_urlsafe(32) is 43 characters; anything much longer is not ours


@dataclass(frozen=True, slots=True)
class ConsoleSession:
    key_id: str
    csrf_token: str
    created_at: float


class SessionStore:
    def __init__(self, redis: Redis, channels: Channels, ttl_seconds: int = SESSION_TTL_SECONDS):
        self.redis = redis
        self.channels = channels
        self.ttl_seconds = ttl_seconds

    def create(self, key_id: str) -> tuple[str, ConsoleSession]:
        """A new session for `key_id`: (the cookie's token, the session)."""
        token = secrets.token_urlsafe(TOKEN_BYTES)
        session = ConsoleSession(key_id, secrets.token_urlsafe(TOKEN_BYTES), time.time())
        self.redis.set(self._name(token), json.dumps(asdict(session)), ex=self.ttl_seconds)
        return token, session

    def get(self, token: str | None) -> ConsoleSession | None:
        if not token or len(token) > MAX_TOKEN_CHARS:
            return None
        raw = self.redis.get(self._name(token))
        return None if raw is None else ConsoleSession(**json.loads(raw))

    def delete(self, token: str | None) -> None:
        if token and len(token) <= MAX_TOKEN_CHARS:
            self.redis.delete(self._name(token))

    def _name(self, token: str) -> str:
        return self.channels.console_session(hashlib.sha256(token.encode()).hexdigest())


def live_key(session: Session, key_id: str) -> KeyIdentity | None:
    """The key with this id, unless it is revoked (or gone)."""
    key = session.scalars(select(ApiKey).where(ApiKey.id == key_id)).one_or_none()
    return None if key is None or key.revoked else KeyIdentity.of(key)
