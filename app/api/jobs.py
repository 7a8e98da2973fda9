"""/v1/jobs: submit, poll, list, cancel, and stream a job's events."""
from __future__ import annotations

import json
import logging
import time

from flask import Blueprint, Response, jsonify, request, url_for
from redis.exceptions import RedisError

from app.api.admission import admit, claim_idempotency, complete_idempotency, max_active_jobs, refused
from app.api.auth import current_owner
from app.api.request_parsing import (
    decode_cursor,
    encode_cursor,
    int_arg,
    json_object_body,
    last_event_id,
    preferred_wait,
)
from app.api.services import services
from app.api.sse import stream_job_events
from app.api.webhooks import check_submission as check_webhook
from app.api.webhooks import register as register_webhook
from app.infra.broker import send_run_job
from app.infra.problems import Problem
from app.jobs import store, transitions
from app.jobs.event_log import EventId, JobEvent
from app.api.job_request import JobCreate
from app.jobs.models import ALL_STATUSES, Job, JobStatus
from app.jobs.serialization import done_event_data, job_to_dict
from app.jobs.store import CancelOutcome, JobResult, SubmissionRefused
from app.tenancy.idempotency import ClaimState

log = logging.getLogger(__name__)

bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")

CANCEL_WAIT_SECONDS = 10.0


def _base_url() -> str:
    return request.host_url


def _job_response(job: Job, status: int, **headers: str) -> Response:
    response = jsonify(job_to_dict(job, _base_url()))
    response.status_code = status
    for name, value in headers.items():
        response.headers[name.replace("_", "-")] = value
    return response


def _find(job_id: str) -> Job:
    with services().sessions() as session:
        job = store.get_job(session, job_id, current_owner())
    if job is None:
        raise Problem(404, f"no job with id {job_id!r}", title="Job not found", type="job-not-found")
    return job


def _wait_for_done(pubsub, seconds: float) -> bool:
    """True once the job's `done` event arrives within `seconds`; False on timeout or if Redis
    fails meanwhile (the caller then answers with the job as the database has it)."""
    deadline = time.monotonic() + seconds
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            message = pubsub.get_message(ignore_subscribe_messages=True, timeout=min(remaining, 1.0))
            if message is not None and JobEvent.from_message(message["data"]).is_done:
                return True
    except RedisError:
        log.warning("lost the event channel while waiting for a job", exc_info=True)
    return False


@bp.post("")
def create_job():
    body = json_object_body()
    spec = JobCreate.model_validate(body)
    svc = services()
    model = spec.model or svc.settings.model_name
    if model != svc.settings.model_name:
        raise Problem(422, f"unknown model {model!r}: this service serves {svc.settings.model_name!r}",
                      title="Unknown model", type="unknown-model")
    check_webhook(spec, svc.settings)
    claim = claim_idempotency(body)
    if claim is not None and claim.state is ClaimState.REPLAY:
        return _job_response(_find(claim.job_id), 202, Idempotent_Replayed="true",
                             Location=url_for("jobs.get_job", job_id=claim.job_id, _external=True))
    admit(spec)
    try:
        with svc.sessions.begin() as session:
            # The insert itself checks the key's active jobs and that the key is live (the key may
            # come from the API's short-lived cache: app/api/auth.py).
            job = store.create_job(session, owner=current_owner(), model=model, priority=spec.priority,
                                   input=spec.stored_input(), metadata=spec.metadata,
                                   max_active=max_active_jobs(), live_key=True)
            register_webhook(session, job.id, spec)
    except SubmissionRefused as refusal:
        raise refused(refusal) from None
    complete_idempotency(job.id)
    wait = preferred_wait()
    pubsub = None
    try:
        try:
            if wait:
                pubsub = svc.redis.pubsub()
                pubsub.subscribe(svc.channels.job_live(job.id))   # before the task exists: nothing is missed
            send_run_job(svc.celery, svc.settings, job.id, spec.priority)
        except Exception as exc:
            # The job is committed: it waits in the database and a worker's reconciler sends its
            # task once the broker is back (docs/reliability.md). Accepted, and the answer says so.
            log.warning("could not enqueue job %s (%s: %s); it waits in the database", job.id,
                        type(exc).__name__, exc)
            transitions.emit("created", job.id)
            return _deferred_response(job)
        transitions.emit("created", job.id)
        headers = {"Location": url_for("jobs.get_job", job_id=job.id, _external=True)}
        if wait is None:
            return _job_response(job, 202, **headers)
        headers["Preference-Applied"] = f"wait={wait}"
        if _wait_for_done(pubsub, wait):
            job = _find(job.id)
        return _job_response(job, 201 if JobStatus(job.status).is_final else 202, **headers)
    finally:
        if pubsub is not None:
            pubsub.close()


