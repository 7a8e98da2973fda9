"""A dependency outage is a clear, retryable answer, never a 500: the database or Redis down gives
503 + Retry-After naming it (problem+json, or OpenAI's error shape on the OpenAI-compatible
endpoints), submissions still defer when only Redis is down, stale pooled connections after a
database restart are replaced before use, and a genuine bug is still the generic 500.

Real services only: "down" is a closed local port (refused at once), "restarted" is
pg_terminate_backend on the real test database."""
from __future__ import annotations

import secrets
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests
from flask import g
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from app.api import create_app
from app.infra.db import get_engine
from app.infra.ids import new_id
from app.infra.problems import DATABASE, REDIS, Unavailable, outage
from app.tenancy.keys import KeyIdentity
from tests.support.service import ServerThread, free_port, service_settings

PROBLEM = "application/problem+json"
JOB_ID = "01m8aaaaaaaaaaaaaaaaaaaaaa"
OPENAI_ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    with service_settings(tmp_path_factory.mktemp("outages"), model_name="tiny") as settings:
        yield settings


def closed_database_url() -> str:
    return f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test"


def body_of(response) -> dict:
    """The JSON body of a `requests` response or of a Flask test client's."""
    return response.json() if callable(response.json) else response.json


def assert_unavailable(response, dependency: str) -> dict:
    """503 problem+json with Retry-After, its detail naming the dependency."""
    assert response.status_code == 503, body_of(response)
    assert response.headers["Content-Type"] == PROBLEM
    assert int(response.headers["Retry-After"]) > 0
    body = body_of(response)
    name = "the database" if dependency == DATABASE else "Redis"
    assert body["status"] == 503 and body["type"].endswith(f"{dependency}-unavailable")
    assert f"{name} is unavailable" in body["detail"] and body["dependency"] == dependency
    return body


def assert_openai_unavailable(response, dependency: str) -> dict:
    assert response.status_code == 503, body_of(response)
    assert response.headers["Content-Type"] == "application/json"
    assert int(response.headers["Retry-After"]) > 0
    error = body_of(response)["error"]
    assert set(error) == OPENAI_ERROR_KEYS
    assert error["type"] == "server_error" and error["code"] == f"{dependency}_unavailable"
    assert ("the database" if dependency == DATABASE else "Redis") + " is unavailable" in error["message"]
    return error


# -- the database down --------------------------------------------------------------------------

def _known_key(app) -> None:
    """Let every request past the key check (as a key the API had cached would be), so that the
    views themselves meet the unreachable database."""
    identity = KeyIdentity("key_outage", "outage", "whsec_x", None, None, None)

    def _as_known_key():
        g.genq_key = identity
    app.before_request_funcs.setdefault(None, []).insert(0, _as_known_key)


@pytest.mark.parametrize("where", ["key check", "view"])
def test_an_unreachable_database_is_503_with_retry_after_on_every_endpoint(settings, where):
    app = create_app(settings.with_(database_url=closed_database_url()))
    if where == "view":
        _known_key(app)
    client = app.test_client()
    auth = {"Authorization": "Bearer gq_anything"}
    for method, path, kwargs in [("GET", f"/v1/jobs/{JOB_ID}", {}), ("GET", "/v1/jobs", {}),
                                 ("POST", "/v1/jobs", {"json": {"prompt": "hello", "max_tokens": 2}}),
                                 ("POST", f"/v1/jobs/{JOB_ID}/cancel", {}),
                                 ("GET", f"/v1/jobs/{JOB_ID}/events", {}),
                                 ("GET", f"/v1/jobs/{JOB_ID}/webhooks", {})]:
        response = client.open(path, method=method, headers=auth, **kwargs)
        assert_unavailable(response, DATABASE)
    for method, path, kwargs in [("POST", "/v1/chat/completions",
                                  {"json": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                            "max_tokens": 2}}),
                                 ("POST", "/v1/completions", {"json": {"model": "tiny", "prompt": "hi",
                                                                       "max_tokens": 2, "stream": True}}),
                                 ("GET", "/v1/models", {}), ("GET", "/v1/files", {}),
                                 ("GET", "/v1/batches", {}),
                                 ("POST", "/v1/batches", {"json": {"input_file_id": new_id("file-"), "endpoint": "/v1/completions",
                                                                   "completion_window": "24h"}})]:
        if path == "/v1/models" and where == "view":
            continue   # served from the settings: it works without the database once the key is known
        response = client.open(path, method=method, headers=auth, **kwargs)
        assert_openai_unavailable(response, DATABASE)
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json["checks"] == {"database": "unreachable", "redis": "ok"}
    assert ready.headers["Retry-After"] == "5"
    assert client.get("/healthz").status_code == 200
    assert client.get("/metrics").status_code == 200   # the gauges it cannot read are left out


