"""The data layer on SQLite and PostgreSQL: migration, job transitions, pagination, ownership."""
from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

import app.openai.models  # noqa: F401  (every domain's tables on Base.metadata, as migrations/env.py has them)
import app.tenancy.keys  # noqa: F401
import app.webhooks.models  # noqa: F401
from app.infra.db import Base, get_engine, session_factory, utcnow
from app.infra.ids import new_id
from app.infra.migrate import current_revision, downgrade, head_revision, upgrade
from app.jobs import store as jobs
from app.api.job_request import JobCreate
from app.jobs.models import Job, JobStatus
from app.jobs.store import CancelOutcome, JobResult

INPUT = {"prompt": "hello", "max_tokens": 8}


def make_job(sessions, **kwargs) -> str:
    with sessions.begin() as s:
        return jobs.create_job(s, model="tiny", input=INPUT, **kwargs).id


def test_migration_matches_models(db_url):
    assert current_revision(db_url) == head_revision()
    with get_engine(db_url).connect() as connection:
        diffs = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}),
                                 Base.metadata)
    assert diffs == []


def test_migration_downgrades_and_upgrades(tmp_path):
    url = f"sqlite:///{tmp_path / 'roundtrip.db'}"
    upgrade(url)
    assert "jobs" in inspect(get_engine(url)).get_table_names()
    downgrade(url)
    assert "jobs" not in inspect(get_engine(url)).get_table_names()
    upgrade(url)
    assert current_revision(url) == head_revision()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_key_weight_migration_gives_existing_keys_weight_1_and_downgrades(kind, tmp_path):
    """0006 adds api_keys.weight (server default 1.0, so keys created before it get 1.0) and drops it again."""
    from contextlib import nullcontext

    from sqlalchemy import text

    from tests.support.service import fresh_postgres_schema, postgres_base_url

    where = (nullcontext(f"sqlite:///{tmp_path / 'weights.db'}") if kind == "sqlite"
             else fresh_postgres_schema(postgres_base_url()))
    with where as url:
        upgrade(url, "batch_release")
        with get_engine(url).begin() as connection:
            connection.execute(text(
                "INSERT INTO api_keys (id, name, key_hash, display_prefix, webhook_secret, created_at) "
                "VALUES ('key_old', 'old', :hash, 'gq_old', 'whsec_x', :now)"), {"hash": "0" * 64, "now": utcnow()})
        upgrade(url)
        assert current_revision(url) == head_revision()
        with session_factory(url)() as session:
            assert app.tenancy.keys.key_weight(session, "key_old") == 1.0
        with session_factory(url).begin() as session:
            key, _ = app.tenancy.keys.create_key(session, "heavy", weight=2.5)
            heavy = key.id
        with session_factory(url)() as session:
            assert app.tenancy.keys.key_weight(session, heavy) == 2.5
        downgrade(url, "batch_release")
        columns = {c["name"] for c in inspect(get_engine(url)).get_columns("api_keys")}
        assert "weight" not in columns and "max_tokens" in columns
        with get_engine(url).connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM api_keys")).scalar() == 2
        upgrade(url)
        with session_factory(url)() as session:
            assert app.tenancy.keys.key_weight(session, heavy) == 1.0     # the downgrade dropped it


