"""The one submit path (`POST /v1/jobs`, `/v1/completions`, `/v1/chat/completions`; batch lines are
inserted held by the batch itself, app/openai/batches.py):

    the model is the served one -> admission (key quotas, context, load) -> INSERT, checking the
    key is live and under its active-jobs limit in the same statement -> subscribe to the job's
    events if the caller waits -> send its task (or leave it for the reconciler) -> `created`

Callers check the model first with `served_model` (before their own checks, as the API always
did); `submit` checks it again. A job is committed before its task is sent. When the broker is
unreachable the job waits in the database and a worker's reconciler sends its task later, unless
the caller cannot wait for that (`fail_unqueued=True`: the job is failed and `EnqueueFailed` raised).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from sqlalchemy.orm import Session

from app.infra.broker import announce_queued, send_run_job
from app.infra.settings import Settings
from app.jobs import store, transitions
from app.jobs.connections import Connections
from app.jobs.follow import close_quietly, subscribe
from app.jobs.models import SERVICE_TIERS, Job
from app.tenancy.admission import Admission
from app.tenancy.keys import KeyIdentity

log = logging.getLogger(__name__)

class UnknownModel(Exception):
    def __init__(self, model: str, served: str):
        super().__init__(f"unknown model {model!r}: this service serves {served!r}")
        self.model = model
        self.served = served


class EnqueueFailed(Exception):
    """The job's task could not be sent and the caller could not wait: the job is failed."""


@dataclass(frozen=True, slots=True)
class Submission:
    key: KeyIdentity                 # the caller: owner of the job, and whose quotas apply
    model: str | None                # None: the served model
    input: dict                      # the job's input (`GenerationInput.stored()` form)
    priority: int = 0
    metadata: dict | None = None
    service_tier: str = "default"    # the lane (SERVICE_TIERS): "default" or "flex"


@dataclass(slots=True)
class Submitted:
    job: Job
    deferred: bool                   # stored, but its task waits for the broker (the reconciler sends it)
    pubsub: object | None = None     # subscribed to the job's events when the caller waits (close it)

    def close(self) -> None:
        close_quietly(self.pubsub)


def served_model(settings: Settings, model: str | None) -> str:
    """The model a job asks for (None: the served one); `UnknownModel` when this service does not serve it."""
    model = model or settings.model_name
    if model != settings.model_name:
        raise UnknownModel(model, settings.model_name)
    return model


def submit(conn: Connections, admission: Admission, submission: Submission, *, wait: bool = False,
           fail_unqueued: bool = False, in_transaction: Callable[[Session, Job], None] | None = None) -> Submitted:
    """Create and enqueue a job. Raises `UnknownModel`, a `Problem` (admission),
    `store.SubmissionRefused` (revoked key, too many active jobs) or `EnqueueFailed`.
    `in_transaction(session, job)` writes what belongs with the job (its webhook registration)."""
    model = served_model(conn.settings, submission.model)
    key = submission.key
    admission.check(key, submission.input)
    with conn.sessions.begin() as session:
        # The insert itself checks the key's active jobs and that the key is live (the key may come
        # from the API's short-lived cache).
        job = store.create_job(session, owner=key.id, model=model, priority=submission.priority,
                               lane=SERVICE_TIERS[submission.service_tier],
                               input=submission.input, metadata=submission.metadata,
                               max_active=admission.max_active_jobs(key), live_key=True)
        if in_transaction is not None:
            in_transaction(session, job)
    submitted = Submitted(job, deferred=False, pubsub=subscribe(conn, job.id) if wait else None)
    try:
        send_run_job(conn.celery, conn.settings, job.id, job.priority)
    except Exception as error:
        if fail_unqueued:
            log.exception("could not enqueue job %s", job.id)
            submitted.close()
            with conn.sessions.begin() as session:
                store.fail_unqueued(session, job.id, "enqueue_failed", f"{type(error).__name__}: {error}")
            raise EnqueueFailed(f"the job's task could not be sent ({type(error).__name__})") from error
        log.warning("could not enqueue job %s (%s: %s); it waits in the database", job.id, type(error).__name__,
                    error)
        submitted.deferred = True
    else:
        _announce(conn, job)
    transitions.emit("created", job.id)
    return submitted


def _announce(conn: Connections, job: Job) -> None:
    """With fair scheduling, wake the workers' newcomer reserves (`announce_queued`); best effort."""
    if not conn.settings.newcomer_reserve:
        return
    try:
        announce_queued(conn.redis, conn.channels, job.owner)
    except Exception as error:   # the task is sent: the job runs either way
        log.debug("could not announce job %s (%s)", job.id, error)

