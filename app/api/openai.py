"""OpenAI-compatible endpoints: /v1/models, /v1/completions, /v1/chat/completions.

Every request is a genq job (visible in `GET /v1/jobs`) at interactive priority. A plain request
waits for the job's `done` event and answers with the finished completion (with the broker down, the
job waits in the database for the reconciler and the request waits for it); `stream: true` follows
the job's event log and turns its token events into OpenAI chunks (`data: {...}` ... `data: [DONE]`).
Errors here are in OpenAI's shape, {"error": {"message", "type", "param", "code"}}; so is a
dependency outage (`503` + `Retry-After`, code `database_unavailable` / `redis_unavailable`).
"""
from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Response, jsonify, request

from app.api.admission import admission, refused
from app.api.auth import current_key
from app.api.services import services
from app.infra.problems import OUTAGE_RETRY_AFTER_SECONDS, Problem, Unavailable
from app.jobs.follow import wait_for_final
from app.jobs.models import JobStatus
from app.jobs.store import SubmissionRefused
from app.jobs.submit import EnqueueFailed, Submission, UnknownModel, served_model, submit
from app.openai import formats as fmt
from app.openai.stream import completion_stream

bp = Blueprint("openai", __name__, url_prefix="/v1")

REQUEST_TIMEOUT_SECONDS = 600.0   # a non-streamed request waits this long for its job
_STARTED = int(time.time())


@bp.errorhandler(fmt.OpenAIError)
def openai_error_response(exc: fmt.OpenAIError) -> Response:
    """The error handler of every OpenAI-compatible blueprint (files and batches register it too)."""
    response = jsonify(exc.body())
    response.status_code = exc.status
    response.headers.update(exc.headers)
    return response


@bp.errorhandler(Unavailable)
def openai_unavailable_response(exc: Unavailable) -> Response:
    """A dependency outage (app/api/problems.py) on an OpenAI-compatible endpoint: 503 + Retry-After
    in OpenAI's shape (files and batches register it too)."""
    return openai_error_response(fmt.OpenAIError(exc.status, exc.detail, type="server_error",
                                                  code=f"{exc.dependency}_unavailable", headers=exc.headers))


@bp.get("/models")
def list_models():
    return jsonify({"object": "list", "data": [_model_object(services().settings.model_name)]})


@bp.get("/models/<path:model_id>")
def get_model(model_id: str):
    name = services().settings.model_name
    if model_id != name:
        raise fmt.OpenAIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
    return jsonify(_model_object(name))


def _model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": _STARTED, "owned_by": "genq"}


@bp.post("/completions")
def completions():
    return _generate(fmt.COMPLETIONS_ENDPOINT)


@bp.post("/chat/completions")
def chat_completions():
    return _generate(fmt.CHAT_ENDPOINT)


def _generate(endpoint: str):
    body = request.get_json(silent=True)
    if body is None:
        raise fmt.OpenAIError(400, "the request body must be JSON (Content-Type: application/json)")
    spec = fmt.parse_request(endpoint, body)
    svc = services()
    try:
        served_model(svc.settings, spec.model)
    except UnknownModel as exc:
        raise fmt.OpenAIError(404, f"The model '{exc.model}' does not exist (this service serves '{exc.served}')",
                              param="model", code="model_not_found") from None
    submission = Submission(key=current_key(), model=spec.model, input=spec.job_input(),
                            priority=fmt.INTERACTIVE_PRIORITY, metadata={"user": spec.user} if spec.user else None,
                            service_tier=spec.lane)
    # A stream is read from Redis, so a streamed request cannot wait out a broker outage (nobody
    # would read the job's tokens): its job fails instead. A plain request waits for the job.
    try:
        submitted = submit(svc, admission(), submission, wait=not spec.stream, fail_unqueued=spec.stream)
    except SubmissionRefused as refusal:
        raise _as_openai_error(refused(refusal)) from None
    except Problem as problem:
        raise _as_openai_error(problem) from None
    except EnqueueFailed:
        raise fmt.OpenAIError(503, "the request could not be queued (the broker is unreachable)",
                              type="server_error", code="queue_unavailable",
                              headers={"Retry-After": str(OUTAGE_RETRY_AFTER_SECONDS)}) from None
    job = submitted.job
    if spec.stream:
        return Response(completion_stream(svc, endpoint, job, spec.n, spec.include_usage),
                        mimetype="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        job = wait_for_final(svc, submitted.pubsub, job.id, job.owner, REQUEST_TIMEOUT_SECONDS)
    finally:
        submitted.close()
    if job is None:
        raise fmt.OpenAIError(504, f"the request did not finish within {REQUEST_TIMEOUT_SECONDS:.0f} s; it "
                              f"continues as job {submitted.job.id}", type="server_error", code="timeout")
    if job.status != JobStatus.SUCCEEDED.value:
        raise fmt.job_error(job)
    return jsonify(fmt.response_body(endpoint, job))


def _as_openai_error(problem: Problem) -> fmt.OpenAIError:
    """The admission problems of `POST /v1/jobs` (the key's quotas, the service's load shedding) in
    OpenAI's error shape (context overflow: 400 context_length_exceeded; quotas: 429)."""
    code = (problem.type or "").replace("-", "_") or None
    if problem.status == 422:
        fields = [e.get("field") for e in problem.extensions.get("errors", [])]
        return fmt.OpenAIError(400, problem.detail, param=fields[0] if fields else None,
                               code="context_length_exceeded" if code == "context_length_exceeded" else code,
                               headers=problem.headers)
    kind = "rate_limit_error" if problem.status == 429 else "server_error" if problem.status >= 500 \
        else "invalid_request_error"
    return fmt.OpenAIError(problem.status, problem.detail, type=kind, code=code, headers=problem.headers)