def test_ids_are_url_safe_and_time_ordered():
    ids = [new_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(len(i) == 26 and i.isalnum() and i == i.lower() for i in ids)
    assert ids == sorted(ids)


def test_create_and_get_round_trips_every_field(sessions):
    job_id = make_job(sessions, owner=None, priority=3, metadata={"k": [1, "x"]})
    with sessions() as s:
        job = jobs.get_job(s, job_id, owner=None)
        assert job.status == "queued" and job.priority == 3 and job.attempts == 0
        assert job.input == INPUT and job.meta == {"k": [1, "x"]}
        assert job.created_at.tzinfo is not None
        assert abs((utcnow() - job.created_at).total_seconds()) < 60


def test_lookup_is_scoped_to_the_owner(sessions):
    mine = make_job(sessions, owner="key-a")
    anonymous = make_job(sessions)
    with sessions() as s:
        assert jobs.get_job(s, mine, owner="key-a").id == mine
        assert jobs.get_job(s, mine, owner="key-b") is None
        assert jobs.get_job(s, mine, owner=None) is None
        assert jobs.get_job(s, anonymous, owner="key-a") is None
        assert [j.id for j in jobs.list_jobs(s, "key-b")] == []
    with sessions.begin() as s:
        assert jobs.cancel_job(s, mine, owner="key-b") is CancelOutcome.NOT_FOUND


def test_list_is_newest_first_with_cursor_and_status_filter(sessions):
    ids = [make_job(sessions) for _ in range(7)]
    with sessions.begin() as s:
        jobs.cancel_job(s, ids[2], owner=None)
    with sessions() as s:
        seen, before = [], None
        while True:
            page = jobs.list_jobs(s, None, limit=3, before=before)
            if not page:
                break
            seen += [j.id for j in page]
            before = page[-1].id
        assert seen == list(reversed(ids))
        assert [j.id for j in jobs.list_jobs(s, None, status=JobStatus.CANCELED)] == [ids[2]]
        assert len(jobs.list_jobs(s, None, status=JobStatus.QUEUED)) == 6


def test_claim_is_exclusive_and_counts_attempts(sessions):
    job_id = make_job(sessions)
    with sessions.begin() as s:
        job = jobs.claim_job(s, job_id, "w1", lease_seconds=30)
        assert job.status == "running" and job.worker_id == "w1" and job.attempts == 1
        assert job.started_at is not None and job.lease_expires_at > job.started_at
    with sessions.begin() as s:
        assert jobs.claim_job(s, job_id, "w2", lease_seconds=30) is None  # leased by a live worker


def test_concurrent_claims_have_one_winner(sessions):
    job_id = make_job(sessions)
    winners, barrier = [], threading.Barrier(8)

    def claim(worker):
        barrier.wait()
        with sessions.begin() as s:
            if jobs.claim_job(s, job_id, worker, lease_seconds=30) is not None:
                winners.append(worker)

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1
    with sessions() as s:
        assert jobs.get_job(s, job_id, None).attempts == 1


def test_expired_lease_is_reclaimed_and_stale_worker_cannot_finish(sessions):
    job_id = make_job(sessions)
    past = utcnow() - timedelta(minutes=5)
    with sessions.begin() as s:
        jobs.claim_job(s, job_id, "dead", lease_seconds=1, now=past)
    with sessions.begin() as s:
        job = jobs.claim_job(s, job_id, "alive", lease_seconds=30)
        assert job.worker_id == "alive" and job.attempts == 2
    done = JobResult(JobStatus.SUCCEEDED, output_text="x", finish_reason="length", completion_tokens=1)
    with sessions.begin() as s:
        assert not jobs.finish_job(s, job_id, "dead", 1, done)
        assert not jobs.finish_job(s, job_id, "alive", 1, done)   # an older attempt of the same worker
        assert jobs.finish_job(s, job_id, "alive", 2, done)
    with sessions.begin() as s:
        assert not jobs.finish_job(s, job_id, "alive", 2, done)   # exactly one final result


def test_heartbeat_renews_only_own_running_jobs(sessions):
    a, b, c = make_job(sessions), make_job(sessions), make_job(sessions)
    with sessions.begin() as s:
        jobs.claim_job(s, a, "w1", lease_seconds=5)
        jobs.claim_job(s, b, "w2", lease_seconds=5)
    with sessions.begin() as s:
        assert jobs.renew_leases(s, "w1", [a, b, c], lease_seconds=600) == 1
    with sessions() as s:
        assert jobs.get_job(s, a, None).lease_expires_at > utcnow() + timedelta(seconds=300)
        assert jobs.get_job(s, b, None).lease_expires_at < utcnow() + timedelta(seconds=300)


def test_finish_writes_output_metrics_and_error(sessions):
    ok, bad = make_job(sessions), make_job(sessions)
    first = utcnow()
    with sessions.begin() as s:
        jobs.claim_job(s, ok, "w", 30)
        jobs.claim_job(s, bad, "w", 30)
        assert jobs.finish_job(s, ok, "w", 1, JobResult(
            JobStatus.SUCCEEDED, output_text="héllo 🙂", finish_reason="stop", prompt_tokens=3,
            completion_tokens=4, cached_tokens=0, first_token_at=first))
        assert jobs.finish_job(s, bad, "w", 1, JobResult(
            JobStatus.FAILED, error_type="invalid_request", error_message="prompt too long"))
    with sessions() as s:
        job = jobs.get_job(s, ok, None)
        assert (job.status, job.output_text, job.finish_reason) == ("succeeded", "héllo 🙂", "stop")
        assert (job.prompt_tokens, job.completion_tokens) == (3, 4)
        assert job.first_token_at == first and job.completed_at >= job.started_at
        assert job.lease_expires_at is None
        failed = jobs.get_job(s, bad, None)
        assert (failed.status, failed.error_type, failed.error_message) == ("failed", "invalid_request",
                                                                           "prompt too long")
    with pytest.raises(ValueError):
        JobResult(JobStatus.RUNNING)
    with pytest.raises(ValueError):
        JobResult(JobStatus.FAILED)


def test_cancel_queued_running_and_final(sessions):
    queued, running = make_job(sessions), make_job(sessions)
    with sessions.begin() as s:
        jobs.claim_job(s, running, "w", 30)
    with sessions.begin() as s:
        assert jobs.cancel_job(s, queued, None) is CancelOutcome.CANCELED
        assert jobs.cancel_job(s, running, None) is CancelOutcome.REQUESTED
        assert jobs.cancel_job(s, queued, None) is CancelOutcome.ALREADY_FINAL
        assert jobs.cancel_job(s, "nope", None) is CancelOutcome.NOT_FOUND
        assert jobs.claim_job(s, queued, "w", 30) is None            # a canceled job never runs
        assert jobs.cancel_requested(s, running)
    with sessions() as s:
        job = jobs.get_job(s, queued, None)
        assert job.status == "canceled" and job.completed_at is not None
    with sessions.begin() as s:
        assert jobs.finish_job(s, running, "w", 1, JobResult(JobStatus.CANCELED, output_text="par",
                                                                finish_reason="abort"))
    with sessions.begin() as s:
        assert jobs.cancel_job(s, running, None) is CancelOutcome.ALREADY_FINAL
        assert jobs.count_by_status(s) == {"canceled": 2}


def test_output_text_with_nul_characters_round_trips(sessions):
    # Models can emit NUL; PostgreSQL text cannot hold it, so it is escaped there, reversibly.
    texts = ["a\x00b", "\uffff", "\uffff0", "\x00\uffff\x00", "plain \\ text 🙂"]
    ids = [make_job(sessions) for _ in texts]
    with sessions.begin() as s:
        for job_id, text in zip(ids, texts):
            jobs.claim_job(s, job_id, "w", 30)
            assert jobs.finish_job(s, job_id, "w", 1, JobResult(JobStatus.FAILED, output_text=text,
                                                                error_type="x", error_message=text))
    with sessions() as s:
        for job_id, text in zip(ids, texts):
            job = jobs.get_job(s, job_id, None)
            assert (job.output_text, job.error_message) == (text, text)


def test_status_check_constraint(sessions):
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError):
        with sessions.begin() as s:
            s.add(Job(id=new_id(), status="bogus", priority=0, model="m", input={}, attempts=0,
                      created_at=utcnow()))


