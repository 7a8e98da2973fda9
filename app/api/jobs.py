"""/v1/jobs: submit, poll, list, cancel, and stream a job's events."""
from __future__ import annotations


from flask import Blueprint, Response, jsonify, request, url_for

from app.api.admission import admission, claim_idempotency, complete_idempotency, refused
from app.api.auth import current_key, current_owner
from app.api.job_request import JobCreate
from app.api.request_parsing import (
    decode_cursor,
    encode_cursor,
    int_arg,
    json_object_body,
    last_event_id,
    preferred_wait,
)
from app.api.services import services
from app.api.sse import sse_stream
from app.api.webhooks import check_submission as check_webhook
from app.api.webhooks import register as register_webhook
from app.infra.problems import Problem
from app.jobs import store
from app.jobs.cancel import cancel
from app.jobs.follow import close_quietly, wait_for_final
from app.jobs.models import ALL_STATUSES, Job, JobStatus
from app.jobs.serialization import job_to_dict
from app.jobs.store import CancelOutcome, SubmissionRefused
from app.jobs.submit import Submission, UnknownModel, served_model, submit
from app.tenancy.idempotency import ClaimState

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


def find_job(job_id: str) -> Job:
    """The calling key's job `job_id`, or a 404 Problem (another key's job is as missing)."""
    with services().sessions() as session:
        job = store.get_job(session, job_id, current_owner())
    if job is None:
        raise Problem(404, f"no job with id {job_id!r}", title="Job not found", type="job-not-found")
    return job


@bp.post("")
def create_job():
    body = json_object_body()
    spec = JobCreate.model_validate(body)
    svc = services()
    try:
        served_model(svc.settings, spec.model)
    except UnknownModel as exc:
        raise Problem(422, str(exc), title="Unknown model", type="unknown-model") from None
    check_webhook(spec, svc.settings)
    claim = claim_idempotency(body)
    if claim is not None and claim.state is ClaimState.REPLAY:
        return _job_response(find_job(claim.job_id), 202, Idempotent_Replayed="true",
                             Location=url_for("jobs.get_job", job_id=claim.job_id, _external=True))
    wait = preferred_wait()
    submission = Submission(key=current_key(), model=spec.model, input=spec.stored_input(), priority=spec.priority,
                            metadata=spec.metadata, service_tier=spec.service_tier)
    try:
        submitted = submit(svc, admission(), submission, wait=bool(wait),
                           in_transaction=lambda session, job: register_webhook(session, job.id, spec))
    except SubmissionRefused as refusal:
        raise refused(refusal) from None
    job = submitted.job
    try:
        complete_idempotency(job.id)
        if submitted.deferred:
            # The job is committed: a worker's reconciler sends its task once the broker is back
            # (docs/reliability.md). Accepted, and the answer says so.
            return _deferred_response(job)
        headers = {"Location": url_for("jobs.get_job", job_id=job.id, _external=True)}
        if wait is None:
            return _job_response(job, 202, **headers)
        headers["Preference-Applied"] = f"wait={wait}"
        job = wait_for_final(svc, submitted.pubsub, job.id, job.owner, wait, poll_database=False) or job
        return _job_response(job, 201 if JobStatus(job.status).is_final else 202, **headers)
    finally:
        submitted.close()


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
    return _job_response(find_job(job_id), 200)


@bp.post("/<job_id>/cancel")
def cancel_job(job_id: str):
    svc = services()
    pubsub = svc.redis.pubsub()
    pubsub.subscribe(svc.channels.job_live(job_id))   # before the cancel: its `done` event cannot be missed
    try:
        outcome = cancel(svc, job_id, current_owner())
        if outcome is CancelOutcome.NOT_FOUND:
            raise Problem(404, f"no job with id {job_id!r}", title="Job not found", type="job-not-found")
        if outcome is CancelOutcome.ALREADY_FINAL:
            job = find_job(job_id)
            raise Problem(409, f"job {job_id} already finished with status {job.status!r}; only queued or "
                          "running jobs can be canceled", title="Job already finished", type="job-finished",
                          job_status=job.status)
        if outcome is CancelOutcome.CANCELED:
            return _job_response(find_job(job_id), 200)
        job = wait_for_final(svc, pubsub, job_id, current_owner(), CANCEL_WAIT_SECONDS,
                             poll_database=False) or find_job(job_id)
        return _job_response(job, 200 if JobStatus(job.status).is_final else 202)
    finally:
        close_quietly(pubsub)


@bp.get("/<job_id>/events")
def job_events(job_id: str):
    job = find_job(job_id)
    after = last_event_id()
    return Response(sse_stream(services(), job.id, current_owner(), after),
                    mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
