"""The API's connections (database sessions, Redis, the Celery producer), created unbound and
attached to an app in `create_app` (the Flask extension pattern)."""
from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from flask import Flask, current_app
from redis import Redis
from sqlalchemy.orm import Session, sessionmaker

from app.infra.broker import make_celery
from app.infra.channels import Channels
from app.infra.db import session_factory
from app.infra.redis_client import redis_client, resolve_redis_url
from app.infra.settings import Settings
from app.jobs.event_log import EventLog


@dataclass(slots=True)
class Services:
    settings: Settings
    sessions: sessionmaker[Session]
    redis: Redis
    channels: Channels
    events: EventLog
    celery: Celery


class GenqExtension:
    name = "genq"

    def init_app(self, app: Flask, settings: Settings) -> None:
        redis_url = resolve_redis_url(settings)
        channels = Channels(settings.key_prefix)
        redis = redis_client(redis_url)
        app.extensions[self.name] = Services(
            settings=settings, sessions=session_factory(settings.database_url), redis=redis,
            channels=channels, events=EventLog(redis, channels, settings.event_ttl_seconds),
            celery=make_celery(settings, redis_url))


genq = GenqExtension()


def services() -> Services:
    return current_app.extensions[GenqExtension.name]
