"""The Celery producer: the Celery app (Redis broker, late acks, keys under the genq prefix), every
task name, one `send_*` function per task, and the broker queue's depth.

No Flask and no torch: the API sends tasks with it, the worker consumes them (worker/tasks.py).
"""
from __future__ import annotations

import json

from celery import Celery
from redis import Redis

from app.infra.channels import Channels
from app.infra.redis_client import kombu_url
from app.infra.settings import Settings

TASK_RUN_JOB = "genq.run_job"
TASK_START_BATCH = "genq.start_batch"
TASK_DELIVER_WEBHOOK = "genq.deliver_webhook"

# Redis has no native priorities; kombu emulates 10 levels with one list per level, 0 served first.
PRIORITY_STEPS = list(range(10))


def make_celery(settings: Settings, redis_url: str, *, set_as_current: bool = False) -> Celery:
    channels = Channels(settings.key_prefix)
    app = Celery("genq", set_as_current=set_as_current)
    app.conf.update(
        broker_url=kombu_url(redis_url),
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "global_keyprefix": channels.kombu_prefix,
            "priority_steps": PRIORITY_STEPS,
            "queue_order_strategy": "priority",
            # A task unacknowledged this long is handed out again; the job's lease decides
            # whether the redelivery runs it (dead worker) or drops it (live worker).
            "visibility_timeout": 6 * 3600,
        },
        task_default_queue=settings.queue,
        task_routes={TASK_RUN_JOB: {"queue": settings.queue}},
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_enable_remote_control=False,   # no pidbox: nothing shared between deployments
        worker_send_task_events=settings.celery_events,   # Flower reads these
        task_send_sent_event=settings.celery_events,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


def send_run_job(celery: Celery, settings: Settings, job_id: str, priority: int) -> None:
    celery.send_task(TASK_RUN_JOB, args=[job_id], queue=settings.queue, priority=priority)


def announce_queued(redis: Redis, channels: Channels, owner: str | None) -> None:
    """Tell the workers that a job of `owner` (an API key id; None: no key) was queued, on their
    control channel: with fair scheduling a worker whose task threads are all busy claims it into
    its newcomer reserve at once where that key is under its share (worker/runtime.py), instead of
    looking for one every so often. Only a wake-up: a worker that misses it finds the job when it
    next looks, and the job's own task runs it either way."""
    redis.publish(channels.control, json.dumps({"type": "queued", "owner": owner}))


def send_start_batch(celery: Celery, settings: Settings, batch_id: str) -> None:
    celery.send_task(TASK_START_BATCH, args=[batch_id], queue=settings.queue, priority=0)


def webhook_queue(settings: Settings) -> str:
    """The Celery queue of delivery tasks (workers consume it beside the jobs queue)."""
    return f"{settings.queue}.webhooks"


def send_delivery(celery: Celery, settings: Settings, event_id: str, attempt: int, countdown: float = 0.0) -> None:
    celery.send_task(TASK_DELIVER_WEBHOOK, args=[event_id, attempt], queue=webhook_queue(settings),
                     countdown=countdown or None)


KOMBU_PRIORITY_SEPARATOR = "\x06\x16"   # kombu's Redis transport names priority lists `<queue>SEP<priority>`


def queue_depth(redis: Redis, channels: Channels, queue: str) -> int:
    """Tasks waiting in the Celery queue (every priority list), not yet taken by a worker."""
    names = [channels.kombu_prefix + (queue if step == 0 else f"{queue}{KOMBU_PRIORITY_SEPARATOR}{step}")
             for step in PRIORITY_STEPS]
    pipe = redis.pipeline(transaction=False)
    for name in names:
        pipe.llen(name)
    return sum(pipe.execute())
