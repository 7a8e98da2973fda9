"""The job store: every read and state transition of a job, as SQL on a caller's session.

Transitions are conditional UPDATEs, so that concurrent API processes and workers agree without
locks: only one claim of a queued job succeeds, only the worker holding the current attempt writes
the final result, and a cancel wins or loses cleanly against a finishing job. The caller owns the
transaction (`with sessions.begin() as session: ...`).

Every lookup a client can cause goes through `get_job(session, job_id, owner)`, so access control
is one filter in one place.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum

from sqlalchemy import and_, bindparam, exists, func, insert, literal, or_, select, text, update
from sqlalchemy.orm import Session

from app.infra.db import utcnow
from app.infra.ids import new_id
from app.jobs.models import CLAIMABLE, FINAL_STATUSES, Job, JobStatus
from app.tenancy.keys import ApiKey


@dataclass(slots=True)
class JobResult:
    """What a worker writes when a job ends."""
    status: JobStatus
    output_text: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    first_token_at: datetime | None = None
    error_type: str | None = None
    error_message: str | None = None
    choices: list | None = None          # per-sample outputs (n > 1 or logprobs), see `Job.choices`

    def __post_init__(self) -> None:
        self.status = JobStatus(self.status)
        if self.status not in FINAL_STATUSES:
            raise ValueError(f"a job result must have a final status, got {self.status.value!r}")
        if self.status is JobStatus.FAILED and not self.error_type:
            raise ValueError("a failed job result needs an error_type")


class CancelOutcome(Enum):
    CANCELED = "canceled"            # was queued: canceled now, no worker involved
    REQUESTED = "requested"          # is running: its worker must stop it
    ALREADY_FINAL = "already_final"  # succeeded, failed or canceled before
    NOT_FOUND = "not_found"


def counting_towards_quota():
    """The jobs an owner's active-jobs quota counts: queued or running, batch lines not yet released
    to the queue excepted (they wait outside it). Also used by the submission's own insert."""
    return (Job.status.in_((JobStatus.QUEUED.value, JobStatus.RUNNING.value)),
            or_(Job.batch_id.is_(None), Job.released_at.is_not(None)))


def active_jobs(session: Session, owner: str | None) -> int:
    """Queued + running jobs of `owner`."""
    owned = Job.owner.is_(None) if owner is None else Job.owner == owner
    return session.scalar(select(func.count()).select_from(Job).where(owned, *counting_towards_quota())) or 0


def _owned_by(owner: str | None):
    return Job.owner.is_(None) if owner is None else Job.owner == owner


# The hot path (submit, claim, finish) runs prebuilt Core statements on the session's connection:
# about a third of the ORM's cost per call, which is most of a job's database time.
_jobs = Job.__table__
_column_to_attr = {column.key: attr.key for attr in Job.__mapper__.column_attrs for column in attr.columns}
_INSERT = insert(_jobs)
_CLAIMED = {"status": JobStatus.RUNNING.value, "worker_id": bindparam("b_worker_id"), "attempts": _jobs.c.attempts + 1,
            "lease_expires_at": bindparam("b_lease_expires_at"), "started_at": bindparam("b_now"), "first_token_at": None}
_CLAIM = (update(_jobs)
          .where(_jobs.c.id == bindparam("b_job_id"),
                 or_(_jobs.c.status == JobStatus.QUEUED.value,
                     and_(_jobs.c.status == JobStatus.RUNNING.value, _jobs.c.lease_expires_at < bindparam("b_now"))))
          .values(_CLAIMED)
          .returning(*_jobs.c))


@functools.cache
def _claim_first_statement(keyless: bool):
    """`claim_first`'s statement: one UPDATE whose WHERE picks the row (an alias of its own, so the
    subquery is not read as the updated row), skipping rows other claims hold (PostgreSQL)."""
    first = _jobs.alias("first_queued")
    owner_is = first.c.owner.is_(None) if keyless else first.c.owner == bindparam("b_owner")
    picked = (select(first.c.id).where(text(CLAIMABLE), first.c.lane == bindparam("b_lane"),
                                       first.c.priority == bindparam("b_priority"), owner_is)
              .order_by(first.c.id).limit(1).with_for_update(skip_locked=True).scalar_subquery())
    return (update(_jobs).where(_jobs.c.id == picked, _jobs.c.status == JobStatus.QUEUED.value)
            .values(_CLAIMED).returning(*_jobs.c))


