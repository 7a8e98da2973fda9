"""The batch store (app/batches.py) on SQLite and PostgreSQL: line validation, starting, cancelling
and finalizing, each safe to repeat."""
from __future__ import annotations

import json

from sqlalchemy import select, update

from app import batches
from app.models import Batch, File, Job

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
    assert [custom_id for custom_id, _ in parsed.jobs] == ["r0", "r7"]
    assert parsed.jobs[1][1]["n"] == 2 and parsed.jobs[0][1]["max_tokens"] == 2
    assert parsed.total == 10   # the blank line is not a request
    codes = {e["line"]: e["code"] for e in parsed.errors}
    assert codes == {2: "invalid_json_line", 3: "invalid_value", 4: "mismatched_url", 5: "duplicate_custom_id",
                     6: "model_not_found", 7: "invalid_method", 8: "missing_required_parameter",
                     10: "invalid_request"}


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

    from app.db import utcnow

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
