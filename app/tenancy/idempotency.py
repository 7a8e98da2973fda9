"""Idempotency keys for job submission (`Idempotency-Key` on `POST /v1/jobs`), kept in Redis.

A record lives under `<prefix>:idem:<owner>:<sha256 of the key>`, so keys are scoped to the API
key that sent them. Its value is `{"fp": <fingerprint of the body>, "job_id": <id or null>}`:

- `claim` creates it with `SET NX` (one request wins; every concurrent twin sees it) and a short
  TTL while the request is processed, so a process that dies mid-request frees the key soon;
- `complete` stores the job id and extends the TTL to the retention period (24 h by default);
- `release` deletes it when the request failed before creating a job, so a retry can proceed.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

from redis import Redis

PROCESSING_TTL_SECONDS = 120    # longer than any submission takes, including `Prefer: wait=60`
MAX_KEY_LENGTH = 255


class ClaimState(Enum):
    NEW = "new"                  # this request owns the key: create the job, then `complete`
    REPLAY = "replay"            # the same body was submitted before: answer with `job_id`
    IN_PROGRESS = "in_progress"  # the first request with this key is still being processed
    MISMATCH = "mismatch"        # the key was used with a different body


@dataclass(frozen=True, slots=True)
class Claim:
    state: ClaimState
    job_id: str | None = None


def fingerprint(body: Any) -> str:
    """The same JSON value gives the same fingerprint, whatever its key order or spacing."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def valid_key(key: str) -> bool:
    return 1 <= len(key) <= MAX_KEY_LENGTH and all(0x20 < ord(ch) < 0x7F for ch in key)


class IdempotencyStore:
    def __init__(self, redis: Redis, key_prefix: str, ttl_seconds: int):
        self.redis = redis
        self.key_prefix = key_prefix
        self.ttl_seconds = ttl_seconds

    def _name(self, owner: str, key: str) -> str:
        return f"{self.key_prefix}:idem:{owner}:{hashlib.sha256(key.encode()).hexdigest()}"

    def claim(self, owner: str, key: str, body_fingerprint: str) -> Claim:
        name = self._name(owner, key)
        record = json.dumps({"fp": body_fingerprint, "job_id": None})
        if self.redis.set(name, record, nx=True, ex=PROCESSING_TTL_SECONDS):
            return Claim(ClaimState.NEW)
        raw = self.redis.get(name)
        if raw is None:             # expired between the two calls: try once more
            if self.redis.set(name, record, nx=True, ex=PROCESSING_TTL_SECONDS):
                return Claim(ClaimState.NEW)
            raw = self.redis.get(name) or record
        existing = json.loads(raw)
        if existing["fp"] != body_fingerprint:
            return Claim(ClaimState.MISMATCH, existing.get("job_id"))
        if existing.get("job_id") is None:
            return Claim(ClaimState.IN_PROGRESS)
        return Claim(ClaimState.REPLAY, existing["job_id"])

    def complete(self, owner: str, key: str, body_fingerprint: str, job_id: str) -> None:
        self.redis.set(self._name(owner, key), json.dumps({"fp": body_fingerprint, "job_id": job_id}),
                       ex=self.ttl_seconds)

    def release(self, owner: str, key: str) -> None:
        self.redis.delete(self._name(owner, key))
