"""The HTTP API over real HTTP, a real database and real Redis, with no worker consuming the queue:
submission, polling, listing, cancelling queued jobs, event replay, and every kind of bad request."""
from __future__ import annotations

import json

import pytest
import requests

from app.api import create_app
from app.api.request_parsing import preferred_wait
from app.infra.channels import Channels
from app.infra.redis_client import redis_client
from tests.support.service import ServerThread, free_port, service_settings

PROBLEM = "application/problem+json"
JOB_KEYS = {"id", "status", "created_at", "started_at", "completed_at", "input", "output", "usage", "metrics",
            "error", "urls", "model", "priority", "service_tier", "metadata", "attempts"}


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    with service_settings(tmp_path_factory.mktemp("api"), model_name="tiny") as settings:
        yield settings


@pytest.fixture(scope="module")
def api(settings):
    with ServerThread(create_app(settings)) as server:
        yield server.url


def submit(api, **body):
    return requests.post(f"{api}/v1/jobs", json={"prompt": "hello", "max_tokens": 4, **body}, timeout=30)


def assert_problem(response, status):
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == PROBLEM
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"] and body["type"]
    return body


def test_submit_answers_202_with_location_and_the_job(api, settings):
    response = submit(api, temperature=0, stop="\n", metadata={"user": "u1"}, priority=2)
    assert response.status_code == 202
    job = response.json()
    assert set(job) == JOB_KEYS
    assert response.headers["Location"] == job["urls"]["self"] == f"{api}/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["model"] == "tiny" and job["priority"] == 2
    assert job["input"]["prompt"] == "hello" and job["input"]["stop"] == ["\n"] and job["input"]["temperature"] == 0
    assert job["metadata"] == {"user": "u1"}
    assert job["output"] == {"text": None, "finish_reason": None}
    assert job["urls"]["cancel"].endswith("/cancel") and job["urls"]["events"].endswith("/events")
    polled = requests.get(job["urls"]["self"], timeout=10).json()
    assert polled["id"] == job["id"] and polled["status"] == "queued"
    # the task is on this test's own Celery queue, carrying only the id
    redis = redis_client(settings.redis_url)
    queue_keys = list(redis.scan_iter(match=f"{Channels(settings.key_prefix).kombu_prefix}{settings.queue}*"))
    queued = [message for key in queue_keys for message in redis.lrange(key, 0, -1)]
    assert any(job["id"] in message for message in queued)


def test_submit_announces_the_job_to_the_workers_newcomer_reserves(api, settings):
    """With fair scheduling (the default) a submission wakes the workers' newcomer reserves on their
    control channel (worker/runtime.py), saying whose job it is (its owner, the key)."""
    from app.infra.db import session_factory
    from app.jobs.models import Job

    assert settings.newcomer_reserve > 0
    pubsub = redis_client(settings.redis_url).pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(Channels(settings.key_prefix).control)
    try:
        assert pubsub.get_message(timeout=1.0) is None
        response = submit(api)
        assert response.status_code == 202
        message = pubsub.get_message(timeout=5.0)
        with session_factory(settings.database_url)() as session:
            owner = session.get(Job, response.json()["id"]).owner
        assert message is not None and json.loads(message["data"]) == {"type": "queued", "owner": owner}
    finally:
        pubsub.close()


def test_chat_messages_are_accepted(api):
    response = requests.post(f"{api}/v1/jobs", json={"messages": [{"role": "system", "content": "Be brief."},
                                                                  {"role": "user", "content": "Hi"}]}, timeout=10)
    assert response.status_code == 202
    assert response.json()["input"]["messages"][1] == {"role": "user", "content": "Hi"}


def test_list_is_newest_first_with_cursor_pagination(api):
    ids = [submit(api, metadata={"page": "yes"}).json()["id"] for _ in range(5)]
    seen, url = [], f"{api}/v1/jobs?limit=2"
    while url:
        page = requests.get(url, timeout=10).json()
        assert len(page["data"]) <= 2
        seen += [job["id"] for job in page["data"]]
        url = page["next"]
        if page["next_cursor"] is None:
            assert url is None
    assert seen[:5] == list(reversed(ids))
    assert len(seen) == len(set(seen))


def test_list_filters_by_status(api):
    job_id = submit(api).json()["id"]
    requests.post(f"{api}/v1/jobs/{job_id}/cancel", timeout=10)
    canceled = requests.get(f"{api}/v1/jobs", params={"status": "canceled", "limit": 100}, timeout=10).json()
    assert job_id in [job["id"] for job in canceled["data"]]
    assert {job["status"] for job in canceled["data"]} == {"canceled"}


def test_cancel_queued_job_then_conflict_and_replay(api):
    job_id = submit(api).json()["id"]
    response = requests.post(f"{api}/v1/jobs/{job_id}/cancel", timeout=10)
    assert response.status_code == 200
    job = response.json()
    assert job["status"] == "canceled" and job["completed_at"] and job["output"]["text"] == ""
    problem = assert_problem(requests.post(f"{api}/v1/jobs/{job_id}/cancel", timeout=10), 409)
    assert "already finished" in problem["detail"] and problem["job_status"] == "canceled"
    with requests.get(f"{api}/v1/jobs/{job_id}/events", stream=True, timeout=10) as stream:
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        text = stream.text
    assert "id: 0-1\nevent: status\n" in text and "id: 0-2\nevent: done\n" in text
    assert '"status":"canceled"' in text


def test_prefer_wait_without_a_worker_answers_202_after_waiting(api):
    response = requests.post(f"{api}/v1/jobs", json={"prompt": "x"}, headers={"Prefer": "wait=1"}, timeout=30)
    assert response.status_code == 202
    assert response.headers["Preference-Applied"] == "wait=1"
    assert response.json()["status"] == "queued"


