"""Webhooks without a worker: Standard Webhooks signing and verification, the retry schedule, the
SSRF checks at submission and at delivery, the event store's once-per-job rule, and the API's own
job.completed for a job canceled while queued."""
from __future__ import annotations

import json
import time

import pytest
import requests

from app.api import create_app
from app.infra.broker import webhook_queue
from app.infra.db import session_factory, utcnow
from app.infra.webhook_secrets import generate_secret
from app.jobs.models import Job
from app.tenancy.keys import create_key
from app.webhooks.delivery import post, retry_delay, webhook_secret_for
from app.webhooks.signing import WebhookVerificationError, sign, signed_headers, verify
from app.webhooks.store import create_event
from app.webhooks.sweep import sweep_webhooks
from app.webhooks.targets import refused_reason
from tests.support.service import ServerThread, service_settings
from tests.support.webhook_receiver import Receiver

SECRET = generate_secret()


def test_signature_matches_the_standard_webhooks_reference_vector():
    assert sign("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330,
                '{"test": 2432232314}') == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_verify_accepts_a_signed_delivery_and_rejects_tampering_and_old_timestamps():
    body = json.dumps({"type": "job.completed", "timestamp": "2026-01-01T00:00:00Z", "data": {"id": "x"}}).encode()
    headers = signed_headers(SECRET, "msg_1", body)
    assert verify({k.title(): v for k, v in headers.items()}, body, SECRET)["data"] == {"id": "x"}
    with pytest.raises(WebhookVerificationError):
        verify(headers, body + b" ", SECRET)
    with pytest.raises(WebhookVerificationError):
        verify(headers, body, generate_secret())
    old = signed_headers(SECRET, "msg_1", body, timestamp=int(time.time()) - 301)
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(old, body, SECRET)
    with pytest.raises(WebhookVerificationError):
        verify({k: v for k, v in headers.items() if k != "webhook-signature"}, body, SECRET)
    rotated = {**headers, "webhook-signature": "v1,bm90IGl0 " + headers["webhook-signature"]}
    assert verify(rotated, body, SECRET)


def test_retry_delays_follow_the_schedule_with_jitter_and_retry_after():
    schedule = (0, 5, 30, 120)
    assert [retry_delay(schedule, attempt, 0.0) for attempt in range(1, 5)] == [5, 30, 120, None]
    assert all(4 <= retry_delay(schedule, 1, 0.2) <= 6 for _ in range(50))
    assert retry_delay(schedule, 1, 0.0, retry_after=60) == 60          # never sooner than asked
    assert retry_delay(schedule, 1, 0.0, retry_after=10**6) == 120      # capped by the schedule


@pytest.mark.parametrize("address, refused", [
    ("169.254.169.254", "link-local"), ("10.0.0.1", "private"), ("127.0.0.1", "loopback"), ("::1", "loopback"),
    ("::ffff:10.0.0.1", "private"), ("224.0.0.1", "multicast"), ("0.0.0.0", "unspecified"), ("8.8.8.8", None)])
def test_refused_addresses(address, refused):
    assert refused_reason(address) == refused


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    with service_settings(tmp_path_factory.mktemp("webhooks"), model_name="tiny", webhook_secret=SECRET,
                          webhook_allow_private=False) as settings:
        yield settings


@pytest.fixture(scope="module")
def strict_api(settings):
    with ServerThread(create_app(settings)) as server:
        yield server.url


@pytest.fixture(scope="module")
def open_api(settings):
    with ServerThread(create_app(settings.with_(webhook_allow_private=True))) as server:
        yield server.url


def submit(api, **body):
    return requests.post(f"{api}/v1/jobs", json={"prompt": "hello", "max_tokens": 4, **body}, timeout=30)


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data", "http://10.0.0.1/hook",
                                 "http://localhost:8080/hook", "https://[::1]/hook"])
def test_private_targets_are_refused_at_submission(strict_api, open_api, url):
    response = submit(strict_api, webhook=url)
    assert response.status_code == 422, response.text
    assert response.headers["Content-Type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"].endswith("webhook-refused")
    assert "GENQ_WEBHOOK_ALLOW_PRIVATE" in problem["detail"] and "address" in problem["detail"]
    assert submit(open_api, webhook=url).status_code == 202     # allowed when private targets are


@pytest.mark.parametrize("body", [{"webhook": "ftp://example.com/x"}, {"webhook": "https://u:p@example.com/"},
                                  {"webhook": "https://example.com/", "webhook_events_filter": ["finished"]},
                                  {"webhook": "https://example.com/", "webhook_events_filter": []},
                                  {"webhook_events_filter": ["start"]}])
def test_malformed_webhooks_are_422(open_api, body):
    assert submit(open_api, **body).status_code == 422


def test_delivery_refuses_a_private_address_even_if_submission_passed():

    with Receiver() as receiver:
        answer = post(receiver.url + "/ok/x", b"{}", {}, timeout=5, allow_private=False)
        assert answer.status_code is None and answer.error.startswith("refused") and "loopback" in answer.error
        assert receiver.deliveries == []
        answer = post(receiver.url + "/ok/x", b"{}", {}, timeout=5, allow_private=True)
        assert answer.status_code == 200 and len(receiver.deliveries) == 1


