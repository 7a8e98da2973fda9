"""The reconciler's choice of stuck jobs, its per-job rate limit and lock, and giving up after
max_attempts (real database and Redis, no Celery)."""
from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from app import jobs as store
from app.channels import Channels
from app.db import session_factory, utcnow
from app.models import Job, JobStatus
from app.redis_client import redis_client
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
