"""A webhook delivery through database outages (SQLite and PostgreSQL; the outage simulated at the
event store): each step is retried, and a claim or a record whose commit went through but whose
answer was lost is recognised by its retry, so the receiver gets the attempt once."""
from __future__ import annotations

from sqlalchemy import select

from app.infra.settings import Settings
from app.infra.webhook_secrets import generate_secret
from app.jobs import store as jobs_store
from app.webhooks import store
from app.webhooks.delivery import deliver
from app.webhooks.models import WebhookAttempt, WebhookEvent
from tests.support.outages import commits_then_drops, dropped_connection
from tests.support.webhook_receiver import Receiver

SETTINGS = Settings(webhook_secret=generate_secret(), webhook_allow_private=True, webhook_timeout_seconds=5)


def _event(sessions, url: str) -> str:
    with sessions.begin() as session:
        job_id = jobs_store.create_job(session, model="tiny", input={"prompt": "x"}).id
    return store.create_event(sessions, job_id, "job.completed", url, '{"type": "job.completed"}')


def _state(sessions, event_id):
    with sessions() as session:
        event = session.get(WebhookEvent, event_id)
        attempts = list(session.scalars(select(WebhookAttempt.attempt).where(WebhookAttempt.event_id == event_id)))
        return event.status, event.attempts, attempts


def test_a_recorded_attempt_whose_answer_was_lost_is_not_sent_again(sessions, monkeypatch):
    with Receiver() as receiver:
        event_id = _event(sessions, f"{receiver.url}/ok/record")
        failed = commits_then_drops(monkeypatch, store, "record_attempt")
        assert deliver(SETTINGS, sessions, None, event_id, 1) == "delivered"
        assert len(failed) == 1
        assert len(receiver.at("/ok/record")) == 1
    assert _state(sessions, event_id) == ("delivered", 1, [1])


def test_a_claim_whose_answer_was_lost_is_recognised(sessions, monkeypatch):
    with Receiver() as receiver:
        event_id = _event(sessions, f"{receiver.url}/ok/claim")
        failed = commits_then_drops(monkeypatch, store, "claim_attempt")
        assert deliver(SETTINGS, sessions, None, event_id, 1) == "delivered"
        assert failed == [True] and len(receiver.at("/ok/claim")) == 1
    assert _state(sessions, event_id) == ("delivered", 1, [1])


def test_a_short_outage_while_loading_the_event_is_retried(sessions, monkeypatch):
    real, calls = store.get_event, []

    def down_twice(*args):
        calls.append(1)
        if len(calls) <= 2:
            raise dropped_connection()
        return real(*args)

    with Receiver() as receiver:
        event_id = _event(sessions, f"{receiver.url}/ok/load")
        monkeypatch.setattr(store, "get_event", down_twice)
        assert deliver(SETTINGS, sessions, None, event_id, 1) == "delivered"
        assert len(calls) == 3 and len(receiver.at("/ok/load")) == 1
