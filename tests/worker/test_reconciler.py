"""The reconciler's choice of stuck jobs, its per-job rate limit and lock, and giving up after
max_attempts (real database and Redis, no Celery)."""
from __future__ import annotations

import time
from datetime import timedelta

import pytest
from sqlalchemy import update

from app.infra.broker import make_celery
from app.infra.channels import Channels
from app.infra.db import session_factory, utcnow
from app.infra.redis_client import redis_client
from app.jobs import store
from app.jobs.models import Job, JobStatus
from app.openai.batches import sweep_batches
from app.openai.models import Batch
from worker.reconciler import Reconciler, stale_jobs


def make_job(sessions, *, status="queued", age=0.0, lease_in=None, attempts=0, priority=0) -> str:
    now = utcnow()
    with sessions.begin() as session:
        job = store.create_job(session, model="tiny", input={"prompt": "x", "max_tokens": 4}, priority=priority,
                               now=now - timedelta(seconds=age))
    with sessions.begin() as session:
        session.execute(update(Job).where(Job.id == job.id).values(
            status=status, attempts=attempts, worker_id="w-dead" if status == "running" else None,
            lease_expires_at=None if lease_in is None else now + timedelta(seconds=lease_in)))
    return job.id


@pytest.fixture
def reco_settings(settings):
    return settings.with_(requeue_after_seconds=30, reconcile_interval_seconds=1, max_attempts=2)


@pytest.fixture
def sessions(reco_settings):
    sessions = session_factory(reco_settings.database_url)
    with sessions.begin() as session:
        session.execute(update(Job).where(Job.status.in_(["queued", "running"])).values(status="canceled"))
    return sessions


def test_stale_jobs_are_old_queued_ones_and_expired_leases(reco_settings, sessions):
    old_queued = make_job(sessions, age=60, priority=3)
    make_job(sessions, age=1)                                      # fresh: its task is on its way
    orphan = make_job(sessions, status="running", lease_in=-1, attempts=1)
    make_job(sessions, status="running", lease_in=30, attempts=1)  # a live worker holds it
    make_job(sessions, status="succeeded", age=60)
    with sessions() as session:
        assert stale_jobs(session, requeue_after_seconds=30) == [(old_queued, 3), (orphan, 0)]


def test_a_sweep_sends_each_stuck_job_once_per_period_and_one_worker_sweeps(reco_settings, sessions):
    redis = redis_client(reco_settings.redis_url)
    channels = Channels(reco_settings.key_prefix)
    redis.delete(f"{channels.prefix}:reconciler:lock")
    stuck = [make_job(sessions, age=60), make_job(sessions, status="running", lease_in=-5, attempts=1)]
    sent: list[str] = []
    extra: list[int] = []
    first = Reconciler(reco_settings, sessions, redis, channels, lambda job_id, _: sent.append(job_id),
                       extra_sweeps=(lambda: extra.append(1),))
    other = Reconciler(reco_settings, sessions, redis, channels, lambda job_id, _: sent.append(job_id))
    assert first.sweep() == 2 and sorted(sent) == sorted(stuck) and extra == [1]
    assert other.sweep() == 0                    # the lock: one worker sweeps per interval
    assert first.sweep(force=True) == 0          # each job is sent at most once per requeue period
    assert len(sent) == 2


def test_a_job_whose_workers_kept_dying_fails_with_worker_lost(settings, engine):
    from worker.runtime import WorkerRuntime

    runtime = WorkerRuntime(settings.with_(max_attempts=2), engine=engine).start()
    try:
        job_id = make_job(runtime.sessions, status="running", lease_in=-1, attempts=2)
        assert runtime.run_job(job_id) == "failed"
        with runtime.sessions() as session:
            job = session.get(Job, job_id)
        assert job.status == JobStatus.FAILED.value and job.error_type == "worker_lost"
        assert "each of its 2 attempts" in job.error_message
        assert runtime.run_job(job_id) == "skipped"   # final: a redelivery does nothing
    finally:
        runtime.stop()


# -- batches: held lines, lost releases, expiry ---------------------------------------------------

def make_batch(sessions, lines: int, cap: int, *, age=0.0) -> tuple[str, list[str]]:
    """A started batch of `lines` completions lines (the first `cap` released); returns its id and its
    jobs' ids in line order."""
    import json

    from sqlalchemy import select

    from app.openai import batches

    content = "".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                                  "body": {"model": "tiny", "prompt": "x", "max_tokens": 2}}) + "\n"
                      for i in range(lines)).encode()
    with sessions.begin() as session:
        file = batches.create_file(session, owner=None, purpose="batch", filename="in.jsonl", content=content)
        batch_id = batches.create_batch(session, owner=None, input_file_id=file.id, endpoint="/v1/completions",
                                        completion_window="24h", metadata=None).id
    with sessions.begin() as session:
        batches.start_batch(session, batch_id, "tiny", cap)
        created = utcnow() - timedelta(seconds=age)
        session.execute(update(Job).where(Job.batch_id == batch_id).values(created_at=created))
        session.execute(update(Job).where(Job.batch_id == batch_id, Job.released_at.is_not(None))
                        .values(released_at=created))
    with sessions() as session:
        return batch_id, list(session.scalars(select(Job.id).where(Job.batch_id == batch_id).order_by(Job.id)))


