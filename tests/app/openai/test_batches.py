"""The batch store (app/openai/batches.py) on SQLite and PostgreSQL: line validation, starting, cancelling
and finalizing, each safe to repeat."""
from __future__ import annotations

import json
import threading

import pytest
from sqlalchemy import select, update

from app.infra.db import utcnow
from app.jobs import store as jobs_store
from app.jobs.models import Job
from app.jobs.store import active_jobs
from app.openai import batches
from app.openai.models import Batch, File

MODEL = "tiny"


def _line(i, **body):
    return {"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
            "body": {"model": MODEL, "prompt": f"p{i}", "max_tokens": 2, **body}}


def _content(lines) -> bytes:
    return "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()


def test_parse_lines_reports_each_bad_line_and_keeps_the_rest():
    lines = [_line(0), "not json", _line(1, temperature=-1), {**_line(2), "url": "/v1/chat/completions"},
             {**_line(3), "custom_id": "r0"}, _line(4, model="other"), {**_line(5), "method": "GET"},
             {"method": "POST", "url": "/v1/completions", "body": {}}, "", _line(6, stream=True), _line(7, n=2)]
    parsed = batches.parse_lines(_content(lines), "/v1/completions", MODEL)
    assert [custom_id for custom_id, _, _ in parsed.jobs] == ["r0", "r7"]
    assert parsed.jobs[1][1]["n"] == 2 and parsed.jobs[0][1]["max_tokens"] == 2
    assert parsed.total == 10   # the blank line is not a request
    codes = {e["line"]: e["code"] for e in parsed.errors}
    assert codes == {2: "invalid_json_line", 3: "invalid_value", 4: "mismatched_url", 5: "duplicate_custom_id",
                     6: "model_not_found", 7: "invalid_method", 8: "missing_required_parameter",
                     10: "invalid_request"}


def test_lines_wait_in_the_flex_lane_unless_they_ask_for_default():
    lines = [_line(0), _line(1, service_tier="default"), _line(2, service_tier="flex"), _line(3, service_tier="auto"),
             _line(4, service_tier="scale")]
    parsed = batches.parse_lines(_content(lines), "/v1/completions", MODEL)
    assert [(custom_id, lane) for custom_id, _, lane in parsed.jobs] == [("r0", 1), ("r1", 0), ("r2", 1), ("r3", 1)]
    assert [(e["line"], "service_tier" in e["message"]) for e in parsed.errors] == [(5, True)]


def _new_batch(sessions, lines) -> str:
    with sessions.begin() as session:
        file = batches.create_file(session, owner="k1", purpose="batch", filename="in.jsonl", content=_content(lines))
        batch = batches.create_batch(session, owner="k1", input_file_id=file.id, endpoint="/v1/completions",
                                     completion_window="24h", metadata=None)
        return batch.id


def _finish_all(sessions, batch_id, status="succeeded"):
    with sessions.begin() as session:
        session.execute(update(Job).where(Job.batch_id == batch_id, Job.status.in_(("queued", "running"))).values(
            status=status, output_text="ok", finish_reason="stop", prompt_tokens=2, completion_tokens=1))


def test_start_and_finalize_once(sessions):
    batch_id = _new_batch(sessions, [_line(0), _line(1), "{", _line(2)])
    with sessions.begin() as session:
        job_ids = batches.start_batch(session, batch_id, MODEL)
    assert len(job_ids) == 3
    with sessions.begin() as session:
        assert batches.start_batch(session, batch_id, MODEL) == job_ids   # again: the same queued jobs
        jobs = session.scalars(select(Job).where(Job.batch_id == batch_id).order_by(Job.id)).all()
        assert [(j.custom_id, j.priority, j.owner) for j in jobs] == [("r0", 9, "k1"), ("r1", 9, "k1"), ("r2", 9, "k1")]
    assert batches.maybe_finalize(sessions, batch_id) is None   # jobs still queued
    _finish_all(sessions, batch_id)
    assert batches.maybe_finalize(sessions, batch_id) == "completed"
    assert batches.maybe_finalize(sessions, batch_id) is None   # already done: nothing happens
    with sessions() as session:
        batch = session.get(Batch, batch_id)
        counts = batches.batch_to_dict(batch, batches.job_counts(session, batch_id))["request_counts"]
        assert counts == {"total": 4, "completed": 3, "failed": 1}
        output = session.get(File, batch.output_file_id).content.decode().splitlines()
        errors = session.get(File, batch.error_file_id).content.decode().splitlines()
        assert session.scalars(select(File.id).where(File.filename.like(f"{batch_id}%"))).all().__len__() == 2
    assert [json.loads(x)["custom_id"] for x in output] == ["r0", "r1", "r2"]
    assert json.loads(output[0])["response"]["body"]["choices"][0]["text"] == "ok"
    assert [json.loads(x)["error"]["code"] for x in errors] == ["invalid_json_line"]


