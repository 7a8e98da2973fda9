"""`response_format` at submission, over real HTTP (no worker consumes the queue): every kind is
accepted and stored with the job's input; a constraint the grammar library cannot build is a 422
problem (an OpenAI error object on the OpenAI endpoints) naming the offending part, and no job."""
from __future__ import annotations

import json

import pytest
import requests

from app.api import create_app
from app.jobs.inputs import GenerationInput
from app.jobs.response_format import MAX_SCHEMA_BYTES
from tests.support.service import ServerThread, service_settings

PERSON = {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[A-Z][a-z]+$"},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                                    "minItems": 1, "maxItems": 3},
                                           "note": {"type": "string", "default": None}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with service_settings(tmp_path_factory.mktemp("formats"), model_name="tiny") as settings, \
            ServerThread(create_app(settings)) as server:
        yield server


@pytest.fixture(scope="module")
def api(server):
    return server.url


def submit(api, response_format, **body):
    return requests.post(f"{api}/v1/jobs", json={"prompt": "hello", "max_tokens": 4, "response_format": response_format,
                                                 **body}, timeout=30)


@pytest.mark.parametrize("response_format", [
    {"type": "text"},
    {"type": "json_object"},
    {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
    {"type": "regex", "pattern": r"\d{3}-\d{4}"},
    {"type": "choice", "choices": ["yes", "no", "maybe"]},
    {"type": "grammar", "grammar": 'start: "ab" | "cd"'},
])
def test_every_kind_is_accepted_and_shown_with_the_job(api, response_format):
    response = submit(api, response_format)
    assert response.status_code == 202, response.text
    job = requests.get(response.json()["urls"]["self"], timeout=10).json()
    assert job["input"]["response_format"] == response_format    # the schema's own null default kept


def bad(api, response_format, *, field="response_format"):
    response = submit(api, response_format)
    assert response.status_code == 422, response.text
    assert response.headers["Content-Type"] == "application/problem+json"
    errors = response.json()["errors"]
    assert errors[0]["field"] == field
    return errors[0]["message"]


def test_a_bad_type_deep_in_a_schema_is_named_by_its_path(api):
    schema = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "strng"}}}}
    message = bad(api, {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert "json_schema.schema['properties']['items']['items']" in message and "strng" in message


def test_an_unsupported_keyword_is_named_with_its_path(api):
    schema = {"type": "object", "properties": {"ids": {"type": "array", "uniqueItems": True}}}
    message = bad(api, {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert "json_schema.schema['properties']['ids']" in message and "uniqueItems" in message


def test_a_regex_the_library_rejects(api):
    assert "unclosed group" in bad(api, {"type": "regex", "pattern": "a(b"})


def test_a_grammar_the_library_rejects(api):
    assert "grammar" in bad(api, {"type": "grammar", "grammar": "start: undefined_rule"})


def test_choices_must_be_a_nonempty_list_of_distinct_strings(api):
    bad(api, {"type": "choice", "choices": []}, field="response_format.choice.choices")
    assert "differ" in bad(api, {"type": "choice", "choices": ["a", "a"]})
    bad(api, {"type": "choice", "choices": ["a", 1]}, field="response_format.choice.choices.1")


def test_a_schema_over_the_size_limit_says_which_limit(api):
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 200}
                                               for i in range(400)}}
    assert len(json.dumps(schema)) > MAX_SCHEMA_BYTES
    message = bad(api, {"type": "json_schema", "json_schema": {"name": "big", "schema": schema}})
    assert str(MAX_SCHEMA_BYTES) in message


def test_unknown_kinds_and_misspelled_fields(api):
    bad(api, {"type": "xml"})
    bad(api, {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "stict": True}},
        field="response_format.json_schema.json_schema.stict")
    bad(api, {"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}},
        field="response_format.json_schema.json_schema.name")


def test_openai_endpoints_answer_a_bad_schema_with_an_openai_error(api):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
                                    "a": {"type": "strng"}}}}}}
    for path, payload in (("/v1/chat/completions", body),
                          ("/v1/completions", {**{k: v for k, v in body.items() if k != "messages"}, "prompt": "hi"})):
        response = requests.post(f"{api}{path}", json=payload, timeout=30)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "response_format" and "['properties']['a']" in error["message"], error


def test_the_engine_receives_the_constraint():
    """What the worker builds `SamplingParams` from: one field per kind, nothing for free text."""
    def kwargs(fmt):
        return {k: v for k, v in GenerationInput.model_validate(
            {"prompt": "x", "response_format": fmt}).sampling_kwargs().items() if k in ("json", "regex", "choice",
                                                                                       "grammar")}
    assert kwargs({"type": "text"}) == {}
    assert kwargs({"type": "json_object"}) == {"json": True}
    assert kwargs({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}) == {"json": PERSON}
    assert kwargs({"type": "regex", "pattern": "a+"}) == {"regex": "a+"}
    assert kwargs({"type": "choice", "choices": ["x", "y"]}) == {"choice": ["x", "y"]}
    assert kwargs({"type": "grammar", "grammar": 'start: "a"'}) == {"grammar": 'start: "a"'}


def test_genq_submit_json_schema_file(api, server, tmp_path):
    import subprocess
    import sys

    schema_file = tmp_path / "person card.json"
    schema_file.write_text(json.dumps(PERSON))
    env = {"PATH": "/usr/bin:/bin", "GENQ_HOME": str(tmp_path / "home"), "GENQ_API_KEY": server.api_key}
    done = subprocess.run([sys.executable, "-m", "app.cli", "submit", "--url", api, "--chat", "--json-schema",
                           str(schema_file), "Describe Ada"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    job = requests.get(json.loads(done.stdout)["urls"]["self"], timeout=10).json()
    assert job["input"]["response_format"] == {"type": "json_schema",
                                               "json_schema": {"name": "person_card", "schema": PERSON}}
    schema_file.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "strng"}}}))
    bad_run = subprocess.run([sys.executable, "-m", "app.cli", "submit", "--url", api, "--json-schema",
                              str(schema_file), "x"], capture_output=True, text=True, env=env, timeout=60)
    assert bad_run.returncode == 1 and "error 422" in bad_run.stderr and "strng" in bad_run.stderr
    schema_file.write_text("{not json")
    unreadable = subprocess.run([sys.executable, "-m", "app.cli", "submit", "--url", api, "--json-schema",
                                 str(schema_file), "x"], capture_output=True, text=True, env=env, timeout=60)
    assert unreadable.returncode == 2 and "--json-schema" in unreadable.stderr
