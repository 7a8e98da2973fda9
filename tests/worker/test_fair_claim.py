"""The worker's side of the fair queue (real runtime, database and Redis): a task is a wake-up that
runs the job the fair order puts first, whichever job it names; a spare task finds nothing; a fair
claim whose commit went through but whose answer was lost is found by its retry, not made twice."""
from __future__ import annotations

import pytest

from app.api.job_request import JobCreate
from app.jobs import fair_queue, store
from app.jobs.fair_queue import keys_at_share
from app.jobs.models import FairShare, Job
from tests.support.outages import commits_then_drops
from tests.support.service import service_settings
from worker.job_runner import claim_newcomer


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


def test_the_reserve_leaves_out_only_keys_at_their_share_of_the_task_threads():
    # 16 task threads: a flood of 16 and one newcomer job -> share 16 / 3 = 5.33 each; the flood is over it.
    assert keys_at_share(["a"] * 16 + ["b"], 16) == {"a"}
    assert keys_at_share(["a"] * 16 + ["b"] * 5, 16) == {"a"}         # b has 5 < 5.33: its next job may start
    assert keys_at_share(["a"] * 10 + ["b"] * 6, 16) == {"a", "b"}    # both at their share: nobody new of theirs
    assert keys_at_share(["a"] * 8 + ["b"] * 3 + ["c"] * 3, 16) == {"a"}   # share 16 / 4 = 4
    assert keys_at_share(["a"] * 16, 16, {"a": 10.0}) == {"a"}       # alone, whatever its weight: 16 x 10 / 11
    assert keys_at_share([f"k{i}" for i in range(16)], 16) == {f"k{i}" for i in range(16)}   # a job each
    assert keys_at_share([], 16) == frozenset()
    # weights: a (2) beside b (1) and a newcomer: shares 16 x 2 / 4 = 8 and 16 / 4 = 4
    assert keys_at_share(["a"] * 12 + ["b"] * 3, 16, {"a": 2.0, "b": 1.0}) == {"a"}
    assert keys_at_share(["a"] * 12 + ["b"] * 4, 16, {"a": 2.0, "b": 1.0}) == {"a", "b"}
    assert keys_at_share(["a"] * 7 + ["b"] * 4, 16, {"a": 2.0, "b": 1.0}) == {"b"}


def test_a_key_running_beside_a_flood_gets_its_next_job_from_the_reserve(runtime):
    """The runtime's own view: its tracked jobs (and their keys' weights) decide which keys the
    reserve's claim leaves out. The flooding key's queued job is older, and both keys are new to the
    fair queue (level counters): without the exclusion the claim would take the flood's job."""
    threads = runtime.settings.worker_concurrency
    flood = [f"flood-{i}" for i in range(threads - 2)]
    for job_id in flood:
        runtime.track(job_id, "reserve-a")
    runtime.track("light-1", "reserve-b")
    tracked = flood + ["light-1"]
    try:
        assert sorted(set(runtime.running_tenants())) == [("reserve-a", 1.0), ("reserve-b", 1.0)]
        create(runtime, "reserve-a")
        b2, b3 = create(runtime, "reserve-b"), create(runtime, "reserve-b")
        assert claim_newcomer(runtime, runtime.keys_at_share()).id == b2
        # B at its share too (threads / 3 each): the reserve takes nothing, though both keys have jobs queued
        for i in range(2, -(-threads // 3) + 1):
            runtime.track(f"light-{i}", "reserve-b")
            tracked.append(f"light-{i}")
        assert claim_newcomer(runtime, runtime.keys_at_share()) is None
        assert load(runtime, b3).status == "queued"
    finally:
        for job_id in tracked:
            runtime.untrack(job_id)