def test_cancel_stops_queued_jobs_and_ends_cancelled(sessions):
    batch_id = _new_batch(sessions, [_line(i) for i in range(4)])
    with sessions.begin() as session:
        first, *_ = batches.start_batch(session, batch_id, MODEL)
        session.execute(update(Job).where(Job.id == first).values(status="running"))
    with sessions.begin() as session:
        batch, running = batches.cancel_batch(session, batch_id, "k1")
        assert running == [first] and batch.status == "cancelling"
    assert batches.maybe_finalize(sessions, batch_id) is None   # one job still running
    _finish_all(sessions, batch_id)
    assert batches.maybe_finalize(sessions, batch_id) == "cancelled"
    with sessions() as session:
        batch = session.get(Batch, batch_id)
        assert batch.cancelled_at is not None and batch.completed_at is None
        errors = [json.loads(x) for x in session.get(File, batch.error_file_id).content.decode().splitlines()]
    assert sorted(e["custom_id"] for e in errors) == ["r1", "r2", "r3"]
    with sessions.begin() as session:
        assert batches.cancel_batch(session, batch_id, "someone-else") == (None, [])


def test_an_empty_file_fails_the_batch(sessions):
    batch_id = _new_batch(sessions, ["", ""])
    with sessions.begin() as session:
        assert batches.start_batch(session, batch_id, MODEL) == []
    with sessions() as session:
        batch = session.get(Batch, batch_id)
        assert batch.status == "failed" and batch.errors["data"][0]["code"] == "invalid_file"


def test_a_batch_past_its_window_expires_with_what_finished(sessions):
    from datetime import timedelta

    batch_id = _new_batch(sessions, [_line(i) for i in range(3)])
    with sessions.begin() as session:
        first, *_ = batches.start_batch(session, batch_id, MODEL)
        session.execute(update(Job).where(Job.id == first).values(status="succeeded", output_text="ok",
                                                                  finish_reason="stop"))
        assert batches.expire_if_due(session, batch_id) == []   # not due yet
        session.execute(update(Batch).where(Batch.id == batch_id).values(expires_at=utcnow() - timedelta(seconds=1)))
    with sessions.begin() as session:
        assert batches.expire_if_due(session, batch_id) == []   # nothing running
    assert batches.maybe_finalize(sessions, batch_id) == "expired"
    with sessions() as session:
        batch = session.get(Batch, batch_id)
        assert batch.output_file_id and batch.expired_at is not None and batch.cancelled_at is None
        errors = [json.loads(x) for x in session.get(File, batch.error_file_id).content.decode().splitlines()]
    assert {e["error"]["code"] for e in errors} == {"batch_expired"} and len(errors) == 2


# -- the in-flight cap: lines are released a few at a time -----------------------------------------

def _lines(sessions, batch_id) -> list[Job]:
    with sessions() as session:
        return list(session.scalars(select(Job).where(Job.batch_id == batch_id).order_by(Job.id)))


def _in_flight(jobs) -> list[str]:
    return [j.custom_id for j in jobs if j.released_at is not None and j.status in ("queued", "running")]


def _end(sessions, job_ids, status="succeeded"):
    with sessions.begin() as session:
        session.execute(update(Job).where(Job.id.in_(job_ids)).values(status=status, output_text="ok",
                                                                      finish_reason="stop"))


def test_start_releases_only_the_first_lines_and_each_end_releases_the_next(sessions):
    batch_id = _new_batch(sessions, [_line(i) for i in range(7)])
    with sessions.begin() as session:
        released = batches.start_batch(session, batch_id, MODEL, max_in_flight=3)
    jobs = _lines(sessions, batch_id)
    assert released == [j.id for j in jobs[:3]] and _in_flight(jobs) == ["r0", "r1", "r2"]
    with sessions.begin() as session:
        assert batches.release_lines(session, batch_id, 3) == []          # nothing ended: nothing more
        assert batches.start_batch(session, batch_id, MODEL, 3) == released   # a redelivery re-sends these
    _end(sessions, [released[1]])                                         # one succeeds ...
    _end(sessions, [released[0]], status="failed")                        # ... one fails
    with sessions.begin() as session:
        assert batches.release_lines(session, batch_id, 3) == [jobs[3].id, jobs[4].id]
    assert _in_flight(_lines(sessions, batch_id)) == ["r2", "r3", "r4"]
    with sessions.begin() as session:   # a queued line canceled through the job API
        assert jobs_store.cancel_job(session, jobs[2].id, "k1") is jobs_store.CancelOutcome.CANCELED
    with sessions.begin() as session:
        assert batches.release_lines(session, batch_id, 3) == [jobs[5].id]
        session.execute(update(Job).where(Job.id == jobs[3].id).values(status="running"))
    _end(sessions, [jobs[4].id, jobs[5].id])
    with sessions.begin() as session:
        assert batches.release_lines(session, batch_id, 3) == [jobs[6].id]   # the last one
        assert batches.release_lines(session, batch_id, 3) == []
    assert _in_flight(_lines(sessions, batch_id)) == ["r3", "r6"]


