"""The console's server side over real HTTP, without a browser (these run where Chromium is absent):
redirects, the session cookie and its Redis record, revocation, the open-redirect guard, the submit
form's translation and its errors, headers. Real database and Redis; no worker (jobs stay queued)."""
from __future__ import annotations

import hashlib
import json
import re
from urllib.parse import urlsplit

import pytest
import requests

from app.api import create_app
from app.api.console.forms import FormError, job_body
from app.infra.channels import Channels
from app.infra.redis_client import redis_client
from app.tenancy.keys import revoke_key
from tests.support.service import ServerThread, build_tiny, create_test_key, service_settings


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console-http")
    with service_settings(tmp, model=str(build_tiny(tmp / "model")), model_name="tiny",
                          webhook_allow_private=True) as settings:
        app = create_app(settings)
        with ServerThread(app) as server:
            server.settings = settings
            server.app = app
            yield server


def form_token(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def signed_in_client(server, key: str | None = None) -> requests.Session:
    client = requests.Session()
    page = client.get(f"{server.url}/ui/sign-in", timeout=10)
    response = client.post(f"{server.url}/ui/sign-in", timeout=10, allow_redirects=False,
                           data={"api_key": key or server.api_key, "csrf_token": form_token(page.text)})
    assert response.status_code == 303, response.text
    return client


def test_signed_out_pages_go_to_sign_in_and_data_is_401(server):
    page = requests.get(f"{server.url}/ui/jobs?status=queued", allow_redirects=False, timeout=10)
    assert page.status_code == 303
    assert page.headers["Location"] == "/ui/sign-in?next=/ui/jobs?status%3Dqueued"
    for path in ("/ui/overview.json", f"/ui/jobs/{'0' * 26}/events", f"/ui/jobs/{'0' * 26}/state"):
        assert requests.get(server.url + path, allow_redirects=False, timeout=10).status_code == 401, path
    assert requests.post(f"{server.url}/ui/submit", allow_redirects=False, timeout=10).status_code == 401


def test_a_session_holds_the_key_id_only_and_ends_when_the_key_is_revoked(server):
    key = create_test_key(server.app, "to revoke")
    client = signed_in_client(server, key)
    cookie = next(c for c in client.cookies if c.name == "genq_console")
    assert cookie.path == "/ui" and cookie.has_nonstandard_attr("HttpOnly") and key not in cookie.value
    redis = redis_client(server.settings.redis_url)
    name = Channels(server.settings.key_prefix).console_session(hashlib.sha256(cookie.value.encode()).hexdigest())
    record = json.loads(redis.get(name))
    assert record["key_id"].startswith("key_") and key not in json.dumps(record)
    assert 0 < redis.ttl(name) <= 8 * 3600
    assert client.get(f"{server.url}/ui/jobs", timeout=10).status_code == 200

    with server.app.extensions["genq"].sessions.begin() as session:
        assert revoke_key(session, key)
    page = client.get(f"{server.url}/ui/jobs", allow_redirects=False, timeout=10)
    assert page.status_code == 303 and page.headers["Location"].startswith("/ui/sign-in")
    assert redis.get(name) is None


def test_sign_in_goes_back_only_to_console_pages(server):
    for target, expected in (("/ui/batches", "/ui/batches"), ("//evil.example/ui/x", "/ui/"),
                             ("https://evil.example/ui/", "/ui/"), ("/v1/jobs", "/ui/"), ("/ui\\..\\x", "/ui/")):
        client = requests.Session()
        page = client.get(f"{server.url}/ui/sign-in", params={"next": target}, timeout=10)
        response = client.post(f"{server.url}/ui/sign-in", allow_redirects=False, timeout=10,
                               data={"api_key": server.api_key, "csrf_token": form_token(page.text), "next": target})
        assert urlsplit(response.headers["Location"]).path == expected, target


def test_the_submit_form_creates_the_job_it_describes(server):
    client = signed_in_client(server)
    token = form_token(client.get(f"{server.url}/ui/submit", timeout=10).text)
    response = client.post(f"{server.url}/ui/submit", allow_redirects=False, timeout=10, data={
        "csrf_token": token, "kind": "chat", "messages": '[{"role": "user", "content": "hi <b>"}]',
        "max_tokens": "12", "temperature": "0.5", "seed": "7", "stop": "END\n\nSTOP", "priority": "3",
        "service_tier": "flex", "metadata": '{"team": "ml"}', "webhook": "http://127.0.0.1:9/hook",
        "webhook_events": ["start", "completed"], "format": "choice", "constraint": "yes\nno\n"})
    assert response.status_code == 303, response.text
    job_id = response.headers["Location"].rsplit("/", 1)[1]
    job = requests.get(f"{server.url}/v1/jobs/{job_id}", timeout=10).json()
    assert job["input"]["messages"] == [{"role": "user", "content": "hi <b>"}]
    assert (job["input"]["max_tokens"], job["input"]["temperature"], job["input"]["seed"]) == (12, 0.5, 7)
    assert job["input"]["stop"] == ["END", "STOP"]
    assert job["input"]["response_format"] == {"type": "choice", "choices": ["yes", "no"]}
    assert (job["priority"], job["service_tier"], job["metadata"]) == (3, "flex", {"team": "ml"})
    hooks = requests.get(f"{server.url}/v1/jobs/{job_id}/webhooks", timeout=10).json()
    assert hooks["webhook"] == "http://127.0.0.1:9/hook" and hooks["webhook_events_filter"] == ["start", "completed"]
    page = client.get(f"{server.url}{response.headers['Location']}", timeout=10).text
    assert "hi &lt;b&gt;" in page and "hi <b>" not in page


def test_a_leading_newline_survives_the_pre_element(server):
    client = signed_in_client(server)
    job_id = requests.post(f"{server.url}/v1/jobs", json={"prompt": "\nafter a newline"}, timeout=10).json()["id"]
    page = client.get(f"{server.url}/ui/jobs/{job_id}", timeout=10).text
    # the parser drops the newline right after <pre ...>: the prompt's own one must come after it
    assert '<pre id="input-prompt" class="output">\n\nafter a newline</pre>' in page


@pytest.mark.parametrize("fields, message", [
    ({"kind": "chat", "messages": "not json"}, "messages: must be a JSON array"),
    ({"prompt": "x", "temperature": "hot"}, "temperature: must be a number"),
    ({"prompt": "x", "temperature": "200"}, "temperature"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x", "format": "json_schema", "constraint": '{"type": "strng"}'}, "response_format"),
    ({"prompt": "x", "webhook": "ftp://example.com/<script>"}, "webhook"),
])
def test_a_refused_form_keeps_its_values_and_says_why(server, fields, message):
    client = signed_in_client(server)
    token = form_token(client.get(f"{server.url}/ui/submit", timeout=10).text)
    response = client.post(f"{server.url}/ui/submit", data={"csrf_token": token, **fields}, timeout=10)
    assert response.status_code == 422
    errors = re.search(r'<div class="error" role="alert" id="submit-errors">(.*?)</div>', response.text, re.S).group(1)
    assert message in errors
    assert "<script>" not in response.text


def test_posts_without_the_csrf_token_or_from_another_origin_are_refused(server):
    client = signed_in_client(server)
    token = form_token(client.get(f"{server.url}/ui/submit", timeout=10).text)
    before = len(requests.get(f"{server.url}/v1/jobs?limit=100", timeout=10).json()["data"])
    body = {"prompt": "forged", "max_tokens": "4"}
    for data, headers in (({}, {}), ({"csrf_token": "x" * len(token)}, {}),
                          ({"csrf_token": token}, {"Origin": "http://evil.example"})):
        response = client.post(f"{server.url}/ui/submit", data={**body, **data}, headers=headers, timeout=10)
        assert response.status_code == 403 and "Request refused" in response.text
    assert len(requests.get(f"{server.url}/v1/jobs?limit=100", timeout=10).json()["data"]) == before
    sign_in = requests.post(f"{server.url}/ui/sign-in", data={"api_key": server.api_key, "csrf_token": token},
                            allow_redirects=False, timeout=10)   # no sign-in cookie to match
    assert sign_in.status_code == 403 and "genq_console=" not in sign_in.headers.get("Set-Cookie", "")
    accepted = client.post(f"{server.url}/ui/submit", data={**body, "csrf_token": token}, allow_redirects=False,
                           headers={"Origin": server.url}, timeout=10)
    assert accepted.status_code == 303


def test_every_console_response_carries_the_security_headers(server):
    client = signed_in_client(server)
    for path in ("/ui/sign-in", "/ui/", "/ui/overview.json", "/ui/static/console.js", f"/ui/jobs/{'0' * 26}"):
        headers = client.get(server.url + path, timeout=10).headers
        policy = headers["Content-Security-Policy"]
        assert "script-src 'self'" in policy and "style-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert "unsafe" not in policy and headers["X-Content-Type-Options"] == "nosniff", path
    assert client.get(f"{server.url}/ui/", timeout=10).headers["Cache-Control"] == "no-store"


def test_job_body_leaves_empty_fields_to_the_api_defaults():
    assert job_body({"prompt": "hi", "max_tokens": " ", "stop": "", "metadata": ""}, []) == {"prompt": "hi"}
    assert job_body({"prompt": "hi", "format": "regex", "constraint": "[0-9]+"}, []) == {
        "prompt": "hi", "response_format": {"type": "regex", "pattern": "[0-9]+"}}
    assert job_body({"prompt": "hi", "webhook": "https://x.example/h"}, [])["webhook"] == "https://x.example/h"
    with pytest.raises(FormError, match="metadata"):
        job_body({"prompt": "hi", "metadata": "[1]"}, [])
    with pytest.raises(FormError, match="format"):
        job_body({"prompt": "hi", "format": "yaml"}, [])