def test_a_job_canceled_while_queued_gets_one_completed_event(open_api, settings):

    job = submit(open_api, webhook="http://127.0.0.1:9/hook", webhook_events_filter=["start", "completed"]).json()
    assert requests.post(job["urls"]["cancel"], timeout=30).status_code == 200
    record = requests.get(f"{job['urls']['self']}/webhooks", timeout=10).json()
    assert record["webhook"] == "http://127.0.0.1:9/hook" and record["webhook_events_filter"] == ["start", "completed"]
    [event] = record["data"]
    assert event["type"] == "job.completed" and event["id"].startswith("msg_")
    # a duplicated finish can never create a second job.completed event
    assert create_event(session_factory(settings.database_url), job["id"], "job.completed", "http://x/", "{}") is None
    assert requests.get(f"{open_api}/v1/jobs/nope/webhooks", timeout=10).status_code == 404


def test_delivery_honours_retry_after_and_does_not_follow_redirects():

    with Receiver() as receiver:
        busy = post(receiver.url + "/busy/x", b"{}", {}, timeout=5, allow_private=True)
        assert busy.status_code == 503 and busy.retry_after == 7
        moved = post(receiver.url + "/moved/x", b"{}", {}, timeout=5, allow_private=True)
        assert moved.status_code == 302 and "redirect not followed" in moved.error
        assert [d.path for d in receiver.deliveries] == ["/busy/x", "/moved/x"]


class RecordingCelery:
    def __init__(self):
        self.sent = []

    def send_task(self, name, args, queue, countdown=None):
        self.sent.append((name, tuple(args), queue))


def test_sweep_resends_lost_tasks_and_writes_missing_completed_events(open_api, settings):
    from datetime import timedelta

    from sqlalchemy import update

    sessions = session_factory(settings.database_url)
    canceled = submit(open_api, webhook="http://127.0.0.1:9/a").json()
    requests.post(canceled["urls"]["cancel"], timeout=30)
    [lost] = requests.get(f"{canceled['urls']['self']}/webhooks", timeout=10).json()["data"]
    # a job that finished, but whose process died before writing its job.completed event
    crashed = submit(open_api, webhook="http://127.0.0.1:9/b").json()
    with sessions.begin() as session:
        session.execute(update(Job).where(Job.id == crashed["id"]).values(
            status="succeeded", output_text="hi", completed_at=utcnow() - timedelta(minutes=5)))
    celery = RecordingCelery()
    sweep_webhooks(settings, sessions, celery, grace_seconds=60, now=utcnow() + timedelta(seconds=61))
    [written] = requests.get(f"{crashed['urls']['self']}/webhooks", timeout=10).json()["data"]
    assert written["type"] == "job.completed" and written["status"] == "pending"
    sent = {args for name, args, queue in celery.sent if queue == webhook_queue(settings)}
    assert (lost["id"].removeprefix("msg_"), 1) in sent and (written["id"].removeprefix("msg_"), 1) in sent
    celery.sent.clear()   # a second sweep writes no second completed event
    sweep_webhooks(settings, sessions, celery, grace_seconds=60, now=utcnow() + timedelta(seconds=61))
    assert len(requests.get(f"{crashed['urls']['self']}/webhooks", timeout=10).json()["data"]) == 1


def test_the_completed_sweep_is_not_starved_by_webhooks_that_never_want_completed(open_api, settings):
    """Finished jobs whose webhook asks only for `start` never get a job.completed event; more of
    them than one sweep's page must not hide a job that does want it."""
    from datetime import timedelta

    from sqlalchemy import update

    from app.webhooks import store as webhook_store

    sessions = session_factory(settings.database_url)
    start_only = [submit(open_api, webhook="http://127.0.0.1:9/s", webhook_events_filter=["start"]).json()["id"]
                  for _ in range(4)]
    wants = submit(open_api, webhook="http://127.0.0.1:9/c", webhook_events_filter=["start", "completed"]).json()["id"]
    finished = utcnow() - timedelta(minutes=5)
    with sessions.begin() as session:
        session.execute(update(Job).where(Job.id.in_([*start_only, wants])).values(
            status="succeeded", output_text="hi", completed_at=finished))
    with sessions() as session:
        found = webhook_store.finished_without_completed_event(
            session, finished - timedelta(seconds=1), finished + timedelta(seconds=1), limit=2)
    assert [r.job_id for r in found] == [wants]
    assert found[0].wants("completed")


def test_deliveries_are_signed_with_the_owning_keys_secret(settings):
    from types import SimpleNamespace

    with session_factory(settings.database_url).begin() as session:
        key, _ = create_key(session, "webhook-secret-test")
        session.flush()
        assert webhook_secret_for(SimpleNamespace(owner=key.id), settings, session) == key.webhook_secret
        assert webhook_secret_for(SimpleNamespace(owner=None), settings, session) == SECRET
