"""One delivery attempt of a webhook event: claim it, resolve the host once (refusing private
addresses unless allowed), POST to that address, record the answer, schedule the next attempt.

Nothing here touches the engine: a slow or failing receiver only costs a Celery thread.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from datetime import timedelta
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

from app.infra.broker import send_delivery
from app.infra.db import utcnow
from app.infra.retry import is_outage, retry_outage
from app.jobs.models import Job
from app.tenancy.keys import webhook_secret_of_owner
from app.webhooks import store
from app.webhooks.signing import signed_headers
from app.webhooks.targets import WebhookTargetError, resolve_target

log = logging.getLogger(__name__)
ORDER_WAIT_SECONDS = 10.0          # a job's later event waits this long at most for an earlier first attempt
MAX_RESPONSE_BYTES = 64 * 1024
USER_AGENT = "genq-webhooks/1"
DB_RETRY_SECONDS = 15.0            # a delivery's database step retries through an outage this long


@dataclass(slots=True)
class Answer:
    status_code: int | None = None
    error: str | None = None
    retry_after: float | None = None


def post(url: str, body: bytes, headers: dict[str, str], *, timeout: float, allow_private: bool) -> Answer:
    """One POST, redirects not followed, to the address the host resolved to just now."""
    import urllib3
    from urllib3.connection import HTTPConnection, HTTPSConnection

    try:
        host, port, addresses = resolve_target(url, allow_private)
    except WebhookTargetError as exc:
        return Answer(error=f"refused: {exc}")
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if parts.scheme == "https":
        connection = HTTPSConnection(addresses[0], port, timeout=timeout, server_hostname=host,
                                     assert_hostname=host)
    else:
        connection = HTTPConnection(addresses[0], port, timeout=timeout)
    try:
        connection.request("POST", target, body=body, headers={
            "Host": parts.netloc, "Content-Type": "application/json", "User-Agent": USER_AGENT, **headers})
        response = connection.getresponse()
        response.read(MAX_RESPONSE_BYTES, decode_content=False)
        answer = Answer(status_code=response.status)
        if response.status in (429, 503):
            answer.retry_after = _retry_after(response.headers.get("Retry-After"))
        if 300 <= response.status < 400:
            answer.error = f"redirect not followed (Location: {response.headers.get('Location')})"
        return answer
    except (OSError, urllib3.exceptions.HTTPError) as exc:
        return Answer(error=f"{type(exc).__name__}: {exc}"[:1000])
    finally:
        connection.close()


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        return max((parsedate_to_datetime(value) - utcnow()).total_seconds(), 0.0)
    except (TypeError, ValueError):
        return None


def deliver(settings, sessions, celery, event_id: str, attempt: int) -> str:
    """Attempt `attempt` of one event. Idempotent: a stale or duplicated task finds the attempt made
    (or in flight) and does nothing. Returns what happened (delivered, retry, failed, skipped).

    Each database step retries through a short outage (`app.infra.retry`); a longer one raises, and
    the event, still pending, is the webhook sweep's to re-send (`app/webhooks/sweep.py`)."""
    def load():
        with sessions() as session:
            event = store.get_event(session, event_id)
            if event is None or event.status != store.PENDING or event.attempts != attempt - 1:
                return None
            secret = webhook_secret_for(session.get(Job, event.job_id), settings, session)
            session.expunge_all()
            return event, secret

    loaded = retry_outage(load, what=f"webhook event {event_id}: load", seconds=DB_RETRY_SECONDS)
    if loaded is None:
        return "skipped"
    event, secret = loaded
    if attempt == 1:
        _wait_for_earlier_events(sessions, event)
    lock_seconds = settings.webhook_timeout_seconds * 2 + 30
    if not _claim(sessions, event_id, attempt, lock_seconds):
        return "skipped"
    started_at, clock = utcnow(), time.monotonic()
    answer = _attempt(settings, event, secret)
    duration = time.monotonic() - clock
    status, delay = _outcome(settings, answer, attempt)
    next_attempt_at = None if delay is None else utcnow() + timedelta(seconds=delay)
    _record(sessions, event_id, attempt, started_at=started_at, duration=duration, status_code=answer.status_code,
            error=answer.error, status=status, next_attempt_at=next_attempt_at)
    if delay is not None:
        _schedule(settings, celery, event_id, attempt + 1, delay)
        return "retry"
    if status == store.FAILED:
        log.warning("webhook event %s (%s, job %s) failed after %d attempt(s): %s", event_id, event.type,
                    event.job_id, attempt, answer.error or answer.status_code)
    return status