_FINISH = (update(_jobs)
           .where(_jobs.c.id == bindparam("b_job_id"), _jobs.c.status == JobStatus.RUNNING.value,
                  _jobs.c.worker_id == bindparam("b_worker_id"), _jobs.c.attempts == bindparam("b_attempt"))
           .values({**{name: bindparam(f"v_{name}") for name in (
               "status", "output_text", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens",
               "first_token_at", "error_type", "error_message", "completed_at", "choices")}, "lease_expires_at": None}))


def _detached_job(row) -> Job:
    return Job(**{_column_to_attr[key]: value for key, value in row._mapping.items()})


class SubmissionRefused(Exception):
    """`create_job(..., max_active=, live_key=)` inserted nothing: the owner's key is revoked, or
    the owner already has `max_active` queued or running jobs (`active` is their count now)."""

    def __init__(self, reason: str, active: int | None = None, limit: int | None = None):
        super().__init__(reason)
        self.reason = reason            # "key_revoked" or "too_many_active_jobs"
        self.active = active
        self.limit = limit


_INSERT_COLUMNS = ("id", "owner", "status", "priority", "lane", "model", "input", "metadata", "attempts", "created_at")


def _guarded_insert(live_key: bool, max_active: bool):
    """INSERT ... SELECT <the values> WHERE <the key is live> AND <fewer than :b_max_active active
    jobs>: the submission's checks and its write in one statement, one round trip."""
    conditions = []
    if live_key:
        keys = ApiKey.__table__
        conditions.append(exists().where(keys.c.id == bindparam("owner"), keys.c.revoked_at.is_(None)))
    if max_active:
        # Count at most b_max_active rows: the check costs no more than the limit, however many are queued.
        capped = (select(literal(1).label("one")).select_from(_jobs)
                  .where(_jobs.c.owner == bindparam("owner"), *counting_towards_quota())
                  .limit(bindparam("b_max_active")).subquery())
        conditions.append(select(func.count()).select_from(capped).scalar_subquery() < bindparam("b_max_active"))
    values = select(*[bindparam(name, type_=_jobs.c[name].type).label(name)
                      for name in _INSERT_COLUMNS]).where(*conditions)
    return insert(_jobs).from_select(list(_INSERT_COLUMNS), values).returning(_jobs.c.id)


_GUARDED_INSERTS = {(k, a): _guarded_insert(k, a) for k in (False, True) for a in (False, True) if k or a}


def create_job(session: Session, *, model: str, input: dict, owner: str | None = None, priority: int = 0,
               metadata: dict | None = None, now: datetime | None = None, max_active: int | None = None,
               live_key: bool = False, lane: int = 0) -> Job:
    """Insert a queued job; returns it as a detached object (the insert skips the ORM unit of
    work: submission is the API's hottest path).

    With `max_active` the owner must have fewer queued + running jobs than that, and with
    `live_key` the owner must be a key that is not revoked; both are checked by the insert itself
    (no extra round trip), and a refusal raises `SubmissionRefused`. Concurrent submissions of one
    owner in separate transactions may each see the count below the limit.
    """
    job = Job(id=new_id(), owner=owner, status=JobStatus.QUEUED.value, priority=priority, lane=lane, model=model,
              input=input, meta=metadata, attempts=0, created_at=now or utcnow())
    params = {"id": job.id, "owner": owner, "status": job.status, "priority": priority, "lane": lane, "model": model,
              "input": input, "metadata": metadata, "attempts": 0, "created_at": job.created_at}
    guarded = live_key or max_active is not None
    if guarded and owner is None:
        raise ValueError("max_active and live_key need an owner")
    if not guarded:
        session.connection().execute(_INSERT, params)
        return job
    params["b_max_active"] = max_active
    inserted = session.connection().execute(_GUARDED_INSERTS[(live_key, max_active is not None)], params).first()
    if inserted is not None:
        return job
    if live_key:
        if session.scalar(select(ApiKey.id).where(ApiKey.id == owner, ApiKey.revoked_at.is_(None))) is None:
            raise SubmissionRefused("key_revoked")
    raise SubmissionRefused("too_many_active_jobs", active=active_jobs(session, owner), limit=max_active)


