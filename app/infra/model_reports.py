"""What a worker tells the API about the model it serves: the tokenizer (`tokenizer.json`
content) and the engine's context length, in one Redis hash per served model name
(`Channels.model_report`). The API measures prompts with it (app/tenancy/context_window.py) when
it cannot read the model's files itself: it has no torch, and may run on another machine.

A worker writes the report when its engine is loaded and writes it again if it vanished (Redis
restarted without persistence); workers serving one name serve one model, so the last writer wins.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from redis import Redis

from app.infra.channels import Channels


@dataclass(frozen=True, slots=True)
class ModelReport:
    model: str
    tokenizer_json: str
    max_model_len: int
    digest: str                      # sha256 of max_model_len and the tokenizer: what changed is reloaded


def report_digest(tokenizer_json: str, max_model_len: int) -> str:
    return hashlib.sha256(f"{max_model_len}\n{tokenizer_json}".encode()).hexdigest()


def publish_model(redis: Redis, channels: Channels, model: str, *, tokenizer_json: str, max_model_len: int,
                  worker_id: str | None = None) -> None:
    redis.hset(channels.model_report(model), mapping={
        "tokenizer": tokenizer_json, "max_model_len": int(max_model_len),
        "digest": report_digest(tokenizer_json, max_model_len), "worker_id": worker_id or "",
        "reported_at": time.time()})


def model_reported(redis: Redis, channels: Channels, model: str) -> bool:
    return bool(redis.exists(channels.model_report(model)))


def reported_digest(redis: Redis, channels: Channels, model: str) -> str | None:
    """The current report's digest (a cheap look whether the report changed), None without one."""
    digest = redis.hget(channels.model_report(model), "digest")
    return digest.decode() if isinstance(digest, bytes) else digest


def read_model(redis: Redis, channels: Channels, model: str) -> ModelReport | None:
    """The model's report, None when no worker has reported it yet (or the report is malformed)."""
    fields = redis.hgetall(channels.model_report(model))
    try:
        tokenizer_json, max_model_len = fields["tokenizer"], int(fields["max_model_len"])
    except (KeyError, TypeError, ValueError):
        return None
    if isinstance(tokenizer_json, bytes):
        tokenizer_json = tokenizer_json.decode()
    digest = fields.get("digest") or report_digest(tokenizer_json, max_model_len)
    return ModelReport(model, tokenizer_json, max_model_len, digest if isinstance(digest, str) else digest.decode())
