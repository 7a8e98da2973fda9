"""A submission's admission checks and its idempotency key, in the API.

The checks themselves are Flask-free (app/tenancy/admission.py); `admission()` is this app's, and
`refused(...)` turns the job insert's own refusal (revoked key, too many active jobs) into the
problem (401, or 429 + Retry-After).

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
from app.infra.problems import OUTAGE_RETRY_AFTER_SECONDS, REDIS, Problem, Unavailable
from app.jobs.store import SubmissionRefused
from app.tenancy.admission import SHED_RETRY_AFTER_SECONDS, Admission
from app.tenancy.idempotency import Claim, ClaimState, IdempotencyStore, fingerprint, valid_key

log = logging.getLogger(__name__)


def install(app: Flask) -> None:
    svc = app.extensions["genq"]
    app.extensions["genq_admission"] = Admission(svc.settings, svc.redis, svc.channels)
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


def admission() -> Admission:
    """This app's admission checks (app/tenancy/admission.py), for the submit path."""
    return current_app.extensions["genq_admission"]


def _too_many_active(active: int, allowed: int) -> Problem:
    return Problem(429, f"this key has {active} queued or running jobs, its limit is {allowed}; retry when "
                   "some have finished", title="Too many active jobs", type="too-many-active-jobs",
                   headers={"Retry-After": str(SHED_RETRY_AFTER_SECONDS)})


def refused(refusal: SubmissionRefused) -> Problem:
    """The problem for an insert that `store.create_job(max_active=, live_key=)` refused."""
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
        raise Unavailable(REDIS, "Redis is unavailable, so idempotency keys cannot be checked right now; retry in "
                          f"{OUTAGE_RETRY_AFTER_SECONDS} s (or send the request without an Idempotency-Key)") from None
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
        try:
            current_app.extensions["genq_idempotency"].complete(owner, idem_key, g.genq_idempotency_fingerprint,
                                                                job_id)
        except RedisError:
            # The job exists: answer it rather than a 503 that invites a duplicate (the claim expires).
            log.warning("could not record idempotency key for job %s (Redis)", job_id, exc_info=True)
