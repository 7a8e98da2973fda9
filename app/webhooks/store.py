"""The webhook store: registrations, events and attempts, as SQL on a caller's session.

An event row is written (committed) before its delivery task is sent, so a crash between the two
leaves a `pending` row that `due_events` finds. An attempt is claimed with a conditional UPDATE
(`attempts` must still be what the task expects, and no other attempt may be in flight), so a
duplicated or redelivered task cannot send an attempt twice.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import String, cast, exists, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.infra.db import utcnow
from app.infra.ids import new_id
from app.jobs.models import FINAL_STATUSES, Job
from app.webhooks.models import JobWebhook, WebhookAttempt, WebhookEvent

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"


@dataclass(frozen=True, slots=True)
class Registration:
    job_id: str
    url: str
    events_filter: tuple[str, ...]
    base_url: str

    def wants(self, name: str) -> bool:
        return name in self.events_filter


def register(session: Session, job_id: str, url: str, events_filter: list[str], base_url: str) -> None:
    session.execute(insert(JobWebhook).values(job_id=job_id, url=url, events_filter=list(events_filter),
                                              base_url=base_url, created_at=utcnow()))


def registration(session: Session, job_id: str) -> Registration | None:
    row = session.execute(select(JobWebhook.url, JobWebhook.events_filter, JobWebhook.base_url)
                          .where(JobWebhook.job_id == job_id)).one_or_none()
    return None if row is None else Registration(job_id, row.url, tuple(row.events_filter), row.base_url)


def create_event(sessions: sessionmaker[Session], job_id: str, event_type: str, url: str, payload: str,
                 now: datetime | None = None) -> str | None:
    """Insert a pending event in its own transaction; its id, or None when the job already has
    this once-per-job event (a duplicated finish)."""
    event_id = new_id()
    now = now or utcnow()
    try:
        with sessions.begin() as session:
            session.execute(insert(WebhookEvent).values(
                id=event_id, job_id=job_id, type=event_type, url=url, payload=payload, status=PENDING,
                attempts=0, next_attempt_at=now, created_at=now))
    except IntegrityError:
        return None
    return event_id


def get_event(session: Session, event_id: str) -> WebhookEvent | None:
    return session.get(WebhookEvent, event_id)


def claim_attempt(session: Session, event_id: str, attempt: int, lock_seconds: float,
                  now: datetime | None = None) -> bool:
    """Take attempt number `attempt` of a pending event; False when it was made already, the event
    is no longer pending, or another attempt is in flight."""
    now = now or utcnow()
    claimed = session.execute(
        update(WebhookEvent)
        .where(WebhookEvent.id == event_id, WebhookEvent.status == PENDING, WebhookEvent.attempts == attempt - 1,
               or_(WebhookEvent.locked_until.is_(None), WebhookEvent.locked_until < now))
        .values(locked_until=now + timedelta(seconds=lock_seconds))
        .execution_options(synchronize_session=False))
    return claimed.rowcount == 1


def attempt_locked_until(session: Session, event_id: str, attempt: int, locked_until: list[datetime]) -> bool:
    """Whether attempt `attempt` is claimed with one of these lock ends: a claim whose commit went
    through although its answer was lost, found by its retry."""
    if not locked_until:
        return False
    return session.scalar(select(exists().where(
        WebhookEvent.id == event_id, WebhookEvent.status == PENDING, WebhookEvent.attempts == attempt - 1,
        WebhookEvent.locked_until.in_(locked_until)))) is True


def attempt_recorded(session: Session, event_id: str, attempt: int) -> bool:
    return session.scalar(select(exists().where(WebhookAttempt.event_id == event_id,
                                                WebhookAttempt.attempt == attempt))) is True


def record_attempt(session: Session, event_id: str, attempt: int, *, started_at: datetime, duration: float,
                   status_code: int | None, error: str | None, status: str,
                   next_attempt_at: datetime | None) -> None:
    """Write one attempt and the event's new state (`status`: pending (a retry follows at
    `next_attempt_at`), delivered or failed)."""
    session.execute(insert(WebhookAttempt).values(
        event_id=event_id, attempt=attempt, started_at=started_at, duration_seconds=round(duration, 6),
        status_code=status_code, error=error, next_attempt_at=next_attempt_at))
    session.execute(
        update(WebhookEvent).where(WebhookEvent.id == event_id, WebhookEvent.attempts == attempt - 1)
        .values(attempts=attempt, status=status, locked_until=None, next_attempt_at=next_attempt_at,
                completed_at=None if status == PENDING else utcnow())
        .execution_options(synchronize_session=False))


def untried_earlier(session: Session, event: WebhookEvent) -> bool:
    """Whether an earlier event of the same job still awaits its first attempt's answer (events of a
    job go out in order: a later one waits for that first answer)."""
    earlier = WebhookEvent.__table__.alias("earlier")
    return bool(session.scalar(select(exists().where(
        earlier.c.job_id == event.job_id, earlier.c.id < event.id, earlier.c.status == PENDING,
        earlier.c.attempts == 0))))


def list_events(session: Session, job_id: str) -> list[tuple[WebhookEvent, list[WebhookAttempt]]]:
    events = list(session.scalars(select(WebhookEvent).where(WebhookEvent.job_id == job_id)
                                  .order_by(WebhookEvent.id)))
    attempts: dict[str, list[WebhookAttempt]] = {event.id: [] for event in events}
    if events:
        for row in session.scalars(select(WebhookAttempt).where(WebhookAttempt.event_id.in_(list(attempts)))
                                   .order_by(WebhookAttempt.event_id, WebhookAttempt.attempt)):
            attempts[row.event_id].append(row)
    return [(event, attempts[event.id]) for event in events]


def due_events(session: Session, overdue_before: datetime, now: datetime | None = None,
               limit: int = 500) -> list[tuple[str, int]]:
    """(event id, next attempt number) of pending events whose next attempt was due before
    `overdue_before` and is not in flight: their task was lost (a crash after the row was written,
    a broker outage, a worker that died holding it)."""
    now = now or utcnow()
    rows = session.execute(
        select(WebhookEvent.id, WebhookEvent.attempts)
        .where(WebhookEvent.status == PENDING, WebhookEvent.next_attempt_at < overdue_before,
               or_(WebhookEvent.locked_until.is_(None), WebhookEvent.locked_until < now))
        .order_by(WebhookEvent.id).limit(limit))
    return [(row.id, row.attempts + 1) for row in rows]


def finished_without_completed_event(session: Session, since: datetime, until: datetime,
                                     limit: int = 500) -> list[Registration]:
    """Registrations asking for `completed` whose job finished in [since, until) but has no
    job.completed event (its process died between the final write and the event)."""
    has_event = exists().where(WebhookEvent.job_id == Job.id, WebhookEvent.type == "job.completed")
    # In SQL, before the LIMIT: registrations that never want `completed` never get the event, and
    # would otherwise fill every page. The filter is a JSON list of fixed names (payloads.events_filter),
    # so its text holds '"completed"' exactly when it asks for it, on every dialect.
    wants_completed = cast(JobWebhook.events_filter, String).like('%"completed"%')
    rows = session.execute(
        select(JobWebhook.job_id, JobWebhook.url, JobWebhook.events_filter, JobWebhook.base_url)
        .join(Job, Job.id == JobWebhook.job_id)
        .where(Job.status.in_([s.value for s in FINAL_STATUSES]), Job.completed_at >= since,
               Job.completed_at < until, wants_completed, ~has_event)
        .order_by(JobWebhook.job_id).limit(limit))
    return [Registration(r.job_id, r.url, tuple(r.events_filter), r.base_url) for r in rows]

