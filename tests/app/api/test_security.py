"""API keys, tenant isolation, quotas, load shedding and idempotency keys, over real HTTP with a
real database and Redis (no worker: jobs stay queued unless canceled)."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from app.api import create_app
from app.cli.keys import client_api_key, dev_key_path, ensure_dev_key
from app.cli.main import main
from app.infra.redis_client import redis_client
from app.jobs.models import Job
from app.tenancy.idempotency import ClaimState, IdempotencyStore, fingerprint
from app.tenancy.keys import ApiKey, hash_key, revoke_key
from tests.support.service import ServerThread, build_tiny, create_test_key, service_settings

PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("security")
    with service_settings(tmp, model=str(build_tiny(tmp / "model")), model_name="tiny") as settings:
        yield settings


@pytest.fixture(scope="module")
def app(settings):
    return create_app(settings)


@pytest.fixture(scope="module")
def api(app):
    with ServerThread(app) as server:
        yield server.url


def auth(key: str | None) -> dict:
    return {"Authorization": f"Bearer {key}" if key is not None else None}


def call(method: str, url: str, key: str | None, **kwargs) -> requests.Response:
    headers = {**auth(key), **kwargs.pop("headers", {})}
    return requests.request(method, url, headers=headers, timeout=30, **kwargs)


def submit(api: str, key: str, headers: dict | None = None, **body) -> requests.Response:
    return call("POST", f"{api}/v1/jobs", key, headers=headers or {},
                json={"prompt": "hello", "max_tokens": 4, **body})


def assert_problem(response, status):
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == PROBLEM
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"]
    return body


V1_REQUESTS = [("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs/01m8aaaaaaaaaaaaaaaaaaaaaa"),
               ("POST", "/v1/jobs/01m8aaaaaaaaaaaaaaaaaaaaaa/cancel"),
               ("GET", "/v1/jobs/01m8aaaaaaaaaaaaaaaaaaaaaa/events"),
               ("GET", "/v1/jobs/01m8aaaaaaaaaaaaaaaaaaaaaa/webhooks"), ("GET", "/v1/workers"),
               ("GET", "/v1/no-such-endpoint")]


@pytest.mark.parametrize("method, path", V1_REQUESTS)
@pytest.mark.parametrize("header", [None, "Bearer", "Basic dXNlcjpwYXNz", "Bearer gq_not-a-key", "Bearer nope"])
def test_every_v1_endpoint_needs_a_valid_key(api, method, path, header):
    response = requests.request(method, f"{api}{path}", headers={"Authorization": header}, json={"prompt": "x"},
                                timeout=30)
    problem = assert_problem(response, 401)
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert problem["type"].endswith("unauthorized")


def test_health_endpoints_and_openapi_need_no_key(api):
    for path in ("/healthz", "/readyz", "/metrics"):
        assert requests.get(f"{api}{path}", headers=auth(None), timeout=30).status_code == 200, path


def test_another_keys_job_is_404_everywhere(api, app):
    alice, bob = create_test_key(app, "alice"), create_test_key(app, "bob")
    job = submit(api, alice, metadata={"who": "alice"}).json()
    job_id = job["id"]
    for method, path in [("GET", f"/v1/jobs/{job_id}"), ("POST", f"/v1/jobs/{job_id}/cancel"),
                         ("GET", f"/v1/jobs/{job_id}/events"), ("GET", f"/v1/jobs/{job_id}/webhooks")]:
        problem = assert_problem(call(method, f"{api}{path}", bob), 404)
        assert job_id in problem["detail"] or "not found" in problem["title"].lower()
    assert job_id not in [j["id"] for j in call("GET", f"{api}/v1/jobs?limit=100", bob).json()["data"]]
    assert call("GET", f"{api}/v1/jobs/{job_id}", alice).json()["status"] == "queued"   # bob's cancel did nothing
    assert [j["id"] for j in call("GET", f"{api}/v1/jobs", alice).json()["data"]] == [job_id]
    assert call("POST", f"{api}/v1/jobs/{job_id}/cancel", alice).json()["status"] == "canceled"


def test_revoked_key_is_401(api, app):

    key = create_test_key(app, "short-lived")
    assert call("GET", f"{api}/v1/jobs", key).status_code == 200
    with app.extensions["genq"].sessions.begin() as session:
        assert len(revoke_key(session, key)) == 1
    assert_problem(call("GET", f"{api}/v1/jobs", key), 401)


def test_key_revoked_after_a_submission_cannot_submit_again(api, app):
    """Submissions take the key from the API's cache (app/api/auth.py); the insert itself still
    refuses a key revoked meanwhile, and nothing is created."""

    key = create_test_key(app, "cached-then-revoked")
    assert submit(api, key).status_code == 202            # the key is now in the cache
    with app.extensions["genq"].sessions.begin() as session:
        assert len(revoke_key(session, key)) == 1
    assert_problem(submit(api, key), 401)
    assert_problem(submit(api, key), 401)                 # forgotten by the cache: a plain lookup now
    with app.extensions["genq"].sessions() as session:
        from sqlalchemy import func, select

        owner = session.scalar(select(ApiKey.id).where(ApiKey.key_hash == hash_key(key)))
        assert session.scalar(select(func.count()).select_from(Job).where(Job.owner == owner)) == 1


def test_keys_cli_create_list_revoke(settings, monkeypatch, capsys, api):
    import json

    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    assert main(["keys", "create", "--name", "cli-key", "--rate-limit", "100", "--json"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["key"].startswith("gq_") and len(created["key"]) >= 40
    assert created["webhook_secret"].startswith("whsec_")
    import base64
    assert len(base64.b64decode(created["webhook_secret"][len("whsec_"):])) >= 24
    assert call("GET", f"{api}/v1/jobs", created["key"]).status_code == 200
    assert main(["keys", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    mine = [k for k in listed if k["id"] == created["id"]]
    assert mine and mine[0]["rate_limit_per_minute"] == 100
    assert created["key"] not in json.dumps(listed)     # only a prefix is shown
    assert main(["keys", "revoke", created["id"]]) == 0
    assert_problem(call("GET", f"{api}/v1/jobs", created["key"]), 401)


def test_keys_cli_weight_is_stored_listed_and_carried_by_the_key(settings, monkeypatch, capsys, app):
    from app.tenancy import keys

    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    assert main(["keys", "create", "--name", "heavy", "--weight", "2", "--json"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["weight"] == 2.0
    assert main(["keys", "create", "--name", "plain", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["weight"] == 1.0
    assert main(["keys", "list", "--json"]) == 0
    listed = {k["id"]: k for k in json.loads(capsys.readouterr().out)}
    assert listed[created["id"]]["weight"] == 2.0 and listed[plain["id"]]["weight"] == 1.0
    assert main(["keys", "list"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["ID", "NAME", "PREFIX", "WEIGHT"]
    heavy_row = next(line for line in table if line.startswith(created["id"]))
    assert heavy_row.split()[3] == "2"
    with app.extensions["genq"].sessions() as session:
        assert keys.authenticate(session, created["key"]).weight == 2.0      # what the API caches
        assert keys.authenticate(session, plain["key"]).weight == 1.0
        assert keys.key_weight(session, created["id"]) == 2.0                # what the worker reads
        assert keys.key_weight(session, "key_unknown") == 1.0
        assert keys.key_weight(session, None) == 1.0


@pytest.mark.parametrize("weight", ["0", "-1", "100.5", "1e9", "two", "nan", "inf", ""])
def test_keys_cli_refuses_invalid_weights(settings, monkeypatch, capsys, app, weight):
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    with app.extensions["genq"].sessions() as session:
        before = session.query(ApiKey).count()
    with pytest.raises(SystemExit) as exited:
        main(["keys", "create", "--name", f"bad-{weight}", "--weight", weight])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "--weight" in error and ("must be a number" in error or "must be > 0 and <= 100" in error)
    with app.extensions["genq"].sessions() as session:
        assert session.query(ApiKey).count() == before


@pytest.mark.parametrize("weight", [0, -1, 100.5, float("nan"), float("inf"), "two", None, True])
def test_create_key_refuses_invalid_weights(app, weight):
    from app.tenancy.keys import create_key

    with app.extensions["genq"].sessions.begin() as session, pytest.raises(ValueError, match="weight must be"):
        create_key(session, "bad", weight=weight)


def test_key_identity_defaults_to_weight_1():
    from app.tenancy.keys import KeyIdentity

    assert KeyIdentity("key_x", "x", "whsec_x", None, None, None).weight == 1.0


def test_only_a_hash_of_the_key_is_stored(app):
    from sqlalchemy import select

    key = create_test_key(app, "hashed")
    with app.extensions["genq"].sessions() as session:
        row = session.scalars(select(ApiKey).where(ApiKey.key_hash == hash_key(key))).one()
        assert key not in [getattr(row, c.key) for c in ApiKey.__table__.columns]


def test_rate_limit_429_with_retry_after_then_recovers(api, app):
    key = create_test_key(app, "limited", rate_limit_per_minute=10)
    statuses = []
    for _ in range(40):
        response = call("GET", f"{api}/v1/jobs?limit=1", key)
        statuses.append(response.status_code)
        if response.status_code == 429:
            break
    assert statuses[-1] == 429 and statuses.count(200) >= 9, statuses
    assert_problem(response, 429)
    retry_after = int(response.headers["Retry-After"])
    assert 1 <= retry_after <= 6
    time.sleep(retry_after)
    assert call("GET", f"{api}/v1/jobs?limit=1", key).status_code == 200
    other = create_test_key(app, "unaffected", rate_limit_per_minute=10)
    assert call("GET", f"{api}/v1/jobs?limit=1", other).status_code == 200


def test_rate_limit_is_shared_between_api_processes(api, settings):
    """Two apps (as two gunicorn processes would be) draw on one budget in Redis."""
    second = create_app(settings)
    key = create_test_key(second, "shared", rate_limit_per_minute=6)
    with ServerThread(second) as other:
        codes = [call("GET", f"{url}/v1/jobs?limit=1", key).status_code for url in [api, other.url] * 5]
    assert codes[:6] == [200] * 6 and 429 in codes[6:], codes


def test_active_jobs_quota_then_room_after_cancel(api, app):
    key = create_test_key(app, "two-at-a-time", max_active_jobs=2)
    ids = [submit(api, key).json()["id"] for _ in range(2)]
    response = submit(api, key)
    assert_problem(response, 429)
    assert int(response.headers["Retry-After"]) >= 1
    call("POST", f"{api}/v1/jobs/{ids[0]}/cancel", key)
    assert submit(api, key).status_code == 202


def test_max_tokens_quota_is_422_on_the_field(api, app):
    key = create_test_key(app, "short-answers", max_tokens=8)
    assert submit(api, key, max_tokens=8).status_code == 202
    problem = assert_problem(submit(api, key, max_tokens=9), 422)
    assert [e["field"] for e in problem["errors"]] == ["max_tokens"]


def test_prompt_longer_than_the_context_is_422_with_token_counts(api, app):
    key = create_test_key(app, "long-prompts")
    prompt = " ".join(f"word{i} says something" for i in range(1500))
    problem = assert_problem(submit(api, key, prompt=prompt, max_tokens=16), 422)
    assert problem["max_model_len"] == 2048 and problem["prompt_tokens"] + 16 > 2048
    assert str(problem["prompt_tokens"]) in problem["detail"] and "2048" in problem["detail"]
    chat = [{"role": "user", "content": prompt}]
    assert_problem(submit(api, key, prompt=None, messages=chat), 422)
    assert submit(api, key, prompt="short enough", max_tokens=16).status_code == 202


def test_a_deep_queue_sheds_new_jobs_with_503(settings, tmp_path):
    shedding = settings.with_(max_queue_depth=2, queue=f"{settings.key_prefix}-shed")
    app = create_app(shedding)
    key = create_test_key(app, "shed")
    with ServerThread(app) as server:
        assert [submit(server.url, key).status_code for _ in range(2)] == [202, 202]
        response = submit(server.url, key)
        problem = assert_problem(response, 503)
        assert problem["type"].endswith("overloaded") and int(response.headers["Retry-After"]) >= 1
        assert call("GET", f"{server.url}/v1/jobs", key).status_code == 200   # reads still work


def test_idempotency_key_replays_the_same_job(api, app):
    key, other = create_test_key(app, "idem"), create_test_key(app, "idem-other")
    headers = {"Idempotency-Key": "order-1"}
    first = submit(api, key, headers, metadata={"n": 1})
    again = submit(api, key, headers, metadata={"n": 1})
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    problem = assert_problem(submit(api, key, headers, metadata={"n": 2}), 422)
    assert "different request body" in problem["detail"]
    assert submit(api, other, headers, metadata={"n": 1}).json()["id"] != first.json()["id"]   # scoped per key
    assert len(call("GET", f"{api}/v1/jobs", key).json()["data"]) == 1
    assert_problem(submit(api, key, {"Idempotency-Key": "x" * 256}), 400)


def test_failed_request_releases_its_idempotency_key(api, app):
    key = create_test_key(app, "idem-quota", max_active_jobs=1)
    assert submit(api, key).status_code == 202
    headers = {"Idempotency-Key": "retry-me"}
    assert submit(api, key, headers).status_code == 429          # refused: nothing was created
    job_id = call("GET", f"{api}/v1/jobs", key).json()["data"][0]["id"]
    call("POST", f"{api}/v1/jobs/{job_id}/cancel", key)
    assert submit(api, key, headers).status_code == 202          # the retry is processed


def test_twenty_concurrent_identical_submissions_create_one_job(api, app):
    key = create_test_key(app, "idem-concurrent")
    headers = {"Idempotency-Key": "concurrent-1"}
    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda _: submit(api, key, headers, metadata={"c": True}), range(20)))
    assert {r.status_code for r in responses} <= {202, 409}, [r.text for r in responses]
    ids = {r.json()["id"] for r in responses if r.status_code == 202}
    assert len(ids) == 1
    jobs = call("GET", f"{api}/v1/jobs?limit=100", key).json()["data"]
    assert [j["id"] for j in jobs] == list(ids)
    for response in responses:
        if response.status_code == 409:
            assert response.headers["Retry-After"] == "1"
            assert response.headers["Content-Type"] == PROBLEM


def test_idempotency_store_states(settings):
    store = IdempotencyStore(redis_client(settings.redis_url), settings.key_prefix, ttl_seconds=60)
    fp = fingerprint({"b": 1, "a": [1, 2]})
    assert fp == fingerprint({"a": [1, 2], "b": 1})
    assert store.claim("owner", "k", fp).state is ClaimState.NEW
    assert store.claim("owner", "k", fp).state is ClaimState.IN_PROGRESS
    assert store.claim("owner", "k", "other").state is ClaimState.MISMATCH
    assert store.claim("someone-else", "k", fp).state is ClaimState.NEW
    store.complete("owner", "k", fp, "job-1")
    assert store.claim("owner", "k", fp).job_id == "job-1"
    ttl = redis_client(settings.redis_url).ttl(store._name("owner", "k"))
    assert 0 < ttl <= 60
    store.release("owner", "k")
    assert store.claim("owner", "k", fp).state is ClaimState.NEW


def test_another_keys_files_and_batches_are_404(api, app):
    """The OpenAI-compatible Files and Batch endpoints are scoped to the key too."""
    import json

    alice, bob = create_test_key(app, "alice-files"), create_test_key(app, "bob-files")
    line = {"custom_id": "1", "method": "POST", "url": "/v1/completions",
            "body": {"model": "tiny", "prompt": "hi", "max_tokens": 2}}
    uploaded = call("POST", f"{api}/v1/files", alice, data={"purpose": "batch"},
                    files={"file": ("in.jsonl", json.dumps(line).encode() + b"\n")})
    assert uploaded.status_code == 200, uploaded.text
    file_id = uploaded.json()["id"]
    batch = call("POST", f"{api}/v1/batches", alice, json={"input_file_id": file_id, "endpoint": "/v1/completions",
                                                           "completion_window": "24h"})
    assert batch.status_code == 200, batch.text
    batch_id = batch.json()["id"]
    for method, path in [("GET", f"/v1/files/{file_id}"), ("GET", f"/v1/files/{file_id}/content"),
                         ("GET", f"/v1/batches/{batch_id}"), ("POST", f"/v1/batches/{batch_id}/cancel")]:
        assert call(method, f"{api}{path}", bob).status_code == 404, path
        assert call(method, f"{api}{path}", None).status_code == 401, path
    assert file_id not in json.dumps(call("GET", f"{api}/v1/files", bob).json())
    assert batch_id not in json.dumps(call("GET", f"{api}/v1/batches", bob).json())
    assert bob_cannot_use(api, bob, file_id)
    assert call("GET", f"{api}/v1/batches/{batch_id}", alice).status_code == 200


def bob_cannot_use(api, bob, file_id) -> bool:
    response = call("POST", f"{api}/v1/batches", bob, json={"input_file_id": file_id, "endpoint": "/v1/completions",
                                                            "completion_window": "24h"})
    return 400 <= response.status_code < 500


def test_genq_up_dev_key_is_saved_reused_and_used_by_the_cli(settings, api, tmp_path, monkeypatch, capsys):
    import os
    import stat

    local = settings.with_(home=str(tmp_path / "home"), api_key=None)
    key, created = ensure_dev_key(local)
    assert created and key.startswith("gq_")
    assert stat.S_IMODE(os.stat(dev_key_path(local)).st_mode) == 0o600
    assert ensure_dev_key(local) == (key, False)
    assert client_api_key(local) == key and client_api_key(local.with_(api_key="gq_env")) == "gq_env"
    monkeypatch.setenv("GENQ_HOME", local.home)
    monkeypatch.setenv("DATABASE_URL", local.database_url)
    monkeypatch.delenv("GENQ_API_KEY", raising=False)
    assert main(["submit", "from the cli", "--max-tokens", "2", "--url", api]) == 0
    job_id = json.loads(capsys.readouterr().out)["id"]
    assert main(["jobs", "--url", api]) == 0
    assert job_id in capsys.readouterr().out
    assert call("GET", f"{api}/v1/jobs/{job_id}", key).status_code == 200
    assert main(["keys", "revoke", key]) == 0
    assert ensure_dev_key(local)[1] is True      # a revoked development key is replaced


def test_an_unreachable_database_is_503_not_500(settings):
    from tests.support.service import free_port

    broken = create_app(settings.with_(database_url=f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none"))
    response = broken.test_client().get("/v1/jobs", headers={"Authorization": "Bearer gq_anything"})
    assert_problem(response_like(response), 503)
    assert response.headers["Retry-After"] == "5"


def response_like(flask_response):
    """A Flask test response with the `requests` attributes assert_problem reads."""
    class Adapter:
        status_code = flask_response.status_code
        headers = flask_response.headers
        text = flask_response.get_data(as_text=True)

        @staticmethod
        def json():
            return flask_response.get_json()
    return Adapter()
