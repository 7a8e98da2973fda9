"""The worker's side of the fair queue (real runtime, database and Redis): a task is a wake-up that
runs the job the fair order puts first, whichever job it names; a spare task finds nothing; a fair
claim whose commit went through but whose answer was lost is found by its retry, not made twice."""
from __future__ import annotations

import pytest

from app.api.job_request import JobCreate
from app.jobs import fair_queue, store
from app.jobs.models import FairShare, Job
from tests.support.outages import commits_then_drops
from tests.support.service import service_settings


@pytest.fixture(scope="module")
def settings(tmp_path_factory, tiny_model_dir):
    with service_settings(tmp_path_factory.mktemp("fair-worker"), model=str(tiny_model_dir), max_num_seqs=8,
                          lease_seconds=30, scheduling="fair") as settings:
        yield settings


def create(runtime, owner: str) -> str:
    spec = JobCreate.model_validate({"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0})
    with runtime.sessions.begin() as session:
        return store.create_job(session, model="tiny", owner=owner, input=spec.generation_input().stored()).id


def load(runtime, job_id) -> Job:
    with runtime.sessions() as session:
        return session.get(Job, job_id)


def test_a_task_runs_the_job_the_fair_order_puts_first(runtime):
    a1, a2, a3 = (create(runtime, "key-a") for _ in range(3))
    assert runtime.run_job(a1) == "succeeded" and load(runtime, a1).status == "succeeded"
    b1 = create(runtime, "key-b")
    assert runtime.run_job(a2) == "succeeded"         # a2's task wakes up and runs B's job (B at 0 < A)
    assert (load(runtime, b1).status, load(runtime, a2).status) == ("succeeded", "queued")
    assert runtime.run_job(b1) == "succeeded"         # b1's task: A's next, in arrival order
    assert load(runtime, a2).status == "succeeded"
    assert runtime.run_job(a3) == "succeeded"
    assert runtime.run_job(a1) == "skipped"           # a spare wake-up: nothing queued
    with runtime.sessions() as session:
        shares = {row.tenant: row.served_tokens for row in session.query(FairShare)}
        jobs = [load(runtime, i) for i in (a1, a2, a3, b1)]
    assert shares["key-a"] == sum(j.prompt_tokens + j.completion_tokens for j in jobs[:3])
    assert shares["key-b"] == jobs[3].prompt_tokens + jobs[3].completion_tokens


def test_a_fair_claim_whose_answer_was_lost_is_recognised(runtime, monkeypatch):
    failed = commits_then_drops(monkeypatch, fair_queue, "claim_next")
    first, second = create(runtime, "key-c"), create(runtime, "key-c")
    assert runtime.run_job(first) == "succeeded"
    assert len(failed) == 1 and failed[0].id == first
    assert (load(runtime, first).status, load(runtime, first).attempts) == ("succeeded", 1)
    assert load(runtime, second).status == "queued"   # the retry did not claim a second job
    assert runtime.run_job(second) == "succeeded"