def _claim(sessions, event_id: str, attempt: int, lock_seconds: float) -> bool:
    """`store.claim_attempt`, retried through an outage; a try whose commit went through although
    the error came back is recognised by the lock it wrote."""
    unknown: list = []   # the lock ends that failed tries may have written

    def claim() -> bool:
        now = utcnow()
        try:
            with sessions.begin() as session:
                if store.claim_attempt(session, event_id, attempt, lock_seconds, now=now):
                    return True
                return store.attempt_locked_until(session, event_id, attempt,
                                                  [t + timedelta(seconds=lock_seconds) for t in unknown])
        except Exception:
            unknown.append(now)
            raise

    return retry_outage(claim, what=f"webhook event {event_id}: claim attempt {attempt}", seconds=DB_RETRY_SECONDS)


def _record(sessions, event_id: str, attempt: int, **outcome) -> None:
    """`store.record_attempt`, retried through an outage (once: a try whose commit went through
    although the error came back recorded it). Should the database stay down, the event stays
    locked and pending; once the lock ends the sweep sends the attempt again (the same webhook-id)."""
    tried = False

    def record() -> None:
        nonlocal tried
        try:
            with sessions.begin() as session:
                if tried and store.attempt_recorded(session, event_id, attempt):
                    return
                store.record_attempt(session, event_id, attempt, **outcome)
        except Exception:
            tried = True
            raise

    retry_outage(record, what=f"webhook event {event_id}: record attempt {attempt}", seconds=DB_RETRY_SECONDS)


def _attempt(settings, event, secret: str | None) -> Answer:
    if not secret:
        return Answer(error="no webhook secret: the job has no API key and GENQ_WEBHOOK_SECRET is unset")
    body = event.payload.encode()
    return post(event.url, body, signed_headers(secret, f"msg_{event.id}", body),
                timeout=settings.webhook_timeout_seconds, allow_private=settings.webhook_allow_private)


def _outcome(settings, answer: Answer, attempt: int) -> tuple[str, float | None]:
    """(the event's new status, seconds until the next attempt or None)."""
    if answer.status_code is not None and 200 <= answer.status_code < 300:
        return store.DELIVERED, None
    if answer.status_code == 410:
        answer.error = answer.error or "410 Gone: the receiver asked for no more deliveries"
        return store.FAILED, None
    delay = retry_delay(settings.webhook_retry_schedule, attempt, settings.webhook_retry_jitter, answer.retry_after)
    return (store.FAILED, None) if delay is None else (store.PENDING, delay)


def _schedule(settings, celery, event_id: str, attempt: int, delay: float) -> None:
    try:
        send_delivery(celery, settings, event_id, attempt, countdown=delay)
    except Exception:
        log.exception("webhook event %s: could not schedule attempt %d (the sweep re-sends it)", event_id, attempt)


def _wait_for_earlier_events(sessions, event) -> None:
    """A job's events go out in order: hold this one while an earlier one awaits its first answer."""
    deadline = time.monotonic() + ORDER_WAIT_SECONDS
    while time.monotonic() < deadline:
        try:
            with sessions() as session:
                if not store.untried_earlier(session, event):
                    return
        except Exception as exc:
            if not is_outage(exc):
                raise
            time.sleep(0.5)   # the claim that follows retries (or gives up) through the outage
        time.sleep(0.05)


def webhook_secret_for(job, settings, session=None) -> str | None:
    """The secret a job's deliveries are signed with: the webhook secret of the API key that owns
    the job (`genq keys create` shows it), else the deployment's `GENQ_WEBHOOK_SECRET` (jobs
    without an owner)."""
    if job is not None and job.owner is not None and session is not None:
        secret = webhook_secret_of_owner(session, job.owner)
        if secret:
            return secret
    return settings.webhook_secret


def retry_delay(schedule, attempt: int, jitter: float, retry_after: float | None = None) -> float | None:
    """Seconds to wait before attempt `attempt + 1` after attempt `attempt` failed; None when the
    schedule is spent. Jitter spreads each delay over ±`jitter` of itself; a receiver's
    `Retry-After` is honoured (never waiting less), up to the schedule's longest delay."""
    if attempt >= len(schedule):
        return None
    delay = float(schedule[attempt])
    if jitter and delay > 0:
        delay *= random.uniform(1.0 - jitter, 1.0 + jitter)
    if retry_after is not None:
        delay = max(delay, min(retry_after, max(schedule)))
    return delay