def get_job(session: Session, job_id: str, owner: str | None) -> Job | None:
    """The job `job_id` if `owner` may see it; None otherwise (callers answer 404 either way)."""
    return session.scalars(select(Job).where(Job.id == job_id, _owned_by(owner))).one_or_none()


def list_jobs(session: Session, owner: str | None, *, status: JobStatus | None = None, limit: int = 20,
              before: str | None = None) -> list[Job]:
    """Newest first; `before` is the id of the last job of the previous page."""
    query = select(Job).where(_owned_by(owner))
    if status is not None:
        query = query.where(Job.status == JobStatus(status).value)
    if before is not None:
        query = query.where(Job.id < before)
    return list(session.scalars(query.order_by(Job.id.desc()).limit(limit)))


def claim_job(session: Session, job_id: str, worker_id: str, lease_seconds: float,
              now: datetime | None = None) -> Job | None:
    """Take a queued job (or a running one whose worker's lease ran out) for `worker_id`.

    Returns the claimed job, or None when the job is missing, final, or leased by a live worker:
    a redelivered task for such a job must do nothing.
    """
    return _claimed(session, _CLAIM, {"b_job_id": job_id}, worker_id, lease_seconds, now)


def claim_first(session: Session, lane: int, priority: int, owner: str | None, worker_id: str, lease_seconds: float,
                now: datetime | None = None) -> Job | None:
    """Claim `owner`'s oldest claimable job at (lane, priority) for `worker_id`, in one statement;
    None when it has none free (on PostgreSQL, rows other claims hold locked are passed over)."""
    return _claimed(session, _claim_first_statement(owner is None),
                    {"b_lane": lane, "b_priority": priority, "b_owner": owner}, worker_id, lease_seconds, now)


def _claimed(session: Session, statement, which: dict, worker_id: str, lease_seconds: float,
             now: datetime | None) -> Job | None:
    """Run a claim statement (`_CLAIMED`'s values; `which` picks the job) and detach its row."""
    now = now or utcnow()
    row = session.connection().execute(statement, {
        **which, "b_worker_id": worker_id, "b_now": now,
        "b_lease_expires_at": now + timedelta(seconds=lease_seconds)}).one_or_none()
    return None if row is None else _detached_job(row)


def claimed_at(session: Session, job_id: str | None, worker_id: str, started_at: list[datetime]) -> Job | None:
    """The job if one of `worker_id`'s claims made at one of `started_at` holds it: a claim whose
    commit went through although its answer was lost (the connection dropped), found by its retry.
    `job_id` None: whichever job such a claim took (the fair claim chooses the job itself)."""
    if not started_at:
        return None
    which = [] if job_id is None else [_jobs.c.id == job_id]
    row = session.connection().execute(select(_jobs).where(
        *which, _jobs.c.status == JobStatus.RUNNING.value, _jobs.c.worker_id == worker_id,
        _jobs.c.started_at.in_(started_at)).limit(1)).one_or_none()
    return None if row is None else _detached_job(row)


def renew_leases(session: Session, worker_id: str, job_ids: list[str], lease_seconds: float,
                 now: datetime | None = None) -> int:
    """The worker heartbeat: extend the lease of every listed job this worker still runs."""
    if not job_ids:
        return 0
    now = now or utcnow()
    result = session.execute(
        update(Job).where(Job.id.in_(job_ids), Job.worker_id == worker_id,
                          Job.status == JobStatus.RUNNING.value)
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False))
    return result.rowcount


