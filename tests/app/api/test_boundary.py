"""The input boundary: the OpenAPI document is generated from the validating models, schemathesis
finds no 5xx and no response that breaks the document, and a hostile corpus gets 4xx problem+json
every time, with the service healthy afterwards."""
from __future__ import annotations

import re

import json

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.api import create_app
from app.api.job_request import JobCreate
from app.openai.formats import ChatCompletionRequest
from tests.support.service import ServerThread, build_tiny, create_test_key, service_settings

PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("boundary")
    with service_settings(tmp, model=str(build_tiny(tmp / "model")), model_name="tiny") as settings:
        yield settings


@pytest.fixture(scope="module")
def app(settings):
    return create_app(settings)


@pytest.fixture(scope="module")
def key(app):
    return create_test_key(app, "boundary", rate_limit_per_minute=100_000)


@pytest.fixture(scope="module")
def api(app):
    with ServerThread(app) as server:
        yield server.url


@pytest.fixture(scope="module")
def openapi_schema(settings):
    # Without the model's files the API does not measure prompts: random max_tokens (up to 10^6)
    # are then accepted, and generated bodies reach the database and the queue, not only the 422s.
    return schemathesis.openapi.from_wsgi("/openapi.json", create_app(settings.with_(model=None)))


def test_openapi_document_is_3_1_and_built_from_the_request_models(app):

    document = app.test_client().get("/openapi.json").get_json()
    assert document["openapi"].startswith("3.1")
    create = document["components"]["schemas"]["JobCreate"]
    assert create["additionalProperties"] is False
    assert set(create["properties"]) == set(JobCreate.model_fields)
    assert create["properties"]["max_tokens"]["minimum"] == 1
    assert document["security"] == [{"bearer": []}]
    assert document["paths"]["/healthz"]["get"]["security"] == []
    for path, item in document["paths"].items():
        for operation in item.values():
            assert "responses" in operation, path


def test_every_route_of_the_app_is_in_the_openapi_document(app):
    """A blueprint's route missing from /openapi.json (as GET /v1/jobs/{id}/webhooks once was) fails here.
    The web console's pages (/ui, HTML for people, docs/console.md) are not API operations."""
    document = app.test_client().get("/openapi.json").get_json()
    documented = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    routes = {(method, re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule))
              for rule in app.url_map.iter_rules() if rule.endpoint != "static" and not rule.rule.startswith("/ui")
              for method in rule.methods - {"HEAD", "OPTIONS"}}
    assert routes - {("GET", "/openapi.json")} <= documented, sorted(routes - documented)