def _deferred_response(job: Job) -> Response:
    body = job_to_dict(job, _base_url())
    body["queue"] = {"status": "deferred", "detail": "the queue (Redis) is unreachable: the job is stored and "
                     "will be queued automatically once it is back"}
    response = jsonify(body)
    response.status_code = 202
    response.headers["Location"] = url_for("jobs.get_job", job_id=job.id, _external=True)
    response.headers["Genq-Enqueue"] = "deferred"
    return response


@bp.get("")
def list_jobs():
    status = request.args.get("status") or None
    if status is not None and status not in ALL_STATUSES:
        raise Problem(400, f"status must be one of {', '.join(ALL_STATUSES)}; got {status!r}",
                      title="Invalid status filter")
    limit = int_arg("limit", 20, 1, 100)
    cursor = request.args.get("cursor") or None
    before = decode_cursor(cursor) if cursor else None
    with services().sessions() as session:
        page = store.list_jobs(session, current_owner(), status=status, limit=limit + 1, before=before)
    more = len(page) > limit
    page = page[:limit]
    next_cursor = encode_cursor(page[-1].id) if more else None
    next_url = None
    if next_cursor:
        args = {"limit": limit, "cursor": next_cursor, **({"status": status} if status else {})}
        next_url = url_for("jobs.list_jobs", _external=True, **args)
    return jsonify({"data": [job_to_dict(job, _base_url()) for job in page],
                    "next_cursor": next_cursor, "next": next_url})


@bp.get("/<job_id>")
def get_job(job_id: str):
    return _job_response(_find(job_id), 200)


@bp.post("/<job_id>/cancel")
def cancel_job(job_id: str):
    svc = services()
    pubsub = svc.redis.pubsub()
    pubsub.subscribe(svc.channels.job_live(job_id))
    try:
        with svc.sessions.begin() as session:
            outcome = store.cancel_job(session, job_id, current_owner())
        if outcome is CancelOutcome.NOT_FOUND:
            raise Problem(404, f"no job with id {job_id!r}", title="Job not found", type="job-not-found")
        if outcome is CancelOutcome.ALREADY_FINAL:
            job = _find(job_id)
            raise Problem(409, f"job {job_id} already finished with status {job.status!r}; only queued or "
                          "running jobs can be canceled", title="Job already finished", type="job-finished",
                          job_status=job.status)
        if outcome is CancelOutcome.CANCELED:
            job = _find(job_id)
            _announce_canceled_while_queued(job)
            return _job_response(job, 200)
        svc.redis.publish(svc.channels.control, json.dumps({"type": "cancel", "job_id": job_id}))
        stopped = _wait_for_done(pubsub, CANCEL_WAIT_SECONDS)
        job = _find(job_id)
        return _job_response(job, 200 if stopped or JobStatus(job.status).is_final else 202)
    finally:
        pubsub.close()


def _announce_canceled_while_queued(job: Job) -> None:
    """No worker saw this job: the API writes its event log (attempt 0) itself."""
    svc = services()
    result = JobResult(JobStatus.CANCELED, output_text="", finish_reason="abort", completion_tokens=0)
    events = [JobEvent(EventId(0, 1), "status", {"status": "canceled"}),
              JobEvent(EventId(0, 2), "done", done_event_data(result))]
    try:
        svc.events.publish(job.id, events)
    except Exception:
        log.exception("could not publish the cancel events of job %s", job.id)
    transitions.emit("completed", job.id, status="canceled")


@bp.get("/<job_id>/events")
def job_events(job_id: str):
    job = _find(job_id)
    after = last_event_id()
    return Response(stream_job_events(services(), job.id, current_owner(), after),
                    mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