def finish_job(session: Session, job_id: str, worker_id: str, attempt: int, result: JobResult,
               now: datetime | None = None) -> bool:
    """Write the one final result of a job; False when this worker's attempt no longer owns it."""
    now = now or utcnow()
    written = session.connection().execute(_FINISH, {
        "b_job_id": job_id, "b_worker_id": worker_id, "b_attempt": attempt, "v_status": result.status.value,
        "v_output_text": result.output_text, "v_finish_reason": result.finish_reason,
        "v_prompt_tokens": result.prompt_tokens, "v_completion_tokens": result.completion_tokens,
        "v_cached_tokens": result.cached_tokens, "v_first_token_at": result.first_token_at,
        "v_error_type": result.error_type, "v_error_message": result.error_message, "v_completed_at": now,
        "v_choices": result.choices})
    return written.rowcount == 1


def finished_at(session: Session, job_id: str, worker_id: str, attempt: int, completed_at: list[datetime]) -> bool:
    """Whether `finish_job` of this worker's `attempt` wrote the job's result at one of `completed_at`:
    a write whose commit went through although its answer was lost, found by its retry."""
    if not completed_at:
        return False
    return session.scalar(select(exists().where(
        _jobs.c.id == job_id, _jobs.c.worker_id == worker_id, _jobs.c.attempts == attempt,
        _jobs.c.status.in_([s.value for s in FINAL_STATUSES]), _jobs.c.completed_at.in_(completed_at)))) is True


def release_job(session: Session, job_id: str, worker_id: str, attempt: int) -> bool:
    """Hand a running job back to the queue (its worker is shutting down before it finished)."""
    released = session.execute(
        update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING.value,
                          Job.worker_id == worker_id, Job.attempts == attempt)
        .values(status=JobStatus.QUEUED.value, worker_id=None, lease_expires_at=None)
        .execution_options(synchronize_session=False))
    return released.rowcount == 1


# What a job canceled before any worker ran it holds.
_CANCELED_WHILE_QUEUED = {"status": JobStatus.CANCELED.value, "output_text": "", "finish_reason": "abort",
                          "completion_tokens": 0}


def canceled_result() -> JobResult:
    """The result of a job canceled before it generated anything."""
    values = {k: v for k, v in _CANCELED_WHILE_QUEUED.items() if k != "status"}
    return JobResult(JobStatus.CANCELED, **values)


def cancel_job(session: Session, job_id: str, owner: str | None, now: datetime | None = None) -> CancelOutcome:
    """Cancel a queued job at once, or flag a running one for its worker to stop."""
    now = now or utcnow()
    queued = session.execute(
        update(Job).where(Job.id == job_id, _owned_by(owner), Job.status == JobStatus.QUEUED.value)
        .values(completed_at=now, **_CANCELED_WHILE_QUEUED)
        .execution_options(synchronize_session=False))
    if queued.rowcount == 1:
        return CancelOutcome.CANCELED
    running = session.execute(
        update(Job).where(Job.id == job_id, _owned_by(owner), Job.status == JobStatus.RUNNING.value)
        .values(cancel_requested_at=now)
        .execution_options(synchronize_session=False))
    if running.rowcount == 1:
        return CancelOutcome.REQUESTED
    return CancelOutcome.NOT_FOUND if get_job(session, job_id, owner) is None else CancelOutcome.ALREADY_FINAL


def cancel_requested(session: Session, job_id: str) -> bool:
    return session.scalar(select(Job.cancel_requested_at).where(Job.id == job_id)) is not None


def count_by_status(session: Session) -> dict[str, int]:
    rows = session.execute(select(Job.status, func.count()).group_by(Job.status))
    return {status: count for status, count in rows}


@dataclass(slots=True)
class KeyUsage:
    """One owner's figures for /metrics: jobs by status, and tokens summed over its final jobs."""
    jobs: dict[str, int]
    prompt_tokens: int = 0
    completion_tokens: int = 0


