"""Per-key serving figures on the API's /metrics (tokens, jobs, queue wait histogram), read from the
jobs table at scrape time: real HTTP, real database and Redis, jobs written through the store."""
from __future__ import annotations

from datetime import timedelta

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from app.api import create_app
from app.infra.db import utcnow
from app.jobs import store
from app.jobs.models import JobStatus
from app.tenancy.keys import create_key
from tests.support.service import ServerThread, service_settings


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("key-metrics")
    with service_settings(tmp, model_name="tiny") as settings:
        app = create_app(settings)
        with ServerThread(app) as server:
            yield app, server.url


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = requests.get(f"{url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def run_job(session, owner, created, wait, prompt, completion, status=JobStatus.SUCCEEDED):
    job = store.create_job(session, model="tiny", input={"prompt": "x"}, owner=owner, now=created)
    claimed = store.claim_job(session, job.id, "w1", 30, now=created + timedelta(seconds=wait))
    result = store.JobResult(status, output_text="", prompt_tokens=prompt, completion_tokens=completion,
                             error_type="engine_error" if status is JobStatus.FAILED else None)
    assert store.finish_job(session, job.id, "w1", claimed.attempts, result)


def test_per_key_tokens_jobs_and_queue_wait_histogram(served):
    app, url = served
    sessions = app.extensions["genq"].sessions
    base = utcnow() - timedelta(hours=1)
    with sessions.begin() as session:
        alice = create_key(session, "alice")[0].id
        bob = create_key(session, "bob")[0].id
        run_job(session, alice, base, 0.05, 10, 4)
        run_job(session, alice, base, 0.7, 20, 5)
        run_job(session, alice, base, 3, 30, 6, status=JobStatus.FAILED)
        run_job(session, bob, base, 45, 7, 8)
        run_job(session, bob, base, 400, 1, 2)
        run_job(session, None, base, 1, 100, 50)
        store.create_job(session, model="tiny", input={"prompt": "x"}, owner=alice, now=base)  # never started
        running = store.create_job(session, model="tiny", input={"prompt": "x"}, owner=bob, now=base)
        store.claim_job(session, running.id, "w1", 30, now=base + timedelta(seconds=2))   # started, not final

    samples = scrape(url)

    def value(name, **labels):
        return samples[(name, tuple(sorted(labels.items())))]

    assert (value("genq_key_prompt_tokens_total", key=alice), value("genq_key_completion_tokens_total", key=alice)) \
        == (60, 15)
    assert (value("genq_key_prompt_tokens_total", key=bob), value("genq_key_completion_tokens_total", key=bob)) \
        == (8, 10)
    assert (value("genq_key_prompt_tokens_total", key=""), value("genq_key_completion_tokens_total", key="")) \
        == (100, 50)
    assert {s: value("genq_key_jobs", key=alice, status=s) for s in ("queued", "running", "succeeded", "failed")} \
        == {"queued": 1, "running": 0, "succeeded": 2, "failed": 1}
    assert value("genq_key_jobs", key=bob, status="running") == 1

    def buckets(key):
        return {le: value("genq_key_queue_wait_seconds_bucket", key=key, le=le)
                for le in ("0.1", "0.5", "1.0", "2.0", "5.0", "10.0", "30.0", "60.0", "300.0", "+Inf")}

    assert buckets(alice) == {"0.1": 1, "0.5": 1, "1.0": 2, "2.0": 2, "5.0": 3, "10.0": 3, "30.0": 3, "60.0": 3,
                              "300.0": 3, "+Inf": 3}
    assert buckets(bob) == {"0.1": 0, "0.5": 0, "1.0": 0, "2.0": 1, "5.0": 1, "10.0": 1, "30.0": 1, "60.0": 2,
                            "300.0": 2, "+Inf": 3}
    assert buckets("")["1.0"] == 1 and buckets("")["0.5"] == 0
    assert value("genq_key_queue_wait_seconds_count", key=alice) == 3
    assert value("genq_key_queue_wait_seconds_sum", key=alice) == pytest.approx(3.75)
    assert value("genq_key_queue_wait_seconds_sum", key=bob) == pytest.approx(447)
