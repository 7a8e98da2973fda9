"""OpenAI-compatible endpoints: /v1/models, /v1/completions, /v1/chat/completions.

Every request is a genq job (visible in `GET /v1/jobs`) at interactive priority. A plain request
waits for the job's `done` event and answers with the finished completion (with the broker down, the
job waits in the database for the reconciler and the request waits for it); `stream: true` follows
the job's event log and turns its token events into OpenAI chunks (`data: {...}` ... `data: [DONE]`).
Errors here are in OpenAI's shape, {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any, Iterator

from flask import Blueprint, Response, jsonify, request
from redis.exceptions import RedisError
from sqlalchemy import update

from app.api.admission import admit, max_active_jobs, refused
from app.api.auth import current_owner
from app.api.services import Services, services
from app.api.sse import stream_job_events
from app.infra.broker import send_run_job
from app.infra.db import utcnow
from app.infra.problems import Problem
from app.jobs import store, transitions
from app.jobs.event_log import EventId, JobEvent
from app.api.job_request import JobCreate
from app.jobs.models import Job, JobStatus
from app.jobs.serialization import done_event_data
from app.jobs.store import SubmissionRefused
from app.openai import formats as fmt

log = logging.getLogger(__name__)

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
    if spec.model != svc.settings.model_name:
        raise fmt.OpenAIError(404, f"The model '{spec.model}' does not exist (this service serves "
                              f"'{svc.settings.model_name}')", param="model", code="model_not_found")
    job_input = spec.job_input()
    owner = current_owner()
    try:
        admit(JobCreate.model_validate(job_input))
        try:
            with svc.sessions.begin() as session:   # the insert checks the key's active jobs (app/jobs.py)
                job = store.create_job(session, owner=owner, model=spec.model, priority=fmt.INTERACTIVE_PRIORITY,
                                       input=job_input, metadata={"user": spec.user} if spec.user else None,
                                       max_active=max_active_jobs(), live_key=True)
        except SubmissionRefused as refusal:
            raise refused(refusal) from None
    except Problem as problem:
        raise _as_openai_error(problem) from None
    if spec.stream:
        _enqueue_or_fail(svc, job)
        stream = _stream(svc, endpoint, job, owner, spec.n, spec.include_usage)
        return Response(stream, mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    pubsub = _subscribe(svc, job.id)   # before the task exists: nothing is missed
    try:
        _enqueue_or_defer(svc, job)
        job = _wait_final(svc, pubsub, job.id, owner)
    finally:
        if pubsub is not None:
            _quietly(pubsub.close)
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


def _subscribe(svc: Services, job_id: str):
    """The job's live channel, or None when Redis is unreachable (the wait then asks the database)."""
    pubsub = svc.redis.pubsub()
    try:
        pubsub.subscribe(svc.channels.job_live(job_id))
    except RedisError:
        log.warning("could not subscribe to the events of job %s; waiting on the database", job_id)
        _quietly(pubsub.close)
        return None
    return pubsub


def _quietly(fn) -> None:
    try:
        fn()
    except RedisError:
        pass


def _enqueue_or_defer(svc: Services, job: Job) -> None:
    """Send the job's task; if the broker is unreachable the job stays queued in the database and
    a worker's reconciler sends it once the broker is back (as `POST /v1/jobs` does)."""
    try:
        send_run_job(svc.celery, svc.settings, job.id, job.priority)
    except Exception as exc:
        log.warning("could not enqueue job %s (%s: %s); it waits in the database", job.id, type(exc).__name__, exc)
    transitions.emit("created", job.id)


def _enqueue_or_fail(svc: Services, job: Job) -> None:
    """Send the job's task, or fail the job and answer 503: a stream is read from Redis, so a
    streamed request cannot wait out a broker outage (nobody would read the job's tokens)."""
    try:
        send_run_job(svc.celery, svc.settings, job.id, job.priority)
    except Exception as exc:
        log.exception("could not enqueue job %s", job.id)
        with svc.sessions.begin() as session:
            session.execute(update(Job).where(Job.id == job.id, Job.status == "queued").values(
                status="failed", error_type="enqueue_failed", error_message=f"{type(exc).__name__}: {exc}",
                completed_at=utcnow()))
        raise fmt.OpenAIError(503, "the request could not be queued (the broker is unreachable)",
                              type="server_error", code="queue_unavailable") from None
    transitions.emit("created", job.id)


