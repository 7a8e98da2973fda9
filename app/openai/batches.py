"""Batches (OpenAI's Batch API) on top of the job store; their files are app/openai/files.py.

A batch is a JSONL file of requests. Starting it (a worker task) validates every line, inserts one
low-priority job per valid line and records the invalid ones; the batch is then `in_progress`.
Lines are released a few at a time: at most `max_in_flight` lines of a batch are released and not
yet finished (only released lines have their task sent), and each line that ends releases the next
(`release_lines`), so a big batch never fills the engine and the workers' threads ahead of
interactive requests. When its last job ends, `maybe_finalize` writes the output file (results)
and the error file (invalid lines, failed and canceled requests), matched to the input by
`custom_id`. Every step is a conditional UPDATE on the batch's status, so running any of them twice
changes nothing.

    validating -> in_progress -> finalizing -> completed
    validating -> failed (the file is unusable)        validating -> cancelled
    in_progress -> cancelling -> finalizing -> cancelled
    in_progress -> cancelling (past completion_window) -> finalizing -> expired;  validating -> expired
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Callable

from sqlalchemy import exists, func, select, update
from sqlalchemy.orm import Session

from app.infra.broker import send_start_batch
from app.infra.db import utcnow
from app.infra.ids import new_id, well_formed_id
from app.infra.retry import retry_outage
from app.jobs import store
from app.jobs.cancel import tell_workers_to_stop
from app.jobs.models import SERVICE_TIERS, Job, JobStatus
from app.openai import formats as fmt
from app.openai.files import OUTPUT_PURPOSE, create_file, owned_by, timestamp
from app.openai.models import Batch, File

log = logging.getLogger(__name__)

COMPLETION_WINDOWS = {"24h": timedelta(hours=24)}
MAX_LINES = 50_000

BATCH_ID_PREFIX = "batch_"
DB_RETRY_SECONDS = 10.0     # a batch step retries through a database outage this long (then the sweeps take over)


# -- batches --------------------------------------------------------------------------------------

def create_batch(session: Session, *, owner: str | None, input_file_id: str, endpoint: str, completion_window: str,
                 metadata: dict | None) -> Batch:
    now = utcnow()
    batch = Batch(id=new_id(BATCH_ID_PREFIX), owner=owner, status="validating", endpoint=endpoint,
                  input_file_id=input_file_id, completion_window=completion_window, meta=metadata, total=0,
                  created_at=now, expires_at=now + COMPLETION_WINDOWS[completion_window])
    session.add(batch)
    return batch


def get_batch(session: Session, batch_id: str, owner: str | None) -> Batch | None:
    if not well_formed_id(batch_id, BATCH_ID_PREFIX):
        return None
    return session.scalars(select(Batch).where(Batch.id == batch_id, owned_by(Batch.owner, owner))).one_or_none()


def list_batches(session: Session, owner: str | None, *, limit: int, after: str | None) -> list[Batch]:
    query = select(Batch).where(owned_by(Batch.owner, owner))
    if after:
        query = query.where(Batch.id < after)
    return list(session.scalars(query.order_by(Batch.id.desc()).limit(limit)))


def job_counts(session: Session, batch_id: str) -> dict[str, int]:
    return jobs_counts(session, [batch_id])[batch_id]


def jobs_counts(session: Session, batch_ids: list[str]) -> dict[str, dict[str, int]]:
    """Each batch's jobs by status, for a page of batches in one query."""
    counts: dict[str, dict[str, int]] = {batch_id: {} for batch_id in batch_ids}
    if batch_ids:
        rows = session.execute(select(Job.batch_id, Job.status, func.count())
                               .where(Job.batch_id.in_(batch_ids)).group_by(Job.batch_id, Job.status))
        for batch_id, status, count in rows:
            counts[batch_id][status] = count
    return counts


def request_counts(batch: Batch, counts: dict[str, int]) -> dict[str, int]:
    invalid = len(batch.line_errors or [])
    return {"total": batch.total, "completed": counts.get(JobStatus.SUCCEEDED.value, 0),
            "failed": counts.get(JobStatus.FAILED.value, 0) + invalid}