def test_held_batch_lines_are_not_sent_and_a_released_line_waits_from_its_release(reco_settings, sessions):
    batch_id, jobs = make_batch(sessions, 5, cap=2, age=600)   # old, but only two lines released
    with sessions() as session:
        assert [job_id for job_id, _ in stale_jobs(session, requeue_after_seconds=30)] == jobs[:2]
    with sessions.begin() as session:   # a line released just now has not waited yet
        session.execute(update(Job).where(Job.id == jobs[1]).values(released_at=utcnow()))
    with sessions() as session:
        assert stale_jobs(session, requeue_after_seconds=30) == [(jobs[0], 9)]


def test_a_sweep_heals_a_lost_release_without_exceeding_the_cap(reco_settings, sessions):
    settings = reco_settings.with_(batch_max_in_flight=2)
    redis = redis_client(settings.redis_url)
    channels = Channels(settings.key_prefix)
    batch_id, jobs = make_batch(sessions, 5, cap=2)
    with sessions.begin() as session:   # a line ended, and its worker died before releasing the next
        session.execute(update(Job).where(Job.id == jobs[0]).values(status="succeeded"))
    sent: list[tuple[str, int]] = []
    reconciler = Reconciler(settings, sessions, redis, channels, lambda job_id, priority: sent.append((job_id, priority)))
    assert reconciler.sweep(force=True) == 1 and sent == [(jobs[2], 9)]
    assert reconciler.sweep(force=True) == 0 and len(sent) == 1   # two in flight again: nothing to do
    with sessions.begin() as session:
        session.execute(update(Job).where(Job.id.in_(jobs[1:3])).values(status="failed"))
    reconciler.sweep(force=True)
    assert sent[1:] == [(jobs[3], 9), (jobs[4], 9)]


def test_a_released_line_whose_task_could_not_be_sent_is_sent_by_the_reconciler(reco_settings, sessions):
    from app.openai import batches

    batch_id, jobs = make_batch(sessions, 3, cap=1)
    with sessions.begin() as session:
        session.execute(update(Job).where(Job.id == jobs[0]).values(status="succeeded"))

    def broker_down(job_id, priority):
        raise ConnectionError("the broker is unreachable")

    assert batches.release_and_send(sessions, batch_id, 1, broker_down) == [jobs[1]]   # released all the same
    with sessions() as session:
        assert stale_jobs(session, requeue_after_seconds=30) == []   # its wait starts at its release
        later = utcnow() + timedelta(seconds=31)
        assert stale_jobs(session, requeue_after_seconds=30, now=later) == [(jobs[1], 9)]


def _queued_tasks(redis, settings) -> list[tuple[str, list]]:
    import json

    key = f"{Channels(settings.key_prefix).kombu_prefix}{settings.queue}"   # priority 0's list
    messages = [json.loads(raw) for raw in redis.lrange(key, 0, -1)]
    redis.delete(key)
    return [(m["headers"]["task"], m["headers"]["argsrepr"]) for m in messages]


def test_the_batch_sweep_expires_due_batches_and_restarts_stuck_ones(reco_settings, sessions):
    import json

    from app.openai import batches

    redis = redis_client(reco_settings.redis_url)
    channels = Channels(reco_settings.key_prefix)
    celery = make_celery(reco_settings, reco_settings.redis_url)
    _queued_tasks(redis, reco_settings)
    batch_id, jobs = make_batch(sessions, 4, cap=2)
    with sessions.begin() as session:
        session.execute(update(Job).where(Job.id == jobs[0]).values(status="running", worker_id="w-1"))
        session.execute(update(Batch).where(Batch.id == batch_id).values(expires_at=utcnow() - timedelta(seconds=1)))
        file_id = session.get(Batch, batch_id).input_file_id
        stuck = batches.create_batch(session, owner=None, input_file_id=file_id, endpoint="/v1/completions",
                                     completion_window="24h", metadata=None).id
        session.flush()
        session.execute(update(Batch).where(Batch.id == stuck).values(created_at=utcnow() - timedelta(seconds=60)))
    control = redis.pubsub(ignore_subscribe_messages=True)
    control.subscribe(channels.control)
    try:
        expired, restarted = sweep_batches(reco_settings, sessions, redis, channels, celery)
        assert expired >= 1 and restarted >= 1
        message, deadline = None, time.monotonic() + 5
        while message is None and time.monotonic() < deadline:   # (the subscribe confirmation reads as None)
            message = control.get_message(timeout=1)
    finally:
        control.close()
    assert json.loads(message["data"]) == {"type": "cancel", "job_id": jobs[0]}   # the running line is told
    with sessions() as session:
        assert session.get(Batch, batch_id).status == "cancelling"   # its running line ends it
        assert [session.get(Job, j).status for j in jobs] == ["running", "canceled", "canceled", "canceled"]
    assert ("genq.start_batch", repr([stuck])) in _queued_tasks(redis, reco_settings)
    with sessions.begin() as session:
        session.execute(update(Job).where(Job.id == jobs[0]).values(status="canceled"))
    assert batches.maybe_finalize(sessions, batch_id) == "expired"
    assert sweep_batches(reco_settings, sessions, redis, channels, celery)[0] == 0   # final: nothing more to do