def _wait_final(svc: Services, pubsub, job_id: str, owner: str | None) -> Job:
    """The job once final: its `done` event ends the wait; the database is asked every second too,
    so a lost event or a Redis failure only costs a second (with no `pubsub`, it is polled)."""
    deadline = time.monotonic() + REQUEST_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        message = _next_message(pubsub)
        if message is not None and not JobEvent.from_message(message["data"]).is_done:
            continue   # a token or status event: keep waiting
        with svc.sessions() as session:
            job = store.get_job(session, job_id, owner)
        if job is not None and JobStatus(job.status).is_final:
            return job
    raise fmt.OpenAIError(504, f"the request did not finish within {REQUEST_TIMEOUT_SECONDS:.0f} s; it continues "
                          f"as job {job_id}", type="server_error", code="timeout")


def _next_message(pubsub):
    """The channel's next message, or None after a second without one (or without Redis)."""
    if pubsub is not None:
        try:
            return pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
        except RedisError:
            pass
    time.sleep(1.0)
    return None


def _sse(payload: Any) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n"


def _job_events(svc: Services, job_id: str, owner: str | None) -> Iterator[tuple[str, dict]]:
    """(type, data) of the job's events, from the same replay-then-follow stream SSE clients get."""
    for frame in stream_job_events(svc, job_id, owner, None):
        kind = data = None
        for line in frame.splitlines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
        if kind is not None:
            yield kind, data


def _stream(svc: Services, endpoint: str, job: Job, owner: str | None, n: int, include_usage: bool):
    def guarded() -> Iterator[str]:
        finished = False
        try:
            yield from frames()
            finished = True
        finally:
            if not finished:   # the client hung up: stop generating for nobody
                _cancel_quietly(svc, job.id, owner)

    def frames() -> Iterator[str]:
        if endpoint == fmt.CHAT_ENDPOINT:   # OpenAI opens every choice with the assistant role
            for index in range(n):
                yield _sse(fmt.chunk(endpoint, job, [fmt.delta_choice(endpoint, index, "", role=True)],
                                     with_usage_field=include_usage))
        # Log-probabilities ride on the chunk that carries their text; tokens whose text is held
        # back (half a character, a possible stop string) pass theirs on to the next chunk.
        pending: dict[int, list[dict]] = {}
        offsets: dict[int, int] = {}
        for kind, data in _job_events(svc, job.id, owner):
            if kind == "token":
                index = data.get("index", 0)
                pending.setdefault(index, []).extend(data.get("logprobs") or [])
                if data.get("text"):
                    logprobs = pending.pop(index, None) or None
                    choice = fmt.delta_choice(endpoint, index, data["text"],
                                              logprobs=fmt.stream_logprobs(endpoint, logprobs, offsets.get(index, 0)))
                    offsets[index] = offsets.get(index, 0) + len(data["text"])
                    yield _sse(fmt.chunk(endpoint, job, [choice], with_usage_field=include_usage))
            elif kind == "done":
                break
        with svc.sessions() as session:
            final = store.get_job(session, job.id, owner)
        if final is None or final.status != JobStatus.SUCCEEDED.value:
            error = fmt.job_error(final) if final is not None else fmt.OpenAIError(404, "the job vanished")
            yield _sse(error.body())
            yield _sse("[DONE]")
            return
        for sample in fmt.response_body(endpoint, final)["choices"]:
            left = pending.pop(sample["index"], None) or None   # tokens whose text never came (a cut stop string)
            closing = fmt.delta_choice(endpoint, sample["index"], None, finish_reason=sample["finish_reason"],
                                       logprobs=fmt.stream_logprobs(endpoint, left, offsets.get(sample["index"], 0)))
            yield _sse(fmt.chunk(endpoint, final, [closing], with_usage_field=include_usage))
        if include_usage:
            yield _sse(fmt.chunk(endpoint, final, [], fmt.usage(final), with_usage_field=True))
        yield _sse("[DONE]")

    return guarded()


def _cancel_quietly(svc: Services, job_id: str, owner: str | None) -> None:
    try:
        with svc.sessions.begin() as session:
            outcome = store.cancel_job(session, job_id, owner)
        if outcome is store.CancelOutcome.REQUESTED:
            svc.redis.publish(svc.channels.control, json.dumps({"type": "cancel", "job_id": job_id}))
        elif outcome is store.CancelOutcome.CANCELED:   # never reached a worker: the API writes its log
            result = store.JobResult(JobStatus.CANCELED, output_text="", finish_reason="abort", completion_tokens=0)
            svc.events.publish(job_id, [JobEvent(EventId(0, 1), "status", {"status": "canceled"}),
                                        JobEvent(EventId(0, 2), "done", done_event_data(result))])
            transitions.emit("completed", job_id, status="canceled")
    except Exception:
        log.exception("could not cancel job %s after its client disconnected", job_id)
