"""What a submission must pass before a job is created, and its idempotency key.

`admit(spec)` applies the calling key's quotas and the global load shedding, cheapest first:
the key's largest `max_tokens` (422), the model's context (422, with the token counts), the broker
queue depth (503 + Retry-After). The key's queued + running jobs (429 + Retry-After) are checked
by the job's insert itself (`refused(...)` turns its refusal into the problem).

`claim_idempotency(body)` reads `Idempotency-Key`; a replay answers with the original job, a key
reused with another body is 422, and a twin of a request still in progress is 409. A claimed key is
released when the request ends without `complete_idempotency(job_id)` (an error before the job
existed), so the client's retry is processed normally.
"""
from __future__ import annotations

import logging

from flask import Flask, current_app, g, request
from redis.exceptions import RedisError

from app.api.auth import current_key, revoked_meanwhile
from app.api.services import services
from app.infra.broker import queue_depth
from app.infra.problems import Problem
from app.api.job_request import JobCreate
from app.jobs.store import SubmissionRefused
from app.tenancy.context_window import ContextWindow
from app.tenancy.idempotency import Claim, ClaimState, IdempotencyStore, fingerprint, valid_key

log = logging.getLogger(__name__)

SHED_RETRY_AFTER_SECONDS = 5


def install(app: Flask) -> None:
    svc = app.extensions["genq"]
    app.extensions["genq_context_window"] = ContextWindow(svc.settings)
    app.extensions["genq_idempotency"] = IdempotencyStore(svc.redis, svc.settings.key_prefix,
                                                          svc.settings.idempotency_ttl_seconds)

    @app.teardown_request
    def _release_unfinished_claim(exc=None):
        pending = g.pop("genq_idempotency_claim", None)
        if pending is not None:
            try:
                current_app.extensions["genq_idempotency"].release(*pending)
            except RedisError:
                log.warning("could not release idempotency key (it expires on its own)", exc_info=True)


def admit(spec: JobCreate) -> None:
    """Raise the problem that refuses `spec`, if any. The key's active jobs are checked by the
    submission's insert itself (`jobs.create_job(max_active=max_active_jobs(), live_key=True)`;
    its refusal becomes a problem through `refused(...)`)."""
    svc = services()
    key = current_key()
    limit = key.max_tokens or svc.settings.max_tokens_limit
    if limit is not None and spec.max_tokens > limit:
        raise Problem(422, f"max_tokens: this key may ask for at most {limit} tokens, got {spec.max_tokens}",
                      title="Invalid request body", type="validation-error",
                      errors=[{"field": "max_tokens", "message": f"must be at most {limit} for this key",
                               "type": "quota_max_tokens"}])
    texts = [spec.prompt] if spec.prompt is not None else [m.content for m in spec.messages or []]
    overflow = current_app.extensions["genq_context_window"].overflow(texts, spec.max_tokens)
    if overflow is not None:
        field = "prompt" if spec.prompt is not None else "messages"
        raise Problem(422, f"{field}: the prompt has {overflow.prompt_tokens} tokens; with max_tokens "
                      f"{overflow.max_tokens} that is more than the model's context of {overflow.max_model_len} tokens",
                      title="Prompt too long", type="context-length-exceeded",
                      prompt_tokens=overflow.prompt_tokens, max_tokens=overflow.max_tokens,
                      max_model_len=overflow.max_model_len,
                      errors=[{"field": field, "message": "longer than the model's context",
                               "type": "context_length_exceeded"}])
    if svc.settings.max_queue_depth:
        try:
            depth = queue_depth(svc.redis, svc.channels, svc.settings.queue)
        except RedisError:
            depth = 0   # the submission itself will find out (and defer or fail the enqueue)
        if depth >= svc.settings.max_queue_depth:
            raise Problem(503, f"the queue holds {depth} jobs (limit {svc.settings.max_queue_depth}); "
                          "retry later", title="Service overloaded", type="overloaded",
                          headers={"Retry-After": str(SHED_RETRY_AFTER_SECONDS)})


def max_active_jobs() -> int:
    """The calling key's limit of queued + running jobs."""
    return current_key().max_active_jobs or services().settings.max_active_jobs


def _too_many_active(active: int, allowed: int) -> Problem:
    return Problem(429, f"this key has {active} queued or running jobs, its limit is {allowed}; retry when "
                   "some have finished", title="Too many active jobs", type="too-many-active-jobs",
                   headers={"Retry-After": str(SHED_RETRY_AFTER_SECONDS)})


def refused(refusal: SubmissionRefused) -> Problem:
    """The problem for an insert that `jobs.create_job(max_active=, live_key=)` refused."""
    if refusal.reason == "key_revoked":
        return revoked_meanwhile(current_key())
    return _too_many_active(refusal.active, refusal.limit)


def claim_idempotency(body: dict) -> Claim | None:
    """None without an `Idempotency-Key` header; otherwise a NEW or REPLAY claim (other outcomes
    raise their problem)."""
    idem_key = request.headers.get("Idempotency-Key")
    if idem_key is None:
        return None
    if not valid_key(idem_key):
        raise Problem(400, "Idempotency-Key must be 1 to 255 visible ASCII characters", title="Invalid header",
                      type="invalid-idempotency-key")
    owner = current_key().id
    body_fingerprint = fingerprint(body)
    store: IdempotencyStore = current_app.extensions["genq_idempotency"]
    try:
        claim = store.claim(owner, idem_key, body_fingerprint)
    except RedisError:
        raise Problem(503, "idempotency keys cannot be checked right now (Redis is unreachable); retry later",
                      title="Service unavailable", type="idempotency-unavailable",
                      headers={"Retry-After": str(SHED_RETRY_AFTER_SECONDS)}) from None
    if claim.state is ClaimState.MISMATCH:
        raise Problem(422, "this Idempotency-Key was used with a different request body; use a new key for a "
                      "new request", title="Idempotency key reused", type="idempotency-key-reused")
    if claim.state is ClaimState.IN_PROGRESS:
        raise Problem(409, "a request with this Idempotency-Key is still being processed; retry shortly",
                      title="Request in progress", type="idempotency-in-progress", headers={"Retry-After": "1"})
    if claim.state is ClaimState.NEW:
        g.genq_idempotency_claim = (owner, idem_key)
        g.genq_idempotency_fingerprint = body_fingerprint
    return claim


def complete_idempotency(job_id: str) -> None:
    pending = g.pop("genq_idempotency_claim", None)
    if pending is not None:
        owner, idem_key = pending
        current_app.extensions["genq_idempotency"].complete(owner, idem_key, g.genq_idempotency_fingerprint, job_id)
