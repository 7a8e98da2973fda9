"""What reacts to job transitions (app/jobs/transitions.py) in every process that submits or runs
jobs, the API and the worker alike: one log line per transition, webhook events, and batch
progress (a line that ends releases the next; the last one finalizes its batch)."""
from __future__ import annotations

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from app.infra.broker import send_run_job
from app.infra.settings import Settings
from app.jobs import transitions
from app.jobs.transitions import log_job_transition
from app.openai.batches import advance_on_completion
from app.webhooks.dispatcher import dispatcher_for


def install(settings: Settings, sessions: sessionmaker[Session], celery: Celery) -> None:
    transitions.register(log_job_transition)
    transitions.register(advance_on_completion(
        sessions, settings.batch_max_in_flight,
        lambda job_id, priority: send_run_job(celery, settings, job_id, priority)))
    transitions.register(dispatcher_for(settings, sessions, celery))
