"""The newcomer reserve's wake-up (real runtime, database and Redis): a busy worker claims a job
of a key under its share when the API announces it on the control channel, not on a timer; an
announcement of a key at its share costs no claim. The reserve's unwoken look is set to an hour
here, so only an announcement can start the job."""
from __future__ import annotations

import json
import time

import pytest

from app.api.job_request import JobCreate
from app.infra.broker import announce_queued
from app.jobs import store
from app.jobs.models import Job
from tests.support.service import service_settings
from worker import job_runner, runtime as runtime_module


@pytest.fixture(scope="module")
def settings(tmp_path_factory, tiny_model_dir):
    with service_settings(tmp_path_factory.mktemp("wakeup"), model=str(tiny_model_dir), max_num_seqs=2,
                          worker_concurrency=2, lease_seconds=30, scheduling="fair", fair_reserve_seqs=2) as settings:
        yield settings


@pytest.fixture
def runtime(settings, engine, monkeypatch):
    monkeypatch.setattr(runtime_module, "NEWCOMER_LOOK_SECONDS", 3600.0)
    claims = []
    real = job_runner.claim_newcomer
    monkeypatch.setattr(runtime_module, "claim_newcomer", lambda rt, exclude: claims.append(exclude) or real(rt, exclude))
    rt = runtime_module.WorkerRuntime(settings, engine=engine).start()
    rt.claims = claims
    yield rt
    rt.stop()


def create(rt, owner: str) -> str:
    spec = JobCreate.model_validate({"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0})
    with rt.sessions.begin() as session:
        return store.create_job(session, model="tiny", owner=owner, input=spec.generation_input().stored()).id


def status(rt, job_id: str) -> tuple[str, str | None]:
    with rt.sessions() as session:
        job = session.get(Job, job_id)
        return job.status, job.worker_id


def until(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_an_announced_job_of_a_key_under_its_share_starts_in_the_reserve(runtime, settings):
    busy = [f"flood-{i}" for i in range(settings.worker_concurrency)]
    for job_id in busy:                       # every task thread busy with key A's jobs
        runtime.track(job_id, "wake-a")
    try:
        assert runtime.keys_at_share() == {"wake-a"}
        newcomer = create(runtime, "wake-b")
        # A's announcement: A holds its share here, so the reserve does not even look
        heard = runtime.announcements
        announce_queued(runtime.redis, runtime.channels, "wake-a")
        assert until(lambda: runtime.announcements == heard + 1)
        assert not until(lambda: runtime.claims, timeout=0.5)
        assert status(runtime, newcomer) == ("queued", None)
        # B's: claimed at once, by this worker, into the reserve (its task was never sent)
        announce_queued(runtime.redis, runtime.channels, "wake-b")
        assert until(lambda: status(runtime, newcomer)[0] == "succeeded"), status(runtime, newcomer)
        assert status(runtime, newcomer)[1] == runtime.worker_id
        # (after a claim the reserve looks once more at once, for a burst: here it finds nothing)
        assert set(runtime.claims) == {frozenset({"wake-a"})} and len(runtime.claims) <= 2
    finally:
        for job_id in busy:
            runtime.untrack(job_id)


def test_a_burst_of_a_newcomers_jobs_starts_in_the_reserve_on_one_announcement(runtime, settings):
    """The reserve looks again at once after a claim, while it has room: a key's two jobs announced
    together both start (the second did not wait for the unwoken look, an hour here)."""
    assert settings.newcomer_reserve >= 2
    busy = [f"flood-{i}" for i in range(settings.worker_concurrency)]
    for job_id in busy:
        runtime.track(job_id, "burst-a")
    try:
        first, second = create(runtime, "burst-b"), create(runtime, "burst-b")
        announce_queued(runtime.redis, runtime.channels, "burst-b")
        assert until(lambda: status(runtime, second)[0] == "succeeded"), status(runtime, second)
        assert status(runtime, first) == ("succeeded", runtime.worker_id)
    finally:
        for job_id in busy:
            runtime.untrack(job_id)


def test_announcements_are_ignored_by_a_worker_with_free_task_threads(runtime):
    job_id = create(runtime, "wake-c")
    heard = runtime.announcements
    runtime.redis.publish(runtime.channels.control, json.dumps({"type": "queued", "owner": "wake-c"}))
    assert until(lambda: runtime.announcements == heard + 1)
    assert not until(lambda: runtime.claims, timeout=0.5)   # its task thread will take it: no reserve claim
    assert status(runtime, job_id) == ("queued", None)
    assert runtime.run_job(job_id) == "succeeded"