def test_stored_input_equals_the_revalidated_generation_input():

    for body in ({"prompt": "x", "stop": "a", "metadata": {"k": 1}, "priority": 3, "model": "m", "top_k": 5},
                 {"messages": [{"role": "user", "content": "hi"}], "seed": 4, "temperature": 0}):
        spec = JobCreate.model_validate(body)
        assert spec.stored_input() == spec.generation_input().stored()


def test_many_threads_write_sqlite_at_once(tmp_path):

    url = f"sqlite:///{tmp_path / 'writers.db'}"
    upgrade(url)
    sessions = session_factory(url)
    errors = []

    def write(n):
        try:
            for _ in range(n):
                with sessions.begin() as s:
                    job = jobs.create_job(s, model="m", input=INPUT)
                with sessions.begin() as s:
                    jobs.claim_job(s, job.id, "w", 30)
        except Exception as exc:   # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(25,)) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with sessions() as s:
        assert jobs.count_by_status(s) == {"running": 300}


def _other_process_writes(url: str, n: int, results) -> None:   # (a child process's body)
    try:
        sessions = session_factory(url)
        for _ in range(n):
            with sessions.begin() as s:
                job = jobs.create_job(s, model="m", input=INPUT)
            with sessions.begin() as s:
                jobs.claim_job(s, job.id, "w", 30)
        results.put("ok")
    except Exception as exc:   # pragma: no cover - reported by the parent
        results.put(repr(exc))


