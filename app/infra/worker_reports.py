"""Worker status reports in Redis: each worker writes its engine stats every few hundred ms; the
API lists the live ones (`/v1/workers`, `/metrics`)."""
from __future__ import annotations

import json
import time
from typing import Any

from redis import Redis

from app.infra.channels import Channels

LIVE_SECONDS = 30.0   # a worker silent this long is no longer listed


def write_report(redis: Redis, channels: Channels, worker_id: str, report: dict[str, Any],
                 ttl_seconds: float = LIVE_SECONDS) -> None:
    now = time.time()
    pipe = redis.pipeline(transaction=False)
    pipe.set(channels.worker_stats(worker_id), json.dumps({**report, "worker_id": worker_id, "reported_at": now}),
             px=int(ttl_seconds * 1000))
    pipe.zadd(channels.workers, {worker_id: now})
    pipe.zremrangebyscore(channels.workers, "-inf", now - ttl_seconds)
    pipe.execute()


def remove_report(redis: Redis, channels: Channels, worker_id: str) -> None:
    pipe = redis.pipeline(transaction=False)
    pipe.delete(channels.worker_stats(worker_id))
    pipe.zrem(channels.workers, worker_id)
    pipe.execute()


def live_workers(redis: Redis, channels: Channels) -> list[dict[str, Any]]:
    ids = redis.zrangebyscore(channels.workers, time.time() - LIVE_SECONDS, "+inf")
    if not ids:
        return []
    reports = redis.mget([channels.worker_stats(worker_id) for worker_id in ids])
    return [json.loads(report) for report in reports if report]
