"""Webhooks end to end: the API over HTTP, a real `genq worker` delivering through Celery, and a
real HTTP receiver on 127.0.0.1 (private targets allowed, a shortened retry schedule)."""
from __future__ import annotations

import json
import secrets
import time

import pytest
import requests

from app.infra.db import session_factory
from app.infra.webhook_secrets import generate_secret
from app.jobs.models import Job
from app.tenancy.keys import webhook_secret_of_owner
from app.webhooks.signing import WebhookVerificationError, verify
from tests.support.service import ServerThread, WorkerProcess, service_settings
from tests.support.webhook_receiver import Receiver

SECRET = generate_secret()


@pytest.fixture(scope="module")
def receiver():
    with Receiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def hooked_stack(tmp_path_factory, tiny_model_dir):
    from app.api import create_app

    tmp = tmp_path_factory.mktemp("webhooks")
    with service_settings(tmp, model=str(tiny_model_dir), max_num_seqs=16, lease_seconds=30, webhook_secret=SECRET,
                          webhook_allow_private=True, webhook_retry_schedule=(0, 0.2, 0.2),
                          webhook_retry_jitter=0.0) as settings, \
            WorkerProcess(settings, tmp / "worker.log") as worker, \
            ServerThread(create_app(settings)) as server:
        yield settings, server.url, worker


def submit(api, webhook, **body):
    response = requests.post(f"{api}/v1/jobs", json={"prompt": "hello there", "max_tokens": 6, "temperature": 0,
                                                     "webhook": webhook, **body}, timeout=30)
    assert response.status_code == 202, response.text
    return response.json()


def key_secret(settings, job_id):
    """The webhook secret of the API key that submitted the job (what its deliveries are signed with)."""

    with session_factory(settings.database_url)() as session:
        return webhook_secret_of_owner(session, session.get(Job, job_id).owner)


def wait_for_events(api, job_id, done, timeout=60.0):
    """The job's webhook record once `done(record)` holds."""
    deadline = time.monotonic() + timeout
    while True:
        record = requests.get(f"{api}/v1/jobs/{job_id}/webhooks", timeout=10).json()
        if done(record):
            return record
        assert time.monotonic() < deadline, f"webhook events never settled: {record}"
        time.sleep(0.1)


def settled(record, count=1):
    return len(record["data"]) >= count and all(e["status"] != "pending" for e in record["data"])


def test_a_flaky_receiver_gets_the_third_attempt_same_id_all_signed(hooked_stack, receiver):
    settings, api, _ = hooked_stack
    path = f"/flaky/2/{secrets.token_hex(4)}"
    job = submit(api, receiver.url + path)
    record = wait_for_events(api, job["id"], settled)
    [event] = record["data"]
    assert event["type"] == "job.completed" and event["status"] == "delivered" and event["attempts"] == 3
    assert [d["status_code"] for d in event["deliveries"]] == [500, 500, 200]
    assert [d["next_attempt_at"] is not None for d in event["deliveries"]] == [True, True, False]

    deliveries = receiver.at(path)
    assert len(deliveries) == 3
    secret = key_secret(settings, job["id"])            # the submitting key's, not the deployment's
    assert secret.startswith("whsec_") and secret != SECRET
    assert {d.headers["webhook-id"] for d in deliveries} == {event["id"]}
    for delivery in deliveries:
        payload = verify(delivery.headers, delivery.body, secret)
        assert payload["type"] == "job.completed"
        assert payload["data"]["id"] == job["id"] and payload["data"]["status"] == "succeeded"
    # the full job, as GET /v1/jobs/{id} returns it
    polled = requests.get(job["urls"]["self"], timeout=10).json()
    assert payload["data"] == polled
    assert len({d.body for d in deliveries}) == 1           # every retry sends the same bytes
    tampered = deliveries[-1].body.replace(b'"succeeded"', b'"failed"')
    with pytest.raises(WebhookVerificationError):
        verify(deliveries[-1].headers, tampered, secret)
    with pytest.raises(WebhookVerificationError):
        verify(deliveries[-1].headers, deliveries[-1].body, SECRET)


def test_a_receiver_that_never_answers_2xx_stops_after_the_schedule(hooked_stack, receiver):
    _, api, _ = hooked_stack
    path = f"/down/{secrets.token_hex(4)}"
    job = submit(api, receiver.url + path)
    record = wait_for_events(api, job["id"], settled)
    [event] = record["data"]
    assert event["status"] == "failed" and event["attempts"] == 3
    assert [(d["attempt"], d["status_code"]) for d in event["deliveries"]] == [(1, 500), (2, 500), (3, 500)]
    assert all(d["duration_seconds"] >= 0 for d in event["deliveries"])
    assert event["deliveries"][-1]["next_attempt_at"] is None and event["next_attempt_at"] is None
    time.sleep(0.5)   # longer than the schedule's delays: nothing more arrives
    assert len(receiver.at(path)) == 3
    assert requests.get(job["urls"]["self"], timeout=10).json()["status"] == "succeeded"


def test_410_gone_stops_retries(hooked_stack, receiver):
    _, api, _ = hooked_stack
    path = f"/gone/{secrets.token_hex(4)}"
    job = submit(api, receiver.url + path)
    [event] = wait_for_events(api, job["id"], settled)["data"]
    assert event["status"] == "failed" and event["attempts"] == 1
    assert event["deliveries"][0]["status_code"] == 410
    assert len(receiver.at(path)) == 1


def test_completed_only_filter_calls_once_per_job(hooked_stack, receiver):
    _, api, _ = hooked_stack
    paths = [f"/ok/{secrets.token_hex(4)}" for _ in range(3)]
    jobs = [submit(api, receiver.url + path) for path in paths]     # default filter: completed
    for job, path in zip(jobs, paths):
        record = wait_for_events(api, job["id"], settled)
        assert record["webhook_events_filter"] == ["completed"]
        assert [(e["type"], e["status"]) for e in record["data"]] == [("job.completed", "delivered")]
        [delivery] = receiver.at(path)
        assert json.loads(delivery.body)["data"]["id"] == job["id"]


def test_start_output_completed_arrive_in_order(hooked_stack, receiver):
    settings, api, _ = hooked_stack
    path = f"/ok/{secrets.token_hex(4)}"
    job = submit(api, receiver.url + path, max_tokens=12, webhook_events_filter=["completed", "output", "start"])
    record = wait_for_events(api, job["id"], lambda r: settled(r, 3)
                             and r["data"][-1]["type"] == "job.completed")
    assert all(e["status"] == "delivered" for e in record["data"])
    secret = key_secret(settings, job["id"])
    payloads = [verify(d.headers, d.body, secret) for d in receiver.at(path)]
    types = [p["type"] for p in payloads]
    assert types[0] == "job.started" and types[-1] == "job.completed"
    assert set(types[1:-1]) == {"job.output"} and len(types) >= 3
    assert payloads[0]["data"]["status"] == "running"
    final_text = payloads[-1]["data"]["output"]["text"]
    for output in payloads[1:-1]:
        assert final_text.startswith(output["data"]["output"]["text"])   # the text so far
    assert [p["type"] for p in payloads] == [e["type"] for e in record["data"]]
