"""Webhook delivery: the job hook that turns transitions into events, the Celery task that POSTs
them (signed, retried with backoff, every attempt recorded), and a sweep for lost tasks.

- `WebhookDispatcher` is registered with `app.hooks` in the API and the worker. `started` and
  `completed` look the job's registration up on the calling (task) thread; `output` comes from the
  engine loop and only does dict lookups. Event rows are written and their tasks sent by one
  thread per process, in the order the transitions happened; `completed` waits for its own row.
- `deliver(event_id, attempt)` is one attempt: claim it, resolve the host once (refusing private
  addresses unless allowed), POST to that address, record the answer, schedule the next attempt.
- `sweep(...)` re-sends tasks of pending events that are overdue, and writes missing job.completed
  events of finished jobs; the reliability reconciler calls it periodically.

Nothing here touches the engine: a slow or failing receiver only costs a Celery thread.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

from app import webhook_store as store
from app.db import utcnow
from app.models import Job
from app.serialization import isoformat, job_to_dict
from app.webhooks import (EVENT_TYPES, OUTPUT_INTERVAL_SECONDS, TASK_DELIVER_WEBHOOK, WebhookTargetError,
                          payload_body, resolve_target, retry_delay, signed_headers, webhook_secret_for)

log = logging.getLogger(__name__)

ORDER_WAIT_SECONDS = 10.0          # a job's later event waits this long at most for an earlier first attempt
COMPLETED_WAIT_SECONDS = 10.0      # the completed hook waits this long for its row to be written
MAX_RESPONSE_BYTES = 64 * 1024
USER_AGENT = "genq-webhooks/1"
_MISSING = object()


def webhook_queue(settings) -> str:
    """The Celery queue of delivery tasks (workers consume it beside the jobs queue)."""
    return f"{settings.queue}.webhooks"


def send_delivery(celery, settings, event_id: str, attempt: int, countdown: float = 0.0) -> None:
    celery.send_task(TASK_DELIVER_WEBHOOK, args=[event_id, attempt], queue=webhook_queue(settings),
                     countdown=countdown or None)


# -- events --------------------------------------------------------------------------------------------

@dataclass(slots=True)
class _Pending:
    event_type: str
    registration: store.Registration
    data: dict
    written: threading.Event


class WebhookDispatcher:
    """The `app.hooks` hook: job transitions -> event rows -> delivery tasks."""

    def __init__(self, settings, sessions, celery):
        self.settings = settings
        self.sessions = sessions
        self.celery = celery
        self._registrations: dict[str, store.Registration | None] = {}   # jobs started in this process
        self._outputs: dict[str, list] = {}       # job id -> [last output monotonic time, job snapshot]
        self._inbox: queue.SimpleQueue[_Pending] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __call__(self, event: str, job_id: str, details: dict) -> None:
        if event == "output":
            self._on_output(job_id, details.get("text") or "")
        elif event == "started":
            self._on_started(job_id)
        elif event == "completed":
            self._on_completed(job_id)
        elif event == "released":   # unfinished here: whoever finishes it sends its completed event
            self._outputs.pop(job_id, None)
            self._registrations.pop(job_id, None)

    def _on_started(self, job_id: str) -> None:
        with self.sessions() as session:
            registration = store.registration(session, job_id)
            # the job's snapshot only when an event of this start needs it (most want `completed` only)
            wanted = registration is not None and (registration.wants("start") or registration.wants("output"))
            job = session.get(Job, job_id) if wanted else None
            data = job_to_dict(job, registration.base_url) if job is not None else None
        self._registrations[job_id] = registration
        if data is None:
            return
        if registration.wants("output"):
            self._outputs[job_id] = [float("-inf"), data]
        if registration.wants("start"):
            self._submit("job.started", registration, data)

    def _on_output(self, job_id: str, text: str) -> None:
        """On the engine loop: two dict lookups, and at most every 500 ms per job a queue put."""
        state = self._outputs.get(job_id)
        if state is None:
            return
        now = time.monotonic()
        if now - state[0] < OUTPUT_INTERVAL_SECONDS:
            return
        state[0] = now
        data = {**state[1], "output": {**state[1]["output"], "text": text}}
        self._submit("job.output", self._registrations[job_id], data)

    def _on_completed(self, job_id: str) -> None:
        self._outputs.pop(job_id, None)
        registration = self._registrations.pop(job_id, _MISSING)
        with self.sessions() as session:
            if registration is _MISSING:   # started in another process, or canceled while queued
                registration = store.registration(session, job_id)
            if registration is None or not registration.wants("completed"):
                return
            job = session.get(Job, job_id)
            data = job_to_dict(job, registration.base_url)
        pending = self._submit("job.completed", registration, data)
        if not pending.written.wait(COMPLETED_WAIT_SECONDS):
            log.warning("job %s: the job.completed webhook event is not written yet", job_id)

    def _submit(self, event_type: str, registration, data: dict) -> _Pending:
        pending = _Pending(event_type, registration, data, threading.Event())
        self._inbox.put(pending)
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="genq-webhook-events", daemon=True)
                    self._thread.start()
        return pending

    def _run(self) -> None:
        while True:
            pending = self._inbox.get()
            try:
                write_event(self.sessions, self.celery, self.settings, pending.event_type, pending.registration,
                            pending.data)
            except Exception:
                log.exception("job %s: could not write the %s webhook event", pending.registration.job_id,
                              pending.event_type)
            finally:
                pending.written.set()


def write_event(sessions, celery, settings, event_type: str, registration: store.Registration,
                data: dict) -> str | None:
    """Write the event row, then send its first delivery task; the row's id (None: a duplicate of a
    once-per-job event). A failed send leaves the row pending for `sweep`."""
    body = payload_body(event_type, isoformat(utcnow()), data)
    event_id = store.create_event(sessions, registration.job_id, event_type, registration.url, body)
    if event_id is None:
        log.info("job %s: %s webhook event exists already", registration.job_id, event_type)
        return None
    try:
        send_delivery(celery, settings, event_id, 1)
    except Exception:
        log.exception("job %s: could not send the %s webhook task (the sweep re-sends it)",
                      registration.job_id, event_type)
    return event_id


_dispatchers: dict[tuple, WebhookDispatcher] = {}
_dispatchers_lock = threading.Lock()


def dispatcher_for(settings, sessions, celery) -> WebhookDispatcher:
    """One dispatcher per deployment per process (`create_app` may run several times in a process)."""
    key = (settings.database_url, settings.redis_url, settings.key_prefix, settings.queue)
    with _dispatchers_lock:
        if key not in _dispatchers:
            _dispatchers[key] = WebhookDispatcher(settings, sessions, celery)
        return _dispatchers[key]


# -- delivery ------------------------------------------------------------------------------------------

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
    (or in flight) and does nothing. Returns what happened (delivered, retry, failed, skipped)."""
    with sessions() as session:
        event = store.get_event(session, event_id)
        if event is None or event.status != store.PENDING or event.attempts != attempt - 1:
            return "skipped"
        secret = webhook_secret_for(session.get(Job, event.job_id), settings, session)
        session.expunge_all()
    if attempt == 1:
        _wait_for_earlier_events(sessions, event)
    lock_seconds = settings.webhook_timeout_seconds * 2 + 30
    with sessions.begin() as session:
        if not store.claim_attempt(session, event_id, attempt, lock_seconds):
            return "skipped"
    started_at, clock = utcnow(), time.monotonic()
    if not secret:
        answer = Answer(error="no webhook secret: the job has no API key and GENQ_WEBHOOK_SECRET is unset")
    else:
        body = event.payload.encode()
        answer = post(event.url, body, signed_headers(secret, f"msg_{event.id}", body),
                      timeout=settings.webhook_timeout_seconds, allow_private=settings.webhook_allow_private)
    duration = time.monotonic() - clock
    delay = None
    if answer.status_code is not None and 200 <= answer.status_code < 300:
        status = store.DELIVERED
    elif answer.status_code == 410:
        status, answer.error = store.FAILED, answer.error or "410 Gone: the receiver asked for no more deliveries"
    else:
        delay = retry_delay(settings.webhook_retry_schedule, attempt, settings.webhook_retry_jitter,
                            answer.retry_after)
        status = store.FAILED if delay is None else store.PENDING
    next_attempt_at = None if delay is None else utcnow() + timedelta(seconds=delay)
    with sessions.begin() as session:
        store.record_attempt(session, event_id, attempt, started_at=started_at, duration=duration,
                             status_code=answer.status_code, error=answer.error, status=status,
                             next_attempt_at=next_attempt_at)
    if delay is not None:
        try:
            send_delivery(celery, settings, event_id, attempt + 1, countdown=delay)
        except Exception:
            log.exception("webhook event %s: could not schedule attempt %d (the sweep re-sends it)", event_id,
                          attempt + 1)
        return "retry"
    if status == store.FAILED:
        log.warning("webhook event %s (%s, job %s) failed after %d attempt(s): %s", event_id, event.type,
                    event.job_id, attempt, answer.error or answer.status_code)
    return status


