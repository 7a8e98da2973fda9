"""The Celery application: a Redis broker, late acks, and every key under the genq prefix.

This module imports neither Flask nor torch: the API uses it to send tasks by name, the worker to
consume them (it adds `worker.tasks`).
"""
from __future__ import annotations

from celery import Celery

from app.channels import TASK_RUN_JOB, Channels
from app.redis_client import kombu_url
from app.settings import Settings

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
