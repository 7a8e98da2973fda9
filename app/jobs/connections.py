"""What the job flows (submit, cancel, follow) run on: one process's connections to a deployment.

The API opens one per app (app/api/services.py), the worker one per process (worker/runtime.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from redis import Redis
from sqlalchemy.orm import Session, sessionmaker

from app.infra.broker import make_celery
from app.infra.channels import Channels
from app.infra.db import session_factory
from app.infra.redis_client import redis_client, resolve_redis_url
from app.infra.settings import Settings
from app.jobs.event_log import EventLog


@dataclass(slots=True)
class Connections:
    settings: Settings
    redis_url: str                   # REDIS_URL, or the embedded server's socket
    sessions: sessionmaker[Session]
    redis: Redis
    channels: Channels
    events: EventLog
    celery: Celery

    @classmethod
    def open(cls, settings: Settings) -> "Connections":
        redis_url = resolve_redis_url(settings)
        redis = redis_client(redis_url)
        channels = Channels(settings.key_prefix)
        return cls(settings=settings, redis_url=redis_url, sessions=session_factory(settings.database_url), redis=redis,
                   channels=channels, events=EventLog(redis, channels, settings.event_ttl_seconds),
                   celery=make_celery(settings, redis_url))
