"""A job from claim to final write, on a real worker runtime (engine, Redis, database), without
Celery around it: results, events, cancels, bad inputs, and idempotent redelivery."""
from __future__ import annotations

import pytest

from app.infra.worker_reports import live_workers
from app.jobs import store
from app.jobs import transitions as job_transitions
from app.api.job_request import JobCreate
from app.jobs.models import Job
from app.webhooks.dispatcher import WebhookDispatcher


@pytest.fixture
def transitions():
    seen = []

    def hook(event, job_id, details):
        if event != "output":
            seen.append((event, job_id, details.get("status")))

    job_transitions.register(hook)
    yield seen
    job_transitions.unregister(hook)


def create(runtime, **body) -> str:
    spec = JobCreate.model_validate({"max_tokens": 6, "temperature": 0, **body})
    with runtime.sessions.begin() as session:
        return store.create_job(session, model="tiny", input=spec.generation_input().stored()).id


def load(runtime, job_id):
    with runtime.sessions() as session:
        return store.get_job(session, job_id, None)


def test_job_runs_once_and_redelivery_does_nothing(runtime, transitions):
    job_id = create(runtime, prompt="Once upon a time")
    assert runtime.run_job(job_id) == "succeeded"
    job = load(runtime, job_id)
    assert job.status == "succeeded" and job.finish_reason in ("stop", "length")
    assert job.completion_tokens >= 1 and job.prompt_tokens >= 1 and job.attempts == 1
    assert job.started_at <= job.first_token_at <= job.completed_at
    events = runtime.events.read(job_id)
    assert [e.type for e in events][:2] == ["status", "token"]
    assert [e.type for e in events][-2:] == ["status", "done"]
    assert "".join(e.data["text"] for e in events if e.type == "token") == job.output_text
    assert events[-1].data["output"] == {"text": job.output_text, "finish_reason": job.finish_reason}
    assert transitions == [("started", job_id, None), ("completed", job_id, "succeeded")]

    assert runtime.run_job(job_id) == "skipped"     # a redelivered task
    again = load(runtime, job_id)
    assert (again.attempts, again.completed_at, again.output_text) == (1, job.completed_at, job.output_text)
    assert len(runtime.events.read(job_id)) == len(events)


def test_cancel_requested_before_the_worker_starts(runtime):
    job_id = create(runtime, prompt="x")
    with runtime.sessions.begin() as session:
        store.claim_job(session, job_id, "someone-dead", lease_seconds=-1)   # lease already expired
        assert store.cancel_job(session, job_id, None) is store.CancelOutcome.REQUESTED
    assert runtime.run_job(job_id) == "canceled"
    job = load(runtime, job_id)
    assert job.status == "canceled" and job.attempts == 2 and job.output_text == ""
    assert [str(e.id) for e in runtime.events.read(job_id)] == ["2-1", "2-2", "2-3"]


def test_cancel_on_the_control_channel_stops_a_running_job(runtime):
    import threading

    job_id = create(runtime, prompt="Go on and on", max_tokens=1000, ignore_eos=True)
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(runtime.run_job(job_id)))
    thread.start()
    pubsub = runtime.redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(runtime.channels.job_live(job_id))
    while not any(e.type == "token" for e in runtime.events.read(job_id)):
        pubsub.get_message(timeout=0.05)
    pubsub.close()
    with runtime.sessions.begin() as session:
        assert store.cancel_job(session, job_id, None) is store.CancelOutcome.REQUESTED
    runtime.redis.publish(runtime.channels.control, f'{{"type": "cancel", "job_id": "{job_id}"}}')
    thread.join(120)
    assert outcome == ["canceled"]
    job = load(runtime, job_id)
    assert job.status == "canceled" and job.finish_reason == "abort"
    assert 0 < job.completion_tokens < 1000 and job.output_text
    tokens = "".join(e.data["text"] for e in runtime.events.read(job_id) if e.type == "token")
    assert tokens == job.output_text