def test_a_sqlite_write_transaction_holds_the_writers_file_lock_to_its_end(tmp_path):
    """Processes queue for SQLite's write lock on an advisory lock of `<database>-writers` (not
    SQLite's sleeping busy handler): taken at a transaction's first write, released at its end."""
    import fcntl
    import os

    url = f"sqlite:///{tmp_path / 'queue.db'}"
    upgrade(url)
    sessions = session_factory(url)
    probe = os.open(tmp_path / "queue.db-writers", os.O_RDWR | os.O_CREAT)   # another holder's view

    def free() -> bool:
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(probe, fcntl.LOCK_UN)
        return True

    try:
        with sessions.begin() as s:
            jobs.count_by_status(s)
            assert free()                       # reads take no place in the queue
            jobs.create_job(s, model="m", input=INPUT)
            assert not free()                   # the first write does, until the commit
        assert free()
        s = sessions()
        s.begin()
        jobs.create_job(s, model="m", input=INPUT)
        assert not free()
        s.rollback()
        assert free()
        s.close()
    finally:
        os.close(probe)


def test_a_forked_process_queues_behind_its_parents_writer(tmp_path):
    """A fork copies the parent's thread lock as it was (held, here) and its descriptor, which shares
    the parent's file lock: the child starts with a lock and a descriptor of its own, so it waits on
    the file lock while the parent writes (and fails after its timeout) instead of sharing it."""
    import multiprocessing

    from app.infra import db

    url = f"sqlite:///{tmp_path / 'fork.db'}"
    upgrade(url)
    sessions = session_factory(url)
    queue = db._write_locks[str((tmp_path / "fork.db").resolve())]
    context = multiprocessing.get_context("fork")
    results = context.Queue()

    def child() -> None:
        fresh = not queue.lock.locked() and queue._fd is None   # its own lock, and no inherited descriptor
        took = queue.acquire(timeout=0.3)
        results.put((fresh, took))
        if took:
            queue.release()

    with sessions.begin() as s:
        jobs.create_job(s, model="m", input=INPUT)      # the parent holds the writers' lock
        process = context.Process(target=child)
        process.start()
        assert results.get(timeout=30) == (True, False)   # it waited on the parent's file lock, in vain
        process.join(30)
    process = context.Process(target=child)             # and once it is done, a child takes it
    process.start()
    assert results.get(timeout=30) == (True, True)
    process.join(30)


def test_processes_and_threads_write_sqlite_at_once(tmp_path):
    import multiprocessing

    url = f"sqlite:///{tmp_path / 'processes.db'}"
    upgrade(url)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_other_process_writes, args=(url, 30, results)) for _ in range(2)]
    for process in processes:
        process.start()
    sessions = session_factory(url)
    threads = [threading.Thread(target=_other_process_writes, args=(url, 30, results)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outcomes = [results.get(timeout=120) for _ in range(5)]
    for process in processes:
        process.join(60)
    assert outcomes == ["ok"] * 5
    with sessions() as s:
        assert jobs.count_by_status(s) == {"running": 150}
