"""The job-transition hook that turns transitions into webhook events.

`WebhookDispatcher` is registered with `app.jobs.transitions` in the API and the worker. `started`
and `completed` look the job's registration up on the calling (task) thread; `output` comes from the
engine loop and only does dict lookups. Event rows are written and their tasks sent by one thread
per process, in the order the transitions happened; `completed` waits for its own row.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

from app.infra.broker import send_delivery
from app.infra.db import utcnow
from app.infra.retry import retry_outage
from app.jobs.models import Job
from app.jobs.serialization import isoformat, job_to_dict
from app.webhooks import store
from app.webhooks.payloads import OUTPUT_INTERVAL_SECONDS, payload_body

log = logging.getLogger(__name__)
COMPLETED_WAIT_SECONDS = 10.0      # the completed hook waits this long for its row to be written
DB_RETRY_SECONDS = 10.0            # an event's read or write retries through a database outage this long
_MISSING = object()


@dataclass(slots=True)
class _Pending:
    event_type: str
    registration: store.Registration
    data: dict
    written: threading.Event


class WebhookDispatcher:
    """The job-transition hook (`app.jobs.transitions`): job transitions -> event rows -> delivery tasks."""

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
        known = self._registrations.pop(job_id, _MISSING)

        def load():
            with self.sessions() as session:
                registration = known
                if registration is _MISSING:   # started in another process, or canceled while queued
                    registration = store.registration(session, job_id)
                if registration is None or not registration.wants("completed"):
                    return None
                return registration, job_to_dict(session.get(Job, job_id), registration.base_url)

        # (Should the database stay down, the sweep writes the event later: finished_without_completed_event.)
        loaded = retry_outage(load, what=f"job {job_id}: the job.completed webhook event", seconds=DB_RETRY_SECONDS)
        if loaded is None:
            return
        registration, data = loaded
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
                retry_outage(lambda: write_event(self.sessions, self.celery, self.settings, pending.event_type,
                                                 pending.registration, pending.data),
                             what=f"job {pending.registration.job_id}: writing its {pending.event_type} webhook event",
                             seconds=DB_RETRY_SECONDS)
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