def usage_by_owner(session: Session, owner: str | None = None) -> dict[str, KeyUsage]:
    """Every owner's jobs by status and tokens of its final jobs, in one GROUP BY; owner None is "".
    With `owner`, that owner's alone (its index range)."""
    final = [s.value for s in FINAL_STATUSES]
    query = (select(Job.owner, Job.status, func.count(), func.sum(Job.prompt_tokens), func.sum(Job.completion_tokens))
             .group_by(Job.owner, Job.status))
    if owner is not None:
        query = query.where(Job.owner == owner)
    rows = session.execute(query)
    usage: dict[str, KeyUsage] = {}
    for owner, status, count, prompt, completion in rows:
        key = usage.setdefault(owner or "", KeyUsage(jobs={}))
        key.jobs[status] = key.jobs.get(status, 0) + count
        if status in final:
            key.prompt_tokens += prompt or 0
            key.completion_tokens += completion or 0
    return usage


def recent_queue_waits(session: Session, limit: int, owner: str | None = None) -> list[tuple[str, float]]:
    """(owner or "", seconds from created_at to started_at) of the `limit` most recently submitted
    jobs that have started (newest ids first: the primary key index, no sort of the table); with
    `owner`, of that owner's jobs only."""
    query = select(Job.owner, Job.created_at, Job.started_at).where(Job.started_at.is_not(None))
    if owner is not None:
        query = query.where(Job.owner == owner)
    rows = session.execute(query.order_by(Job.id.desc()).limit(limit))
    return [(owner or "", max(0.0, (started - created).total_seconds())) for owner, created, started in rows]


def fail_unqueued(session: Session, job_id: str, error_type: str, message: str) -> bool:
    """Fail a queued job whose task could not be sent (a request that cannot wait for the broker)."""
    failed = session.execute(
        update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED.value)
        .values(status=JobStatus.FAILED.value, error_type=error_type, error_message=message, completed_at=utcnow())
        .execution_options(synchronize_session=False))
    return failed.rowcount == 1


# -- batch lines: jobs inserted held, released a few at a time (app/openai/batches.py) -------------

def batch_line_held():
    """A line not yet released (the terms of the `ix_jobs_batch_held` partial index)."""
    return (Job.batch_id.is_not(None), Job.released_at.is_(None), Job.status == JobStatus.QUEUED.value)


def batch_line_in_flight():
    """A line released and not finished (the terms of the `ix_jobs_batch_in_flight` partial index)."""
    return (Job.released_at.is_not(None), Job.status.in_((JobStatus.QUEUED.value, JobStatus.RUNNING.value)))


def insert_batch_lines(session: Session, *, batch_id: str, owner: str | None, model: str, priority: int,
                       lines: list[tuple[str, dict, int]], now: datetime) -> None:
    """One held job per (custom_id, job input, lane): batch lines take the flex lane unless they ask."""
    rows = [{"id": new_id(), "owner": owner, "status": JobStatus.QUEUED.value, "priority": priority,
             "lane": lane, "model": model,
             "input": job_input, "metadata": None, "attempts": 0, "created_at": now, "batch_id": batch_id,
             "custom_id": custom_id} for custom_id, job_input, lane in lines]
    if rows:
        session.execute(insert(_jobs), rows)


def release_batch_lines(session: Session, job_ids: list[str], now: datetime) -> None:
    session.execute(update(Job).where(Job.id.in_(job_ids), *batch_line_held()).values(released_at=now)
                    .execution_options(synchronize_session=False))


def stop_batch_lines(session: Session, batch_id: str, now: datetime) -> list[str]:
    """Cancel a batch's queued lines and flag its running ones; returns the running ones' ids (their
    workers are to be told)."""
    session.execute(update(Job).where(Job.batch_id == batch_id, Job.status == JobStatus.QUEUED.value)
                    .values(completed_at=now, **_CANCELED_WHILE_QUEUED).execution_options(synchronize_session=False))
    running = list(session.scalars(select(Job.id).where(Job.batch_id == batch_id,
                                                        Job.status == JobStatus.RUNNING.value)))
    if running:
        session.execute(update(Job).where(Job.id.in_(running), Job.status == JobStatus.RUNNING.value)
                        .values(cancel_requested_at=now).execution_options(synchronize_session=False))
    return running