def batch_to_dict(batch: Batch, counts: dict[str, int]) -> dict[str, Any]:
    return {
        "id": batch.id, "object": "batch", "endpoint": batch.endpoint, "errors": batch.errors,
        "input_file_id": batch.input_file_id, "completion_window": batch.completion_window, "status": batch.status,
        "output_file_id": batch.output_file_id, "error_file_id": batch.error_file_id,
        "created_at": timestamp(batch.created_at), "in_progress_at": timestamp(batch.in_progress_at),
        "expires_at": timestamp(batch.expires_at), "finalizing_at": timestamp(batch.finalizing_at),
        "completed_at": timestamp(batch.completed_at), "failed_at": timestamp(batch.failed_at),
        "expired_at": timestamp(batch.expired_at), "cancelling_at": timestamp(batch.cancelling_at),
        "cancelled_at": timestamp(batch.cancelled_at), "request_counts": request_counts(batch, counts),
        "metadata": batch.meta,
    }


# -- starting: validate the lines, one job per valid line ------------------------------------------

@dataclass(slots=True)
class ParsedLines:
    jobs: list[tuple[str, dict, int]]       # (custom_id, job input, lane)
    errors: list[dict[str, Any]]            # {line, custom_id, code, message}
    total: int


def parse_lines(content: bytes, endpoint: str, model_name: str) -> ParsedLines:
    """Every non-blank line of a batch file, validated as OpenAI does; a bad line is an error entry,
    never an exception."""
    jobs: list[tuple[str, dict, int]] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    total = 0
    for number, line in enumerate(content.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        total += 1
        custom_id = None
        try:
            item = json.loads(line)
            if not isinstance(item, dict):
                raise fmt.OpenAIError(400, "each line must be a JSON object", code="invalid_json_line")
            custom_id = item.get("custom_id") if isinstance(item.get("custom_id"), str) else None
            if not custom_id:
                raise fmt.OpenAIError(400, "custom_id must be a non-empty string", param="custom_id",
                                      code="missing_required_parameter")
            if custom_id in seen:
                raise fmt.OpenAIError(400, f"duplicate custom_id {custom_id!r}", param="custom_id",
                                      code="duplicate_custom_id")
            seen.add(custom_id)
            if item.get("method", "POST") != "POST":
                raise fmt.OpenAIError(400, "method must be POST", param="method", code="invalid_method")
            if item.get("url") != endpoint:
                raise fmt.OpenAIError(400, f"url must be the batch's endpoint {endpoint!r}, got {item.get('url')!r}",
                                      param="url", code="mismatched_url")
            spec = fmt.parse_request(endpoint, item.get("body"))
            if spec.stream:
                raise fmt.OpenAIError(400, "stream is not supported in batches", param="body.stream")
            if spec.model != model_name:
                raise fmt.OpenAIError(400, f"model {spec.model!r} is not served here (serving {model_name!r})",
                                      param="body.model", code="model_not_found")
            # A line waits in the flex lane unless its body asks for "default" (then beside interactive calls).
            spec.lane   # an unknown tier is the line's error
            lane = SERVICE_TIERS["default" if spec.service_tier == "default" else "flex"]
            jobs.append((custom_id, spec.job_input(), lane))
        except ValueError:
            errors.append({"line": number, "custom_id": custom_id, "code": "invalid_json_line",
                           "message": "the line is not valid JSON"})
        except fmt.OpenAIError as exc:
            errors.append({"line": number, "custom_id": custom_id, "code": exc.code or "invalid_request",
                           "message": exc.message})
    return ParsedLines(jobs, errors, total)


def start_batch(session: Session, batch_id: str, model_name: str, max_in_flight: int = 0) -> list[str]:
    """validating -> in_progress, inserting the batch's jobs (held) in the same transaction and
    releasing the first `max_in_flight` of them (0: all). Returns the ids of the jobs whose task is
    to be sent: the released ones; when called again later, the released ones still queued (their
    tasks may be lost; re-sending is harmless, a claim is conditional) and any newly released. An
    unusable file fails the batch."""
    now = utcnow()
    # The write comes first (SQLite: a write transaction starts with its write; PostgreSQL: the row
    # stays locked, so a second start of the same batch waits and then finds it in progress).
    claimed = session.execute(update(Batch).where(Batch.id == batch_id, Batch.status == "validating")
                              .values(in_progress_at=now))
    if claimed.rowcount != 1:
        if session.scalar(select(Batch.status).where(Batch.id == batch_id)) not in ("in_progress", "cancelling"):
            return []
        released = list(session.scalars(select(Job.id).where(
            Job.batch_id == batch_id, Job.status == JobStatus.QUEUED.value, Job.released_at.is_not(None))
            .order_by(Job.id)))
        return released + release_lines(session, batch_id, max_in_flight, now)
    batch = session.get(Batch, batch_id)
    file = session.get(File, batch.input_file_id)
    parsed = parse_lines(file.content, batch.endpoint, model_name) if file is not None else None
    if parsed is None or parsed.total == 0 or parsed.total > MAX_LINES:
        message = ("the input file is gone" if parsed is None else "the input file has no requests"
                   if parsed.total == 0 else f"the input file has more than {MAX_LINES} requests")
        session.execute(update(Batch).where(Batch.id == batch_id).values(
            status="failed", failed_at=now, in_progress_at=None, errors={"object": "list", "data": [
                {"code": "invalid_file", "message": message, "param": "input_file_id", "line": None}]}))
        return []
    session.execute(update(Batch).where(Batch.id == batch_id).values(
        status="in_progress", total=parsed.total, line_errors=parsed.errors))
    store.insert_batch_lines(session, batch_id=batch_id, owner=batch.owner, model=model_name,
                             priority=fmt.BATCH_PRIORITY, lines=parsed.jobs, now=now)
    return release_lines(session, batch_id, max_in_flight, now)


# -- releasing lines: at most max_in_flight of a batch's lines queued or running -------------------

def release_lines(session: Session, batch_id: str, max_in_flight: int, now: datetime | None = None) -> list[str]:
    """Release held lines of an `in_progress` batch until `max_in_flight` of its lines are released
    and unfinished (0: release them all); returns the ids released now, in line order, whose tasks
    the caller sends once this transaction commits.

    The batch's row is written first and so held until the transaction ends (PostgreSQL: a row
    lock; SQLite: the database's write lock): concurrent callers count and release one after the
    other, so a line is released once and the cap is never exceeded. Calling it when nothing ended
    releases nothing: the job hook, the batch task and the reconciler can all call it."""
    held_batch = session.execute(update(Batch).where(Batch.id == batch_id, Batch.status == "in_progress")
                                 .values(status="in_progress").execution_options(synchronize_session=False))
    if held_batch.rowcount != 1:
        return []   # not started, or stopping: nothing more is released
    room = None
    if max_in_flight > 0:
        room = max_in_flight - session.scalar(select(func.count()).select_from(Job).where(
            Job.batch_id == batch_id, *store.batch_line_in_flight()))
        if room <= 0:
            return []
    query = select(Job.id).where(Job.batch_id == batch_id, *store.batch_line_held()).order_by(Job.id)
    job_ids = list(session.scalars(query if room is None else query.limit(room)))
    if job_ids:
        store.release_batch_lines(session, job_ids, now or utcnow())
    return job_ids


Send = Callable[[str, int], None]   # (job id, priority): enqueue genq.run_job


def release_and_send(sessions, batch_id: str, max_in_flight: int, send: Send) -> list[str]:
    """`release_lines` in its own transaction, then send the released lines' tasks. A task that
    cannot be sent (the broker is down) is not lost: the line is released in the database, and
    the reconciler sends it once it has waited `requeue_after_seconds`."""
    with sessions.begin() as session:
        job_ids = release_lines(session, batch_id, max_in_flight)
    for job_id in job_ids:
        try:
            send(job_id, fmt.BATCH_PRIORITY)
        except Exception:
            log.warning("batch %s: could not send the task of line %s; the reconciler will", batch_id, job_id,
                        exc_info=True)
    return job_ids


def batches_short_of_lines(session: Session, max_in_flight: int) -> list[str]:
    """Batches in progress with held lines and fewer than `max_in_flight` lines in flight: a line
    ended without releasing the next (its process died between the two)."""
    held = exists().where(Job.batch_id == Batch.id, *store.batch_line_held())
    query = select(Batch.id).where(Batch.status == "in_progress", held)
    if max_in_flight > 0:
        in_flight = (select(func.count()).select_from(Job).where(Job.batch_id == Batch.id, *store.batch_line_in_flight())
                     .correlate(Batch).scalar_subquery())
        query = query.where(in_flight < max_in_flight)
    return list(session.scalars(query.order_by(Batch.id)))


def batches_to_finalize(session: Session, limit: int = 100) -> list[str]:
    """Batches in progress, cancelling or finalizing with no line left to run (none queued, held
    lines included, none running): their last line's end did not finalize them (its process died,
    or the database was down at that moment)."""
    unfinished = exists().where(Job.batch_id == Batch.id,
                                Job.status.in_((JobStatus.QUEUED.value, JobStatus.RUNNING.value)))
    return list(session.scalars(select(Batch.id).where(Batch.status.in_(("in_progress", "cancelling", "finalizing")),
                                                       ~unfinished).order_by(Batch.id).limit(limit)))


def batches_due(session: Session, *, expired_before: datetime, stuck_before: datetime) -> tuple[list[str], list[str]]:
    """(batches past their completion window and not final yet, batches still `validating` since
    before `stuck_before`: their start task was never sent or got lost)."""
    expired = session.scalars(select(Batch.id).where(Batch.status.in_(("validating", "in_progress")),
                                                     Batch.expires_at < expired_before).order_by(Batch.id))
    stuck = session.scalars(select(Batch.id).where(Batch.status == "validating", Batch.created_at < stuck_before,
                                                   Batch.expires_at >= expired_before).order_by(Batch.id))
    return list(expired), list(stuck)


# -- cancelling -----------------------------------------------------------------------------------

def cancel_batch(session: Session, batch_id: str, owner: str | None) -> tuple[Batch | None, list[str]]:
    """Cancel a batch: queued jobs now, running ones by their workers (their ids are returned, to be
    told on the control channel). A batch still validating is cancelled at once."""
    if not well_formed_id(batch_id, BATCH_ID_PREFIX):
        return None, []
    now = utcnow()
    mine = (Batch.id == batch_id, owned_by(Batch.owner, owner))
    session.execute(update(Batch).where(*mine, Batch.status == "validating").values(
        status="cancelled", cancelling_at=now, cancelled_at=now))
    moved = session.execute(update(Batch).where(*mine, Batch.status == "in_progress").values(
        status="cancelling", cancelling_at=now))
    running = store.stop_batch_lines(session, batch_id, now) if moved.rowcount == 1 else []
    return get_batch(session, batch_id, owner), running


def expire_if_due(session: Session, batch_id: str) -> list[str]:
    """A batch past its completion window stops: queued lines are canceled, running ones are told to
    stop (their ids are returned), and it finalizes as `expired` with what finished."""
    now = utcnow()
    session.execute(update(Batch).where(Batch.id == batch_id, Batch.status == "validating", Batch.expires_at < now)
                    .values(status="expired", expired_at=now))
    moved = session.execute(update(Batch).where(Batch.id == batch_id, Batch.status == "in_progress",
                                                Batch.expires_at < now).values(status="cancelling", expired_at=now))
    return store.stop_batch_lines(session, batch_id, now) if moved.rowcount == 1 else []


def expire(sessions, redis, channels, batch_id: str) -> str | None:
    """Expire a batch if it is due (`expire_if_due`) and tell its running lines to stop; returns
    its final status when that came at once (nothing was running)."""
    with sessions.begin() as session:
        running = expire_if_due(session, batch_id)
    return stop_lines(sessions, redis, channels, batch_id, running)


def stop_lines(sessions, redis, channels, batch_id: str, running: list[str]) -> str | None:
    """Tell the workers on the control channel to stop these lines of a stopping batch (their
    cancel is already in the database), then finalize it if nothing was running. With Redis down
    the lines run to their end instead; each one's end may finalize the batch."""
    for job_id in running:
        try:
            tell_workers_to_stop(redis, channels, job_id)
        except Exception:
            log.warning("batch %s: could not tell the workers to stop line %s", batch_id, job_id, exc_info=True)
    return maybe_finalize(sessions, batch_id)


# -- finalizing -----------------------------------------------------------------------------------

def batch_of_job(session: Session, job_id: str) -> str | None:
    return session.scalar(select(Job.batch_id).where(Job.id == job_id))


def advance_on_completion(sessions, max_in_flight: int, send: Send):
    """A job hook (worker and API): when a line of a batch ends (succeeded, failed or canceled),
    release the next line(s), and finish the batch if it was the last."""

    def advance(job_id: str) -> None:
        with sessions() as session:
            batch_id = batch_of_job(session, job_id)
        if batch_id is not None and not release_and_send(sessions, batch_id, max_in_flight, send):
            maybe_finalize(sessions, batch_id)   # (a line was released: the batch is not done)

    def hook(event: str, job_id: str, details: dict) -> None:
        if event != "completed":
            return
        # Each step is conditional, so running them again is safe. Should the database stay down,
        # the reconciler releases what is held (batches_short_of_lines) and `sweep_batches`
        # finalizes the batch (batches_to_finalize).
        retry_outage(lambda: advance(job_id), what=f"job {job_id}: advancing its batch", seconds=DB_RETRY_SECONDS)

    return hook


def maybe_finalize(sessions, batch_id: str) -> str | None:
    """Finish the batch if none of its jobs is left to run; returns its final status, or None when
    there is nothing to do (yet). Safe to call from any number of places at once: each step is one
    conditional UPDATE, written first in its transaction."""
    unfinished = exists().where(Job.batch_id == batch_id,
                                Job.status.in_((JobStatus.QUEUED.value, JobStatus.RUNNING.value)))
    with sessions.begin() as session:
        session.execute(update(Batch).where(Batch.id == batch_id, Batch.status.in_(("in_progress", "cancelling")),
                                            ~unfinished).values(status="finalizing", finalizing_at=utcnow())
                        .execution_options(synchronize_session=False))
    with sessions.begin() as session:
        # Holding the row (PostgreSQL) makes a concurrent finalizer wait, then find nothing to do.
        held = session.execute(update(Batch).where(Batch.id == batch_id, Batch.status == "finalizing")
                               .values(status="finalizing").execution_options(synchronize_session=False))
        if held.rowcount != 1:
            return None
        batch = session.get(Batch, batch_id)
        final = "expired" if batch.expired_at is not None else "cancelled" if batch.cancelling_at else "completed"
        output, errors = _result_lines(session, batch)
        values: dict[str, Any] = {"status": final}
        if final != "expired":   # expired_at says when the window closed
            values[f"{final}_at"] = utcnow()
        if output:
            values["output_file_id"] = create_file(session, owner=batch.owner, purpose=OUTPUT_PURPOSE,
                                                   filename=f"{batch.id}_output.jsonl", content=_jsonl(output)).id
        if errors:
            values["error_file_id"] = create_file(session, owner=batch.owner, purpose=OUTPUT_PURPOSE,
                                                  filename=f"{batch.id}_error.jsonl", content=_jsonl(errors)).id
        session.flush()
        session.execute(update(Batch).where(Batch.id == batch_id).values(**values)
                        .execution_options(synchronize_session=False))
        return final


def _result_lines(session: Session, batch: Batch) -> tuple[list[dict], list[dict]]:
    output: list[dict] = []
    errors: list[dict] = [{"id": f"batch_req_line{e['line']}", "custom_id": e["custom_id"], "response": None,
                           "error": {"code": e["code"], "message": f"line {e['line']}: {e['message']}"}}
                          for e in batch.line_errors or []]
    stopped = ({"code": "batch_expired", "message": "the batch's completion window ended first"}
               if batch.expired_at is not None else
               {"code": "batch_cancelled", "message": "the batch was cancelled first"})
    for job in session.scalars(select(Job).where(Job.batch_id == batch.id).order_by(Job.id)):
        line = {"id": f"batch_req_{job.id}", "custom_id": job.custom_id}
        if job.status == JobStatus.SUCCEEDED.value:
            output.append({**line, "response": {"status_code": 200, "request_id": job.id,
                                                "body": fmt.response_body(batch.endpoint, job)}, "error": None})
        elif job.status == JobStatus.CANCELED.value:
            errors.append({**line, "response": None, "error": stopped})
        else:
            error = fmt.job_error(job)
            errors.append({**line, "response": {"status_code": error.status, "request_id": job.id,
                                                "body": error.body()}, "error": None})
    return output, errors


def _jsonl(items: list[dict]) -> bytes:
    return "".join(json.dumps(item, separators=(",", ":")) + "\n" for item in items).encode()


def sweep_batches(settings, sessions, redis, channels, celery) -> tuple[int, int]:
    """The reconciler's batch sweep: expire batches past their completion window (nobody has to
    read them first), re-send the start task of batches still `validating` after
    `requeue_after_seconds` (the API could not queue it, or it was lost), and finalize batches whose
    lines have all ended but which were not finalized (the last line's hook died or met a database
    outage). Returns (expired, re-sent)."""
    now = utcnow()
    with sessions() as session:
        expired, stuck = batches_due(
            session, expired_before=now, stuck_before=now - timedelta(seconds=settings.requeue_after_seconds))
        finished = batches_to_finalize(session)
    for batch_id in expired:
        expire(sessions, redis, channels, batch_id)
    for batch_id in stuck:
        send_start_batch(celery, settings, batch_id)
    finalized = [batch_id for batch_id in finished if maybe_finalize(sessions, batch_id) is not None]
    if expired or stuck or finalized:
        log.warning("batch sweep: %d batch(es) expired, %d start task(s) re-sent, %d finalized", len(expired),
                    len(stuck), len(finalized))
    return len(expired), len(stuck)
