"""Metric sources the API reads at scrape time that live outside the database: the broker queue."""
from __future__ import annotations

from redis import Redis

from app.channels import Channels
from worker.celery_app import PRIORITY_STEPS

KOMBU_PRIORITY_SEPARATOR = "\x06\x16"   # kombu's Redis transport names priority lists `<queue>SEP<priority>`


def queue_depth(redis: Redis, channels: Channels, queue: str) -> int:
    """Tasks waiting in the Celery queue (every priority list), not yet taken by a worker."""
    names = [channels.kombu_prefix + (queue if step == 0 else f"{queue}{KOMBU_PRIORITY_SEPARATOR}{step}")
             for step in PRIORITY_STEPS]
    pipe = redis.pipeline(transaction=False)
    for name in names:
        pipe.llen(name)
    return sum(pipe.execute())