def test_stale_pooled_connections_after_a_database_restart_are_replaced_before_use(settings):
    if make_url(settings.database_url).get_backend_name() != "postgresql":
        pytest.skip("pg_terminate_backend needs PostgreSQL (set DATABASE_URL)")
    name = f"genq-outage-{secrets.token_hex(4)}"
    url = make_url(settings.database_url).update_query_dict({"application_name": name})
    app_settings = settings.with_(database_url=url.render_as_string(hide_password=False))
    with ServerThread(create_app(app_settings)) as server:
        def list_jobs(_=None):
            return requests.get(f"{server.url}/v1/jobs", timeout=30)

        with ThreadPoolExecutor(6) as pool:   # several connections in the pool
            assert all(r.status_code == 200 for r in pool.map(list_jobs, range(12)))
        admin = create_engine(settings.database_url)
        try:
            with admin.begin() as connection:
                killed = connection.execute(text(
                    "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = :name AND pid <> pg_backend_pid()) AS killed"), {"name": name}).scalar()
        finally:
            admin.dispose()
        assert killed >= 1
        # Every pooled connection is dead; each is found so by the pre-ping and replaced.
        for _ in range(3):
            assert list_jobs().status_code == 200
        with ThreadPoolExecutor(6) as pool:
            statuses = [r.status_code for r in pool.map(list_jobs, range(12))]
        assert statuses == [200] * 12
        job = requests.post(f"{server.url}/v1/jobs", json={"prompt": "after the restart", "max_tokens": 2},
                            timeout=30)
        assert job.status_code == 202 and requests.get(job.headers["Location"], timeout=30).status_code == 200
    assert get_engine(app_settings.database_url).pool._pre_ping   # what does it (app/infra/db.py)


# -- Redis down ---------------------------------------------------------------------------------

def test_unreachable_redis_is_503_where_redis_is_needed_and_submissions_still_defer(settings):
    broken = settings.with_(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with ServerThread(create_app(broken)) as server:
        api = server.url
        ready = requests.get(f"{api}/readyz", timeout=30)
        assert ready.status_code == 503 and ready.headers["Content-Type"] == PROBLEM
        assert ready.json()["checks"] == {"database": "ok", "redis": "unreachable"}
        assert ready.headers["Retry-After"] == "5" and "redis" in ready.json()["detail"]
        # the documented deferred enqueue: the job is stored, 202
        created = requests.post(f"{api}/v1/jobs", json={"prompt": "x", "max_tokens": 2}, timeout=30)
        assert created.status_code == 202 and created.headers["Genq-Enqueue"] == "deferred"
        job_id = created.json()["id"]
        assert requests.get(f"{api}/v1/jobs/{job_id}", timeout=30).json()["status"] == "queued"
        assert requests.get(f"{api}/v1/jobs", timeout=30).status_code == 200
        # what cannot work without Redis
        events = requests.get(f"{api}/v1/jobs/{job_id}/events", timeout=30, stream=True)
        assert_unavailable(events, REDIS)
        assert_unavailable(requests.get(f"{api}/v1/workers", timeout=30), REDIS)
        assert_unavailable(requests.post(f"{api}/v1/jobs/{job_id}/cancel", timeout=30), REDIS)
        assert requests.get(f"{api}/v1/jobs/{job_id}", timeout=30).json()["status"] == "queued"
        idempotent = requests.post(f"{api}/v1/jobs", json={"prompt": "y"}, headers={"Idempotency-Key": "k1"},
                                   timeout=30)
        assert_unavailable(idempotent, REDIS)
        streamed = requests.post(f"{api}/v1/chat/completions", timeout=30, json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True})
        assert streamed.status_code == 503 and streamed.headers["Retry-After"] == "5"
        assert streamed.json()["error"]["code"] == "queue_unavailable"


# -- bugs are still bugs ------------------------------------------------------------------------

def test_a_genuine_bug_is_still_the_generic_500(settings):
    app = create_app(settings)

    def bad_sql():
        with app.extensions["genq"].sessions() as session:
            session.execute(text("SELECT no_such_column FROM no_such_table"))

    def plain_bug():
        raise KeyError("oops")

    app.add_url_rule("/bug/sql", "bad_sql", bad_sql)
    app.add_url_rule("/bug/plain", "plain_bug", plain_bug)
    client = app.test_client()
    for path in ("/bug/sql", "/bug/plain"):
        response = client.get(path)
        assert response.status_code == 500 and response.headers["Content-Type"] == PROBLEM
        assert "Retry-After" not in response.headers
        assert response.json["detail"] == "the server failed to handle this request; it has been logged"


def test_what_counts_as_an_outage(tmp_path):
    def raised(call):
        try:
            call()
        except Exception as exc:   # noqa: BLE001 - the exception is what is tested
            return exc
        raise AssertionError("no exception")

    down_db = create_engine(closed_database_url())
    assert outage(raised(down_db.connect)).dependency == DATABASE
    down_db.dispose()
    down_redis = redis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=2)
    assert outage(raised(down_redis.ping)).dependency == REDIS
    sqlite = create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with sqlite.connect() as connection:
        missing_table = raised(lambda: connection.execute(text("SELECT * FROM nowhere")))
    assert outage(missing_table) is None                      # a bug, though SQLite calls it OperationalError
    assert outage(KeyError("x")) is None
    wrapped = RuntimeError("while sending")
    wrapped.__cause__ = redis.exceptions.ConnectionError("refused")
    assert outage(wrapped).dependency == REDIS
    assert isinstance(outage(Unavailable(DATABASE)), Unavailable)