def test_openapi_document_lists_the_openai_compatible_endpoints(app):

    document = app.test_client().get("/openapi.json").get_json()
    operations = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    assert {("GET", "/v1/models"), ("GET", "/v1/models/{model_id}"), ("POST", "/v1/completions"),
            ("POST", "/v1/chat/completions"), ("POST", "/v1/files"), ("GET", "/v1/files"),
            ("GET", "/v1/files/{file_id}"), ("GET", "/v1/files/{file_id}/content"), ("POST", "/v1/batches"),
            ("GET", "/v1/batches"), ("GET", "/v1/batches/{batch_id}"),
            ("POST", "/v1/batches/{batch_id}/cancel")} <= operations
    schemas = document["components"]["schemas"]
    chat = document["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == \
        {"$ref": "#/components/schemas/ChatCompletionRequest"}
    assert set(schemas["ChatCompletionRequest"]["properties"]) == set(ChatCompletionRequest.model_fields)
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert chat["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/OpenAIError")
    assert "application/problem+json" in chat["responses"]["401"]["content"]
    batch = schemas["Batch"]
    assert "cancelling" in batch["properties"]["status"]["enum"] and "request_counts" in batch["required"]


def test_the_documented_openai_responses_are_what_the_endpoints_answer(api, key, settings):
    """A file, a batch and the model, checked against their schemas in the document (the
    generation endpoints are checked end to end in tests/e2e/test_openai.py)."""
    import jsonschema

    document = requests.get(f"{api}/openapi.json", timeout=30).json()
    auth = {"Authorization": f"Bearer {key}"}

    def check(response, schema_name):
        assert response.status_code == 200, response.text
        schema = {"$ref": f"#/components/schemas/{schema_name}", "components": document["components"]}
        jsonschema.validate(response.json(), schema)
        return response.json()

    line = {"custom_id": "a", "method": "POST", "url": "/v1/completions",
            "body": {"model": settings.model_name, "prompt": "x", "max_tokens": 2}}
    file = check(requests.post(f"{api}/v1/files", data={"purpose": "batch"}, headers=auth, timeout=30,
                               files={"file": ("in.jsonl", (json.dumps(line) + "\n").encode())}), "FileObject")
    check(requests.get(f"{api}/v1/files/{file['id']}", headers=auth, timeout=30), "FileObject")
    check(requests.get(f"{api}/v1/files", headers=auth, timeout=30), "FileList")
    batch = check(requests.post(f"{api}/v1/batches", headers=auth, timeout=30, json={
        "input_file_id": file["id"], "endpoint": "/v1/completions", "completion_window": "24h",
        "metadata": {"k": "v"}}), "Batch")
    check(requests.get(f"{api}/v1/batches/{batch['id']}", headers=auth, timeout=30), "Batch")
    check(requests.get(f"{api}/v1/batches?limit=5", headers=auth, timeout=30), "BatchList")
    check(requests.post(f"{api}/v1/batches/{batch['id']}/cancel", headers=auth, timeout=30), "Batch")
    check(requests.get(f"{api}/v1/models", headers=auth, timeout=30), "ModelList")
    missing = requests.get(f"{api}/v1/batches/batch_nope", headers=auth, timeout=30)
    assert missing.status_code == 404
    jsonschema.validate(missing.json(), {"$ref": "#/components/schemas/OpenAIError",
                                         "components": document["components"]})


# A valid request to these waits for its job's result, or (/health: 503 until a worker is warm, tested
# in test_jobs.py and tests/e2e/test_service.py) reports on the workers, and no worker runs here.
WAIT_FOR_A_WORKER = {"/v1/completions", "/v1/chat/completions", "/health"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]


def test_schemathesis_no_5xx_and_responses_match_the_document(openapi_schema, key):
    """Every operation of /openapi.json, 25 generated cases each (positive and negative), called in
    process (WSGI). schemathesis' own pytest plugin does not run under pytest 9, so hypothesis drives it."""
    failures, statuses = {}, {}
    for result in openapi_schema.get_all_operations():
        operation = result.ok()
        if operation.path in WAIT_FOR_A_WORKER:
            continue

        @given(case=operation.as_strategy())
        @hypothesis_settings(max_examples=25, deadline=None, derandomize=True, database=None,
                             suppress_health_check=list(HealthCheck))
        def check(case):
            response = case.call_and_validate(headers={"Authorization": f"Bearer {key}"}, checks=CHECKS)
            statuses.setdefault(operation.label, set()).add(response.status_code)

        try:
            check()
        except Exception as exc:   # noqa: BLE001 - collect every operation's failure, then report them all
            failures[operation.label] = f"{type(exc).__name__}: {exc}"[:2000]
    assert failures == {}
    assert len(statuses) >= 9 and {202, 422} <= statuses["POST /v1/jobs"], statuses


NESTED = "[" * 100_000 + "]" * 100_000
HOSTILE_BODIES = {
    "invalid utf-8": b'{"prompt": "\xff\xfe\xc3\x28"}',
    "lone surrogate escape": b'{"prompt": "\\ud800"}',
    "lone surrogate in metadata": b'{"prompt": "x", "metadata": {"k": "\\udc00", "\\ud800": 1}}',
    "10 MB body": b'{"prompt": "' + b"x" * (10 * 1024 * 1024) + b'"}',
    "deeply nested": NESTED.encode(),
    "deep metadata": ('{"prompt": "x", "metadata": {"a": ' + "[" * 40 + "]" * 40 + "}}").encode(),
    "NaN": b'{"prompt": "x", "temperature": NaN}',
    "Infinity": b'{"prompt": "x", "top_p": Infinity}',
    "-Infinity in metadata": b'{"prompt": "x", "metadata": {"v": -Infinity}}',
    "huge integer": b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",
    "big integer": b'{"prompt": "x", "seed": 99999999999999999999999999}',
    "huge float": b'{"prompt": "x", "temperature": 1e999}',
    "1M-character prompt": json.dumps({"prompt": "a b c " * 166_667}).encode(),
    "control characters in metadata": json.dumps({"prompt": "x", "metadata": {"k": "a\x1b[31mred\x07"}}).encode(),
    "control characters in metadata key": json.dumps({"prompt": "x", "metadata": {"\x01": "v"}}).encode(),
    "raw control character": b'{"prompt": "a\x01b"}',
    "NUL": b'{"prompt": "a\\u0000b"}',
    "not an object": b'"just a string"',
    "null": b"null",
    "empty": b"",
    "duplicate-looking keys": b'{"prompt": "x", "prompt ": "y"}',
    "wrong types": b'{"prompt": ["x"], "max_tokens": "1", "priority": true}',
    "truncated": b'{"prompt": "x"',
    "trailing garbage": b'{"prompt": "x"} {"prompt": "y"}',
    "utf-16": '{"prompt": "x", "max_tokens": -5}'.encode("utf-16"),
    "sql in model": b'{"prompt": "x", "model": "tiny\'; DROP TABLE jobs; --"}',
    "too many stop strings": json.dumps({"prompt": "x", "stop": ["s"] * 100}).encode(),
    "huge metadata": json.dumps({"prompt": "x", "metadata": {"k": "v" * 20_000}}).encode(),
}


@pytest.mark.parametrize("name", list(HOSTILE_BODIES))
def test_hostile_bodies_are_4xx_problems(api, key, name):
    response = requests.post(f"{api}/v1/jobs", data=HOSTILE_BODIES[name], timeout=60,
                             headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, (name, response.status_code, response.text[:300])
    assert response.headers["Content-Type"] == PROBLEM
    problem = response.json()
    assert problem["status"] == response.status_code and problem["detail"]


HOSTILE_REQUESTS = [
    ("GET", "/v1/jobs/' OR '1'='1", {}),
    ("GET", "/v1/jobs/1%20OR%201=1;--", {}),
    ("GET", "/v1/jobs/..%2F..%2Fetc%2Fpasswd", {}),
    ("GET", "/v1/jobs/../../etc/passwd", {}),
    ("GET", "/v1/jobs/%00", {}),
    ("GET", "/v1/jobs/" + "a" * 10_000, {}),
    ("POST", "/v1/jobs/x'%3B%20DELETE%20FROM%20jobs%3B--/cancel", {}),
    ("GET", "/v1/jobs/*/events", {}),
    ("GET", "/v1/jobs/01m8aaaaaaaaaaaaaaaaaaaaaa/events", {"Last-Event-ID": "1-1' OR 1=1"}),
    ("GET", "/v1/jobs?status=queued'%20OR%201=1", {}),
    ("GET", "/v1/jobs?limit=" + "9" * 5000, {}),
    ("GET", "/v1/jobs?limit=-1", {}),
    ("GET", "/v1/jobs?cursor=" + "%FF" * 10, {}),
    ("GET", "/v1/jobs?cursor=ajonIE9SIDE9MQ", {}),
    ("POST", "/v1/jobs", {"Content-Type": "text/plain"}),
    ("POST", "/v1/jobs", {"Content-Type": "application/x-www-form-urlencoded"}),
    ("POST", "/v1/jobs", {"Content-Type": "application/json", "Idempotency-Key": "\u00e9t\u00e9"}),
]


@pytest.mark.parametrize("method, path, headers", HOSTILE_REQUESTS)
def test_hostile_ids_queries_and_headers_are_4xx_problems(api, key, method, path, headers):
    response = requests.request(method, f"{api}{path}", data=b'{"prompt": "x"}', timeout=30,
                                headers={"Authorization": f"Bearer {key}", **headers})
    assert 400 <= response.status_code < 500, (path, response.status_code, response.text[:300])
    assert response.headers["Content-Type"] == PROBLEM


HOSTILE_OPENAI_REQUESTS = [
    ("GET", "/v1/batches/a%00b", {}),
    ("POST", "/v1/batches/batch_' OR '1'='1/cancel", {}),
    ("GET", "/v1/batches?after=a%00b", {}),
    ("GET", "/v1/files/file-%00", {}),
    ("GET", "/v1/files/%F0%9F%92%A9/content", {}),
    ("POST", "/v1/batches", {"json": {"input_file_id": "\u00b6\u0000", "endpoint": "/v1/completions",
                                      "completion_window": "24h"}}),
    ("POST", "/v1/batches", {"json": {"input_file_id": "file-x", "endpoint": "/v1/completions",
                                      "completion_window": "24h", "metadata": {"k": "a\u0000b"}}}),
    ("POST", "/v1/files", {"data": {"purpose": "batch"}, "files": {"file": ("a\x00b.jsonl", b"{}\n")}}),
]


@pytest.mark.parametrize("method, path, kwargs", HOSTILE_OPENAI_REQUESTS)
def test_hostile_openai_ids_and_bodies_are_4xx_openai_errors(api, key, method, path, kwargs):
    response = requests.request(method, f"{api}{path}", timeout=30, headers={"Authorization": f"Bearer {key}"},
                                **kwargs)
    assert 400 <= response.status_code < 500, (path, response.status_code, response.text[:300])
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_the_service_is_healthy_after_the_corpus(api, key):
    assert requests.get(f"{api}/healthz", timeout=10).status_code == 200
    assert requests.get(f"{api}/readyz", timeout=10).status_code == 200
    response = requests.post(f"{api}/v1/jobs", json={"prompt": "still fine", "max_tokens": 2}, timeout=30,
                             headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 202
    assert requests.get(response.json()["urls"]["self"], headers={"Authorization": f"Bearer {key}"},
                        timeout=10).json()["status"] == "queued"
