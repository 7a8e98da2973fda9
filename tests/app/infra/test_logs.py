"""Structured logs: one line per job transition with its job_id (API and worker), JSON or text,
gunicorn's lines in the same format, and never a prompt, even at DEBUG."""
from __future__ import annotations

import io
import json
import logging
import logging.config

import pytest

from app.api import create_app
from app.infra.logs import JsonFormatter, TextFormatter, logging_config
from app.infra.settings import Settings
from app.jobs.transitions import JOB_LOGGER, log_job_transition
from tests.support.service import build_tiny, create_test_key, service_settings

SECRET = "Zebra-Quokka secret prompt 4711"


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("logging")
    with service_settings(tmp, model=str(build_tiny(tmp / "model")), max_num_seqs=4) as settings:
        yield settings


@pytest.fixture
def captured():
    """Every log record of every logger at DEBUG, as JSON lines."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("test"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


def test_each_transition_is_one_json_line_with_the_job_id_and_no_prompt(settings, captured):
    from worker.runtime import WorkerRuntime

    app = create_app(settings)                  # registers the transition hook (the worker does the same)
    runtime = WorkerRuntime(settings).start()
    try:
        key = create_test_key(app)
        response = app.test_client().post("/v1/jobs", json={"prompt": SECRET, "max_tokens": 4, "temperature": 0},
                                          headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 202
        job_id = response.get_json()["id"]
        assert runtime.run_job(job_id) == "succeeded"
    finally:
        runtime.stop()

    lines = [json.loads(line) for line in captured.getvalue().splitlines()]
    transitions = [line for line in lines if line["logger"] == JOB_LOGGER and line.get("job_id") == job_id]
    assert [line["event"] for line in transitions] == ["job.created", "job.started", "job.completed"]
    started, completed = transitions[1], transitions[2]
    assert started["attempt"] == 1 and started["worker_id"] == runtime.worker_id and started["queue_seconds"] >= 0
    assert completed["status"] == "succeeded" and completed["completion_tokens"] == 4
    assert completed["prompt_tokens"] > 0 and completed["finish_reason"] in ("stop", "length")
    assert all(line["level"] == "info" and line["service"] == "test" and line["ts"].endswith("Z")
               for line in transitions)
    assert SECRET not in captured.getvalue()   # every logger, at DEBUG


def test_text_format_reads_as_a_sentence_with_fields():
    record = logging.LogRecord(JOB_LOGGER, logging.INFO, __file__, 1, "job %s", ("completed",), None)
    record.job_id, record.status = "01abc", "succeeded"
    line = TextFormatter().format(record)
    assert line.endswith("INFO  genq.jobs: job completed job_id=01abc status=succeeded")


def test_failed_jobs_log_a_warning():
    logger = logging.getLogger(JOB_LOGGER)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        log_job_transition("completed", "01abc", {"status": "failed", "error_type": "engine_error", "text": SECRET})
        log_job_transition("output", "01abc", {"text": SECRET})     # tokens are not a transition
    finally:
        logger.removeHandler(handler)
    assert [(r.levelno, r.job_id, r.error_type) for r in records] == [(logging.WARNING, "01abc", "engine_error")]
    assert not hasattr(records[0], "text")


@pytest.mark.parametrize("log_format, level", [("json", "INFO"), ("text", "DEBUG")])
def test_gunicorn_lines_come_out_through_genq_formatter(log_format, level):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    gunicorn_error = logging.getLogger("gunicorn.error")
    saved_gunicorn = gunicorn_error.handlers[:], gunicorn_error.level, gunicorn_error.propagate
    try:
        logging.config.dictConfig(logging_config(Settings(log_format=log_format, log_level=level), "api"))
        (handler,) = root.handlers
        formatter = JsonFormatter if log_format == "json" else TextFormatter
        assert isinstance(handler.formatter, formatter) and root.level == getattr(logging, level)
        assert gunicorn_error.handlers == [] and gunicorn_error.propagate
        access = logging.getLogger("gunicorn.access")
        assert access.isEnabledFor(logging.INFO) == (level == "DEBUG")   # access lines only when debugging
        if log_format == "json":
            record = logging.LogRecord("gunicorn.error", logging.INFO, __file__, 1, "Booting worker", (), None)
            assert json.loads(handler.formatter.format(record))["service"] == "api"
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
        gunicorn_error.handlers[:] = saved_gunicorn[0]
        gunicorn_error.setLevel(saved_gunicorn[1])
        gunicorn_error.propagate = saved_gunicorn[2]