def test_no_cap_releases_every_line_at_start(sessions):
    batch_id = _new_batch(sessions, [_line(i) for i in range(5)])
    with sessions.begin() as session:
        assert len(batches.start_batch(session, batch_id, MODEL, max_in_flight=0)) == 5
    assert len(_in_flight(_lines(sessions, batch_id))) == 5


def test_concurrent_releases_never_exceed_the_cap_nor_release_a_line_twice(sessions):
    """Each round ends every line in flight, then as many threads as lines ended each call the job
    hook's release at once: together they release exactly the cap, each line once."""
    cap, total = 4, 22
    batch_id = _new_batch(sessions, [_line(i) for i in range(total)])
    sent: list[str] = []
    with sessions.begin() as session:
        sent += batches.start_batch(session, batch_id, MODEL, max_in_flight=cap)
    rounds = 0
    while len(sent) < total:
        rounds += 1
        ended = _in_flight(_lines(sessions, batch_id))
        assert len(ended) == cap
        _end(sessions, [j.id for j in _lines(sessions, batch_id) if j.custom_id in ended])
        barrier = threading.Barrier(cap)

        def release():
            barrier.wait()
            batches.release_and_send(sessions, batch_id, cap, lambda job_id, priority: sent.append(job_id))

        threads = [threading.Thread(target=release) for _ in range(cap)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert len(_in_flight(_lines(sessions, batch_id))) == min(cap, total - cap * rounds)
    assert len(sent) == len(set(sent)) == total
    assert sent[:cap] == [j.id for j in _lines(sessions, batch_id)[:cap]]


def test_cancel_cancels_held_lines_and_releases_nothing_more(sessions):
    batch_id = _new_batch(sessions, [_line(i) for i in range(6)])
    with sessions.begin() as session:
        first, second = batches.start_batch(session, batch_id, MODEL, max_in_flight=2)
        session.execute(update(Job).where(Job.id == first).values(status="running"))
    with sessions.begin() as session:
        _, running = batches.cancel_batch(session, batch_id, "k1")
    assert running == [first]
    jobs = _lines(sessions, batch_id)
    assert [j.status for j in jobs] == ["running"] + ["canceled"] * 5   # held lines too
    _end(sessions, [first], status="canceled")
    with sessions.begin() as session:
        assert batches.release_lines(session, batch_id, 2) == []
    assert batches.maybe_finalize(sessions, batch_id) == "cancelled"


def test_the_job_hook_releases_the_next_line_and_finalizes_the_batch(sessions):
    batch_id = _new_batch(sessions, [_line(i) for i in range(3)])
    with sessions.begin() as session:
        first, = batches.start_batch(session, batch_id, MODEL, max_in_flight=1)
    sent: list[tuple[str, int]] = []
    hook = batches.advance_on_completion(sessions, 1, lambda job_id, priority: sent.append((job_id, priority)))
    jobs = _lines(sessions, batch_id)
    for job in jobs:
        _end(sessions, [job.id], status="failed" if job.custom_id == "r1" else "succeeded")
        hook("completed", job.id, {})
    assert sent == [(jobs[1].id, 9), (jobs[2].id, 9)]
    with sessions() as session:
        batch = session.get(Batch, batch_id)
        assert batch.status == "completed"
        assert batches.request_counts(batch, batches.job_counts(session, batch_id)) == \
            {"total": 3, "completed": 2, "failed": 1}


def test_batches_short_of_lines(sessions):
    full, short, done = (_new_batch(sessions, [_line(i) for i in range(4)]) for _ in range(3))
    with sessions.begin() as session:
        for batch_id in (full, short, done):
            batches.start_batch(session, batch_id, MODEL, max_in_flight=2)
    _end(sessions, [j.id for j in _lines(sessions, short)[:1]])   # ended, but nothing released the next
    _end(sessions, [j.id for j in _lines(sessions, done)])        # nothing held
    with sessions() as session:
        assert batches.batches_short_of_lines(session, 2) == [short]
        assert batches.batches_short_of_lines(session, 0) == sorted([full, short])


def test_due_batches_are_past_their_window_or_stuck_validating(sessions):
    from datetime import timedelta

    started, validating = _new_batch(sessions, [_line(0)]), _new_batch(sessions, [_line(0)])
    with sessions.begin() as session:
        batches.start_batch(session, started, MODEL, max_in_flight=2)
    now = utcnow()
    with sessions() as session:
        expired, stuck = batches.batches_due(session, expired_before=now, stuck_before=now)
        assert started not in expired and validating in stuck
        assert validating not in batches.batches_due(session, expired_before=now,
                                                     stuck_before=now - timedelta(hours=1))[1]
    with sessions.begin() as session:
        session.execute(update(Batch).where(Batch.id.in_([started, validating]))
                        .values(expires_at=now - timedelta(seconds=1)))
    with sessions() as session:
        expired, stuck = batches.batches_due(session, expired_before=now, stuck_before=now)
        assert {started, validating} <= set(expired) and validating not in stuck   # expiring, not restarted


def test_held_lines_do_not_count_towards_the_active_jobs_quota(sessions):
    """A batch bigger than its key's active-jobs limit must not lock the key out of interactive
    jobs: only released lines count (app/jobs/store.py: the count and the guarded insert)."""

    batch_id = _new_batch(sessions, [_line(i) for i in range(6)])
    with sessions.begin() as session:
        batches.start_batch(session, batch_id, MODEL, max_in_flight=2)
    with sessions() as session:
        assert active_jobs(session, "k1") == 2                       # 2 released, 4 held
    with sessions.begin() as session:                                # limit 3: one more fits ...
        jobs_store.create_job(session, model=MODEL, input={"prompt": "hi"}, owner="k1", max_active=3)
    with pytest.raises(jobs_store.SubmissionRefused) as refused, sessions.begin() as session:   # ... then no more
        jobs_store.create_job(session, model=MODEL, input={"prompt": "hi"}, owner="k1", max_active=3)
    assert refused.value.reason == "too_many_active_jobs"
    assert (refused.value.active, refused.value.limit) == (3, 3)


def test_a_page_of_batches_is_counted_in_one_query(sessions):
    from sqlalchemy import event

    first = _new_batch(sessions, [_line(0), _line(1), "{"])
    second = _new_batch(sessions, [_line(0)])
    empty = _new_batch(sessions, [_line(0)])   # never started: no jobs yet
    for batch_id in (first, second):
        with sessions.begin() as session:
            batches.start_batch(session, batch_id, MODEL)
    _finish_all(sessions, first)
    with sessions.begin() as session:
        session.execute(update(Job).where(Job.batch_id == second).values(status="failed"))
    with sessions() as session:
        statements = []
        def listener(conn, cursor, statement, *rest):
            if statement.lstrip().upper().startswith("SELECT"):   # (SQLite's session also says BEGIN)
                statements.append(statement)

        event.listen(session.get_bind(), "before_cursor_execute", listener)
        try:
            counts = batches.jobs_counts(session, [first, second, empty])
        finally:
            event.remove(session.get_bind(), "before_cursor_execute", listener)
        assert len(statements) == 1, statements
        assert counts == {first: {"succeeded": 2}, second: {"failed": 1}, empty: {}}
        assert counts[first] == batches.job_counts(session, first)
        assert batches.jobs_counts(session, []) == {}


def test_the_batch_sweep_finalizes_a_batch_whose_last_line_ended_unnoticed(sessions):
    """The last line ended while the database was down (or its process died) before its hook
    finalized the batch: the reconciler's batch sweep finalizes it, in progress or half-finalized."""
    from app.infra.settings import Settings

    class Celery:
        sent: list = []

        def send_task(self, name, args, queue, priority=None, countdown=None):
            self.sent.append((name, tuple(args)))

    done, stopped_halfway, running = (_new_batch(sessions, [_line(i) for i in range(3)]) for _ in range(3))
    for batch_id in (done, stopped_halfway, running):
        with sessions.begin() as session:
            batches.start_batch(session, batch_id, MODEL)
    _finish_all(sessions, done)
    _finish_all(sessions, stopped_halfway)
    with sessions.begin() as session:   # the first step of maybe_finalize went through, the second did not
        session.execute(update(Batch).where(Batch.id == stopped_halfway).values(status="finalizing",
                                                                                  finalizing_at=utcnow()))
    with sessions() as session:
        due = batches.batches_to_finalize(session)
    assert done in due and stopped_halfway in due and running not in due
    batches.sweep_batches(Settings(), sessions, None, None, Celery())
    with sessions() as session:
        assert {b: session.get(Batch, b).status for b in (done, stopped_halfway, running)} == {
            done: "completed", stopped_halfway: "completed", running: "in_progress"}
        assert session.get(Batch, done).output_file_id is not None
        assert batches.batches_to_finalize(session) == []