def _wait_for_earlier_events(sessions, event) -> None:
    """A job's events go out in order: hold this one while an earlier one awaits its first answer."""
    deadline = time.monotonic() + ORDER_WAIT_SECONDS
    while time.monotonic() < deadline:
        with sessions() as session:
            if not store.untried_earlier(session, event):
                return
        time.sleep(0.05)


def deliver_in_worker(event_id: str, attempt: int) -> str:
    """The Celery task's body in a `genq worker` process."""
    from celery import current_app

    from worker.runtime import get_runtime

    runtime = get_runtime()
    return deliver(runtime.settings, runtime.sessions, current_app, event_id, attempt)


# -- sweep ---------------------------------------------------------------------------------------------

def sweep(settings, sessions, celery, *, grace_seconds: float = 60.0, lookback_seconds: float = 24 * 3600,
          now=None) -> int:
    """Re-send what a crash or an outage lost; returns how many tasks it sent. Safe to run from
    several processes at once (attempts are claimed; once-per-job events are unique).

    - finished jobs (within `lookback_seconds`, at least `grace_seconds` ago) that asked for
      `completed` but have no job.completed event get one;
    - pending events whose next attempt is overdue by `grace_seconds` and not in flight get their
      task sent again.
    """
    now = now or utcnow()
    sent = 0
    with sessions() as session:
        missing = store.finished_without_completed_event(session, now - timedelta(seconds=lookback_seconds),
                                                         now - timedelta(seconds=grace_seconds))
        payloads = [(registration, job_to_dict(session.get(Job, registration.job_id), registration.base_url))
                    for registration in missing]
    for registration, data in payloads:
        if write_event(sessions, celery, settings, "job.completed", registration, data) is not None:
            sent += 1
    with sessions() as session:
        due = store.due_events(session, now - timedelta(seconds=grace_seconds), now)
    for event_id, attempt in due:
        try:
            send_delivery(celery, settings, event_id, attempt)
            sent += 1
        except Exception:
            log.exception("sweep: could not send webhook event %s", event_id)
    return sent


__all__ = ["EVENT_TYPES", "WebhookDispatcher", "dispatcher_for", "deliver", "deliver_in_worker", "post", "sweep",
           "send_delivery", "webhook_queue", "write_event"]