def test_a_job_that_cannot_fit_fails_with_a_clear_error(runtime):
    job_id = create(runtime, prompt="x", max_tokens=10**6)
    assert runtime.run_job(job_id) == "failed"
    job = load(runtime, job_id)
    assert job.error_type == "invalid_request" and "max_model_len" in job.error_message
    types = [e.type for e in runtime.events.read(job_id)]
    assert types == ["status", "status", "error", "done"]


def test_stored_input_the_worker_cannot_read_fails_the_job(runtime):
    with runtime.sessions.begin() as session:
        job_id = store.create_job(session, model="tiny", input={"prompt": "x", "max_tokens": "many"}).id
    assert runtime.run_job(job_id) == "failed"
    assert load(runtime, job_id).error_type == "invalid_input"


def test_missing_job_is_skipped(runtime):
    assert runtime.run_job("01nosuchjob00000000000000a") == "skipped"


def test_worker_reports_its_engine_stats(runtime):

    import time

    reports = []
    for _ in range(600):
        reports = [r for r in live_workers(runtime.redis, runtime.channels) if r["worker_id"] == runtime.worker_id]
        if reports:
            break
        time.sleep(0.05)
    assert reports[0]["engine"]["kv_blocks_total"] > 0 and reports[0]["model"]


def test_a_job_whose_lease_another_worker_took_is_released_not_completed(runtime, transitions):
    """While this worker generates, the job is claimed again elsewhere (its lease expired): the
    result is dropped, hooks hear `released` (so per-job state such as the webhook dispatcher's is
    let go), not `completed`."""
    from sqlalchemy import update

    dispatcher = WebhookDispatcher(runtime.settings, runtime.sessions, celery=None)
    job_transitions.register(dispatcher)
    job_id = create(runtime, prompt="Once upon a time", max_tokens=4)
    tracked = []

    def take_over(event, jid, details):
        if event == "started" and jid == job_id:
            tracked.append(jid in dispatcher._registrations)   # (a hook's own assert would be logged, not raised)
            with runtime.sessions.begin() as session:
                session.execute(update(Job).where(Job.id == job_id).values(worker_id="another-worker", attempts=2))

    job_transitions.register(take_over)
    try:
        assert runtime.run_job(job_id) == "superseded"
    finally:
        job_transitions.unregister(take_over)
        job_transitions.unregister(dispatcher)
    assert tracked == [True], "the dispatcher did not track the job it saw start"
    assert ("released", job_id, None) in transitions
    assert not any(event == "completed" and jid == job_id for event, jid, _ in transitions)
    assert job_id not in dispatcher._registrations and job_id not in dispatcher._outputs
    job = load(runtime, job_id)
    assert job.status == "running" and job.worker_id == "another-worker"   # untouched: the other attempt's


def test_the_engine_gets_the_owner_key_as_tenant_and_its_weight(runtime, engine, monkeypatch):
    """Fair sharing in the engine: a job's tenant is its API key, weighted by the key's `weight`."""
    from app.tenancy.keys import create_key

    with runtime.sessions.begin() as session:
        key, _ = create_key(session, name="heavy", weight=3.0)
        key_id = key.id
    spec = JobCreate.model_validate({"max_tokens": 3, "temperature": 0, "prompt": "Hello"})
    with runtime.sessions.begin() as session:
        owned = store.create_job(session, model="tiny", owner=key_id, input=spec.generation_input().stored()).id
    anonymous = create(runtime, prompt="Hello")
    seen = {}
    original = engine.add_request

    def add_request(request_id, prompt, params=None, priority=0, **fair):
        seen[request_id] = fair
        return original(request_id, prompt, params, priority, **fair)

    monkeypatch.setattr(engine, "add_request", add_request)
    assert runtime.run_job(owned) == "succeeded" and runtime.run_job(anonymous) == "succeeded"
    assert seen[owned] == {"tenant": key_id, "weight": 3.0}
    assert seen[anonymous] == {"tenant": None, "weight": 1.0}
