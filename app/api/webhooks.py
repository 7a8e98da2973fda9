"""Webhooks in the API: checking a submission's callback URL, registering it with the job, and
`GET /v1/jobs/{id}/webhooks` (every event of the job and every delivery attempt)."""
from __future__ import annotations

from flask import Blueprint, jsonify, request
from sqlalchemy.orm import Session

from app.api.auth import current_owner
from app.api.services import services
from app.infra.problems import Problem
from app.jobs import store
from app.jobs.serialization import isoformat
from app.webhooks import store as webhook_store
from app.webhooks.targets import WebhookTargetError, resolve_target

bp = Blueprint("webhooks", __name__, url_prefix="/v1/jobs")


def check_submission(spec, settings) -> None:
    """Refuse (422) a webhook genq will not call: its host must resolve, and (unless
    GENQ_WEBHOOK_ALLOW_PRIVATE) only to public addresses. Deliveries check again, against DNS
    rebinding."""
    if spec.webhook is None:
        return
    if current_owner() is None and not settings.webhook_secret:
        raise Problem(422, "without an API key, webhooks are signed with the deployment's GENQ_WEBHOOK_SECRET, "
                      "which is not set", title="Webhooks unavailable", type="webhooks-unavailable")
    try:
        resolve_target(spec.webhook, settings.webhook_allow_private)
    except WebhookTargetError as exc:
        raise Problem(422, str(exc), title="Webhook URL refused", type="webhook-refused",
                      errors=[{"field": "webhook", "message": str(exc), "type": "webhook_refused"}]) from None


def register(session: Session, job_id: str, spec) -> None:
    """Store the job's webhook in the job's own insert transaction."""
    if spec.webhook is not None:
        webhook_store.register(session, job_id, spec.webhook, spec.webhook_events_filter, request.host_url)


@bp.get("/<job_id>/webhooks")
def job_webhooks(job_id: str):
    with services().sessions() as session:
        job = store.get_job(session, job_id, current_owner())
        if job is None:
            raise Problem(404, f"no job with id {job_id!r}", title="Job not found", type="job-not-found")
        body = webhooks_body(session, job_id)
    return jsonify(body)


def webhooks_body(session: Session, job_id: str) -> dict:
    """A job's webhook, its events and their delivery attempts (the job's owner is checked already)."""
    registration = webhook_store.registration(session, job_id)
    events = webhook_store.list_events(session, job_id)
    return {
        "webhook": registration.url if registration else None,
        "webhook_events_filter": list(registration.events_filter) if registration else None,
        "data": [_event_dict(event, attempts) for event, attempts in events],
    }


def _event_dict(event, attempts) -> dict:
    return {
        "id": f"msg_{event.id}", "type": event.type, "status": event.status, "attempts": event.attempts,
        "created_at": isoformat(event.created_at), "next_attempt_at": isoformat(event.next_attempt_at),
        "completed_at": isoformat(event.completed_at),
        "deliveries": [{"attempt": a.attempt, "started_at": isoformat(a.started_at),
                        "duration_seconds": a.duration_seconds, "status_code": a.status_code, "error": a.error,
                        "next_attempt_at": isoformat(a.next_attempt_at)} for a in attempts],
    }
