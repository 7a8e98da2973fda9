"""The reconciler: makes the database, not Redis, the record of which jobs still have to run.

Every worker runs one in a thread; a Redis lock lets one of them sweep per interval. A sweep sends
the task of every job that

- is `queued` and was created (a batch line: released) more than `requeue_after_seconds` ago: its
  task was lost (the API could not enqueue it while Redis was down, Redis restarted without it)
  or is still waiting behind a backlog (then the copy is harmless: the second delivery finds
  nothing to claim). A batch line not yet released has no task to lose: it waits for its turn;
- is `running` with an expired lease: its worker died (SIGKILL, OOM, lost machine), so nobody
  renews the lease and Celery would redeliver the task only after its visibility timeout.

It also tops batches up: a batch in progress with fewer than `batch_max_in_flight` lines in flight
and lines still held lost a release (the process that ended a line died before releasing the
next), so the sweep releases and sends them (`app.openai.batches.release_lines`, exact under concurrency).

The task itself decides what happens (`claim_job` is conditional, `job_runner` gives up after
`max_attempts`), so sending a task twice is always safe. Each job is sent at most once per
`requeue_after_seconds` (a Redis key per job), so a long backlog is not flooded with copies.

Other periodic recoveries ride along: `extra_sweeps` are called once per sweep, after the jobs
(the worker passes the webhook sweep, which re-sends overdue deliveries and writes missing
`job.completed` events); their errors are logged, never raised.
"""
from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta
from typing import Callable

from sqlalchemy import and_, func, or_, select

from app.infra.db import utcnow
from app.infra.problems import outage
from app.infra.retry import is_outage
from app.jobs.models import Job, JobStatus
from app.openai import batches

log = logging.getLogger(__name__)

SWEEP_LIMIT = 1000     # jobs re-sent per sweep at most; the next sweep takes the rest


def stale_jobs(session, *, requeue_after_seconds: float, now=None, limit: int = SWEEP_LIMIT) -> list[tuple[str, int]]:
    """(job id, priority) of jobs whose task must be sent again: queued too long, or running on an
    expired lease. Oldest first."""
    now = now or utcnow()
    # A batch line waits from its release; a line not released has no task yet (it is held).
    waited_too_long = and_(Job.status == JobStatus.QUEUED.value,
                           or_(Job.batch_id.is_(None), Job.released_at.is_not(None)),
                           func.coalesce(Job.released_at, Job.created_at) < now - timedelta(seconds=requeue_after_seconds))
    orphaned = and_(Job.status == JobStatus.RUNNING.value, Job.lease_expires_at < now)
    rows = session.execute(select(Job.id, Job.priority).where(or_(waited_too_long, orphaned))
                           .order_by(Job.id).limit(limit))
    return [(job_id, priority) for job_id, priority in rows]


class Reconciler:
    def __init__(self, settings, sessions, redis, channels, send: Callable[[str, int], None],
                 extra_sweeps: tuple[Callable[[], object], ...] = ()):
        self.settings = settings
        self.sessions = sessions
        self.redis = redis
        self.send = send                       # (job id, priority) -> enqueues genq.run_job
        self.extra_sweeps = extra_sweeps
        self._extras_due = 0.0                 # monotonic time of the next extra sweep
        self.lock_key = f"{channels.prefix}:reconciler:lock"
        self.mark_prefix = f"{channels.prefix}:reconciler:sent:"
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> "Reconciler":
        self._thread = threading.Thread(target=self._loop, name="genq-reconciler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5)

    def _loop(self) -> None:
        interval = self.settings.reconcile_interval_seconds
        while not self._stopping.wait(interval):
            try:
                self.sweep()
            except Exception as exc:
                # The thread outlives any failure: a database or Redis outage is one line per sweep,
                # anything else its traceback; the next sweep tries again.
                if is_outage(exc):
                    log.warning("reconciler sweep failed: %s unavailable (%s); retrying in %.1f s",
                                outage(exc).dependency, type(exc).__name__, interval)
                else:
                    log.warning("reconciler sweep failed (retrying in %.1f s)", interval, exc_info=True)

    def sweep(self, *, force: bool = False) -> int:
        """One pass; returns how many tasks it sent. Skipped when another worker holds the lock
        for this interval (unless `force`)."""
        lock_ms = max(int(self.settings.reconcile_interval_seconds * 900), 100)
        if not force and not self.redis.set(self.lock_key, "1", nx=True, px=lock_ms):
            return 0
        with self.sessions() as session:
            candidates = stale_jobs(session, requeue_after_seconds=self.settings.requeue_after_seconds)
        sent = 0
        mark_ms = max(int(self.settings.requeue_after_seconds * 1000), 100)
        for job_id, priority in candidates:
            if not self.redis.set(self.mark_prefix + job_id, "1", nx=True, px=mark_ms):
                continue   # sent recently; its task is still on its way
            self.send(job_id, priority)
            sent += 1
        if sent:
            log.warning("reconciler re-sent the tasks of %d stuck job(s)", sent)
        sent += self._top_up_batches()
        if self.extra_sweeps and time.monotonic() >= self._extras_due:
            # These scan more (e.g. a day of finished jobs): once per requeue period is enough.
            self._extras_due = time.monotonic() + self.settings.requeue_after_seconds
            self._run_extra_sweeps()
        return sent

    def _top_up_batches(self) -> int:
        cap = self.settings.batch_max_in_flight
        with self.sessions() as session:
            short = batches.batches_short_of_lines(session, cap)
        released = 0
        for batch_id in short:
            released += len(batches.release_and_send(self.sessions, batch_id, cap, self.send))
        if released:
            log.warning("reconciler released %d held line(s) of %d batch(es) short of lines in flight",
                        released, len(short))
        return released

    def _run_extra_sweeps(self) -> None:
        for fn in self.extra_sweeps:
            try:
                fn()
            except Exception as exc:
                if is_outage(exc):
                    # Retried by the next extra sweep, and sooner: whatever it was sweeping waits.
                    soon = time.monotonic() + self.settings.reconcile_interval_seconds
                    self._extras_due = min(self._extras_due, soon)
                    log.warning("reconciler sweep %s failed: %s unavailable (%s)", getattr(fn, "__name__", fn),
                                outage(exc).dependency, type(exc).__name__)
                else:
                    log.exception("reconciler sweep %r failed", fn)
