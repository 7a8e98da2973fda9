"""A worker through database outages (real runtime, database and Redis; the outage simulated at the
job store): a write whose commit went through but whose answer was lost is recognised by its retry,
not done twice nor mistaken for a lost race; a result that cannot be stored is left to the job's
lease rather than turned into a failure; the reconciler thread outlives any error."""
from __future__ import annotations

import threading
import time

import pytest
from redis import exceptions as redis_errors

from app.jobs import store
from app.jobs import transitions as job_transitions
from app.api.job_request import JobCreate
from tests.support.outages import always_drops, commits_then_drops, dropped_connection
from worker import job_runner
from worker.reconciler import Reconciler


@pytest.fixture
def transitions():
    seen = []

    def hook(event, job_id, details):
        if event != "output":
            seen.append((event, job_id))

    job_transitions.register(hook)
    yield seen
    job_transitions.unregister(hook)


def create(runtime, **body) -> str:
    spec = JobCreate.model_validate({"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, **body})
    with runtime.sessions.begin() as session:
        return store.create_job(session, model="tiny", input=spec.generation_input().stored()).id


def load(runtime, job_id):
    with runtime.sessions() as session:
        return store.get_job(session, job_id, None)


def test_a_result_whose_answer_was_lost_is_recognised_and_announced_once(runtime, transitions, monkeypatch):
    failed = commits_then_drops(monkeypatch, store, "finish_job")
    job_id = create(runtime)
    assert runtime.run_job(job_id) == "succeeded"
    assert failed == [True]                      # the first write went through, its answer did not
    job = load(runtime, job_id)
    assert job.status == "succeeded" and job.attempts == 1 and job.error_type is None
    assert [e for e in transitions if e[1] == job_id] == [("started", job_id), ("completed", job_id)]
    done = [e for e in runtime.events.read(job_id) if e.type == "done"]
    assert len(done) == 1 and done[0].data["output"]["text"] == job.output_text


def test_a_claim_whose_answer_was_lost_is_recognised(runtime, monkeypatch):
    failed = commits_then_drops(monkeypatch, store, "claim_job")
    job_id = create(runtime)
    assert runtime.run_job(job_id) == "succeeded"
    assert len(failed) == 1
    job = load(runtime, job_id)
    assert job.status == "succeeded" and job.attempts == 1   # not left to its lease and run again


def test_a_result_that_cannot_be_stored_is_left_to_the_lease_not_failed(runtime, transitions, monkeypatch):
    monkeypatch.setattr(job_runner, "WRITE_RETRY_SECONDS", 0.5)
    job_id = create(runtime)
    calls = always_drops(monkeypatch, store, "finish_job")
    assert runtime.run_job(job_id) == "not_stored"
    assert len(calls) > 1                        # retried
    job = load(runtime, job_id)
    # Still running on this attempt's lease (no longer renewed): the reconciler runs it again.
    assert job.status == "running" and job.error_type is None and job.attempts == 1
    assert job_id not in runtime.active_jobs()
    assert ("released", job_id) in transitions and ("completed", job_id) not in transitions


def test_a_claim_through_a_long_outage_is_deferred_to_the_reconciler(runtime, monkeypatch):
    monkeypatch.setattr(job_runner, "CLAIM_RETRY_SECONDS", 0.3)
    job_id = create(runtime)
    always_drops(monkeypatch, store, "claim_job")
    assert runtime.run_job(job_id) == "deferred"
    assert load(runtime, job_id).status == "queued"


def test_a_short_outage_of_the_final_write_is_retried(runtime, monkeypatch):
    real = store.finish_job
    calls = []

    def down_twice(*args, **kwargs):
        calls.append(1)
        if len(calls) <= 2:
            raise dropped_connection()
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "finish_job", down_twice)
    job_id = create(runtime)
    assert runtime.run_job(job_id) == "succeeded"
    assert len(calls) == 3 and load(runtime, job_id).status == "succeeded"


def test_the_reconciler_thread_outlives_outages_and_bugs(settings, monkeypatch):
    reconciler = Reconciler(settings.with_(reconcile_interval_seconds=0.02), sessions=None, redis=None,
                            channels=type("C", (), {"prefix": "x"})(), send=lambda *_: None)
    errors = [dropped_connection(), redis_errors.ConnectionError("refused"), ValueError("a bug")]
    sweeps = []

    def sweep():
        sweeps.append(threading.current_thread().name)
        if len(sweeps) <= len(errors):
            raise errors[len(sweeps) - 1]
        return 0

    monkeypatch.setattr(reconciler, "sweep", sweep)
    reconciler.start()
    try:
        deadline = time.monotonic() + 10
        while len(sweeps) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(sweeps) >= 6 and reconciler._thread.is_alive()
    finally:
        reconciler.stop()