def test_prefer_wait_is_capped_at_60(api):
    from flask import Flask

    app = Flask("t")
    for header, expected in [("wait=5", 5), ("respond-async, wait=600", 60), ("wait=abc", None),
                             ("handling=lenient", None), ("wait=0", 0), ('wait="7"; x', 7)]:
        with app.test_request_context(headers={"Prefer": header}):
            assert preferred_wait() == expected


@pytest.mark.parametrize("body, status, hint", [
    ("{", 400, "not valid JSON"),
    ("", 400, "empty"),
    ("[1, 2]", 422, "JSON object"),
    ('{"prompt": 5}', 422, "prompt"),
    ('{"prompt": "x", "max_tokens": "10"}', 422, "max_tokens"),
    ('{"prompt": "x", "max_tokens": -1}', 422, "max_tokens"),
    ('{"prompt": "x", "max_tokens": 2.5}', 422, "max_tokens"),
    ('{"prompt": "x", "temperature": true}', 422, "temperature"),
    ('{"prompt": "x", "top_p": 0}', 422, "top_p"),
    ('{"prompt": "x", "unknown_field": 1}', 422, "unknown_field"),
    ('{"prompt": "x", "messages": [{"role": "user", "content": "y"}]}', 422, "exactly one"),
    ('{"max_tokens": 3}', 422, "exactly one"),
    ('{"messages": [{"role": "robot", "content": "y"}]}', 422, "role"),
    ('{"prompt": "x", "stop": [""]}', 422, "stop"),
    ('{"prompt": "x", "priority": 10}', 422, "priority"),
    ('{"prompt": "x", "model": "gpt-17"}', 422, "unknown model"),
    ('{"prompt": "x", "metadata": "not-an-object"}', 422, "metadata"),
    ('{"prompt": "x", "min_tokens": 9, "max_tokens": 3}', 422, "min_tokens"),
    ('{"prompt": "a\\u0000b"}', 422, "NUL"),
])
def test_bad_submissions_are_problem_json(api, body, status, hint):
    response = requests.post(f"{api}/v1/jobs", data=body, headers={"Content-Type": "application/json"}, timeout=10)
    problem = assert_problem(response, status)
    assert hint.lower() in problem["detail"].lower()


def test_validation_problem_lists_fields(api):
    problem = assert_problem(submit(api, max_tokens=-1, top_k="x"), 422)
    assert {e["field"] for e in problem["errors"]} == {"max_tokens", "top_k"}


def test_wrong_content_type_and_oversized_body(api):
    assert_problem(requests.post(f"{api}/v1/jobs", data="prompt=x",
                                 headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=10), 415)
    big = json.dumps({"prompt": "x" * (9 * 1024 * 1024)})
    assert_problem(requests.post(f"{api}/v1/jobs", data=big, headers={"Content-Type": "application/json"},
                                 timeout=30), 413)


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/jobs/01nosuchjob0000000000000000"), ("POST", "/v1/jobs/nosuchjob/cancel"),
    ("GET", "/v1/jobs/nosuchjob/events"), ("GET", "/v1/nothing-here"),
])
def test_unknown_ids_and_paths_are_404_problems(api, method, path):
    assert_problem(requests.request(method, f"{api}{path}", timeout=10), 404)


@pytest.mark.parametrize("query", ["status=done", "limit=0", "limit=101", "limit=x", "cursor=%%%", "cursor=abc"])
def test_bad_list_queries_are_400(api, query):
    assert_problem(requests.get(f"{api}/v1/jobs?{query}", timeout=10), 400)


def test_wrong_method_is_405_problem(api):
    response = requests.delete(f"{api}/v1/jobs", timeout=10)
    assert_problem(response, 405)
    assert "POST" in response.headers["Allow"]


def test_bad_last_event_id_is_400(api):
    job_id = submit(api).json()["id"]
    response = requests.get(f"{api}/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "banana"}, timeout=10)
    assert_problem(response, 400)


def test_health_ready_and_metrics(api):
    assert requests.get(f"{api}/healthz", timeout=10).json() == {"status": "ok"}
    ready = requests.get(f"{api}/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "redis": "ok"}
    health = requests.get(f"{api}/health", timeout=10)   # no worker yet: cannot generate
    assert health.status_code == 503 and health.headers["Retry-After"]
    assert health.json()["checks"] == {"database": "ok", "redis": "ok", "workers": 0}
    assert "no worker" in health.json()["detail"]
    submit(api)
    metrics = requests.get(f"{api}/metrics", timeout=10)
    assert metrics.status_code == 200
    assert 'genq_jobs{status="queued"}' in metrics.text
    assert "genq_http_requests_total" in metrics.text and "genq_jobs_submitted_total" in metrics.text
    assert requests.get(f"{api}/v1/workers", timeout=10).json() == {"data": []}


def test_unreachable_redis_makes_readyz_503_and_submit_wait_in_the_database(settings):
    broken = settings.with_(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with ServerThread(create_app(broken)) as server:
        ready = requests.get(f"{server.url}/readyz", timeout=30)
        problem = assert_problem(ready, 503)
        assert problem["checks"] == {"database": "ok", "redis": "unreachable"} and "redis" in problem["detail"]
        for headers in ({}, {"Prefer": "wait=5"}):
            response = requests.post(f"{server.url}/v1/jobs", json={"prompt": "x"}, headers=headers, timeout=60)
            assert response.status_code == 202 and response.headers["Genq-Enqueue"] == "deferred"
            assert response.json()["queue"]["status"] == "deferred"
            job = requests.get(response.headers["Location"], timeout=10).json()
            assert job["status"] == "queued" and job["error"] is None   # the reconciler will send it
