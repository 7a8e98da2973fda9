"""Jobs on their way to the engine (`WorkerRuntime.arriving`, what the engine loop waits for before a
step from nothing): a run_job task counts from the moment Celery's consumer receives it, through its
claim, until its job is submitted; a received task no thread ever takes stops counting."""
from __future__ import annotations

import uuid

from kombu.message import Message
from kombu.serialization import dumps

import worker.runtime as runtime_module
from app.infra.broker import TASK_DELIVER_WEBHOOK, TASK_RUN_JOB, make_celery
from worker.main import _expect_jobs


def received(app, name: str, *args):
    """The `Request` Celery's consumer builds from a task message it received, and the
    `task_received` signal it sends with it."""
    from celery.signals import task_received
    from celery.worker.request import Request

    import worker.tasks  # noqa: F401  (registers genq's tasks)

    message = app.amqp.as_task_v2(str(uuid.uuid4()), name, args=args)
    content_type, encoding, body = dumps(message.body, serializer="json")
    request = Request(Message(body=body, content_type=content_type, content_encoding=encoding,
                              headers=message.headers, properties=message.properties,
                              delivery_info={"exchange": "", "routing_key": "genq"}), app=app)
    task_received.send(sender=None, request=request)


def test_a_received_job_task_counts_as_arriving_until_its_thread_takes_it(runtime, monkeypatch):
    from celery.signals import task_received

    app = make_celery(runtime.settings, runtime.redis_url)
    receiver = _expect_jobs(runtime)
    try:
        _check(app, runtime, monkeypatch)
    finally:
        task_received.disconnect(receiver)


def _check(app, runtime, monkeypatch):
    base = runtime.arriving()
    received(app, TASK_RUN_JOB, "job-on-its-way")
    assert runtime.arriving() == base + 1
    received(app, TASK_DELIVER_WEBHOOK, "event-1", 1)   # not a job: the engine waits for nothing
    assert runtime.arriving() == base + 1
    with runtime.arrival("job-on-its-way") as arrived:      # its thread took it: counted once, not twice
        assert runtime.arriving() == base + 1
        arrived()                                             # submitted to the engine
        assert runtime.arriving() == base
    assert runtime.arriving() == base

    received(app, TASK_RUN_JOB, "job-never-taken")   # e.g. the worker stopped before running it
    assert runtime.arriving() == base + 1
    monkeypatch.setattr(runtime_module, "EXPECT_SECONDS", 0.0)   # ... and EXPECT_SECONDS went by
    assert runtime.arriving() == base
