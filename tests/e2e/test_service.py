"""The service end to end: HTTP API + a real Celery worker process + Redis + the database."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from app.cli.client import JobsClient
from worker.engine import LLMEngine, SamplingParams

pytestmark = pytest.mark.timeout(300)   # a stuck stream fails fast instead of holding CI

N_JOBS = 50
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def client(stack):
    _, url, _ = stack
    return JobsClient(url, timeout=120)


def offline_outputs(model_dir, prompts, max_tokens):
    engine = LLMEngine(str(model_dir), num_kv_blocks=2048, max_num_seqs=64)
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out.outputs[0]
    return [done[i] for i in range(len(prompts))]


def collect(client, job_id, last_event_id=None):
    return list(client.events(job_id, last_event_id=last_event_id, timeout=120))


def streamed_text(events):
    return "".join(e.data["text"] for e in events if e.event == "token")


def worker_engine_stats(url):
    workers = requests.get(f"{url}/v1/workers", timeout=10).json()["data"]
    assert len(workers) == 1
    return workers[0]["engine"]


def test_fifty_concurrent_jobs_batch_and_match_the_engine(stack, client, tiny_model_dir):
    _, url, worker = stack
    prompts = [f"Job number {i} says: the quick brown fox" for i in range(N_JOBS)]
    body = {"temperature": 0, "max_tokens": MAX_TOKENS}
    with ThreadPoolExecutor(max_workers=N_JOBS) as pool:
        responses = list(pool.map(lambda p: client.submit({"prompt": p, **body}), prompts))
    assert [r.status_code for r in responses] == [202] * N_JOBS
    ids = [r.json()["id"] for r in responses]
    with ThreadPoolExecutor(max_workers=N_JOBS) as pool:
        streams = list(pool.map(lambda job_id: collect(client, job_id), ids))
    polled = [client.wait(job_id) for job_id in ids]
    assert [job["status"] for job in polled] == ["succeeded"] * N_JOBS, worker.output()
    expected = offline_outputs(tiny_model_dir, prompts, MAX_TOKENS)
    for job, events, reference in zip(polled, streams, expected):
        assert job["output"]["text"] == streamed_text(events) == reference.text
        assert [t for e in events if e.event == "token" for t in e.data["token_ids"]] == reference.token_ids
        assert job["output"]["finish_reason"] == reference.finish_reason
        assert job["usage"]["completion_tokens"] == len(reference.token_ids)
        assert events[-1].event == "done" and events[-1].data["status"] == "succeeded"
        metrics = job["metrics"]
        assert metrics["queue_seconds"] is not None and metrics["time_to_first_token_seconds"] is not None
        assert metrics["generation_seconds"] is not None and job["attempts"] == 1
    stats = worker_engine_stats(url)
    assert stats["max_batch_size"] > 1          # jobs shared engine steps
    assert stats["generation_tokens"] >= N_JOBS * 1


def test_cancel_mid_generation(stack, client):
    _, url, _ = stack
    job = client.submit({"prompt": "Keep talking", "max_tokens": 1500, "ignore_eos": True,
                         "temperature": 0}).json()
    events = []
    for event in client.events(job["id"]):
        events.append(event)
        if event.event == "token":
            break
    response = client.cancel(job["id"])
    assert response.status_code == 200, response.text
    canceled = response.json()
    assert canceled["status"] == "canceled" and canceled["output"]["finish_reason"] == "abort"
    # (the text may still be empty: the byte-level tiny tokenizer's first token can be half a character)
    assert 0 < canceled["usage"]["completion_tokens"] < 1500
    rest = collect(client, job["id"], last_event_id=events[-1].id)
    assert streamed_text(events + rest) == canceled["output"]["text"]
    assert [e.event for e in rest][-2:] == ["status", "done"] and rest[-1].data["status"] == "canceled"
    problem = client.cancel(job["id"])
    assert problem.status_code == 409 and problem.headers["Content-Type"] == "application/problem+json"
    for _ in range(200):   # the aborted job's KV blocks are back in the pool
        stats = worker_engine_stats(url)
        if stats["jobs_in_flight"] == 0:
            break
        time.sleep(0.05)
    assert stats["jobs_in_flight"] == 0 and stats["kv_blocks_used"] == 0


def test_sse_resumes_with_last_event_id_without_loss_or_repeats(stack, client):
    job = client.submit({"prompt": "Resume me", "max_tokens": 40, "ignore_eos": True, "temperature": 0}).json()
    first = []
    for event in client.events(job["id"]):
        first.append(event)
        if sum(e.event == "token" for e in first) == 5:
            break                                    # the client drops the connection
    second = collect(client, job["id"], last_event_id=first[-1].id)
    final = client.get(job["id"])
    ids = [e.id for e in first + second]
    assert len(ids) == len(set(ids))
    assert [tuple(map(int, i.split("-"))) for i in ids] == sorted(tuple(map(int, i.split("-"))) for i in ids)
    assert streamed_text(first + second) == final["output"]["text"]
    assert second[-1].event == "done"
    replay = collect(client, job["id"])             # after completion: the whole log, then done
    assert [e.id for e in replay] == ids
    assert streamed_text(replay) == final["output"]["text"] and replay[-1].event == "done"


def test_prefer_wait_returns_the_finished_job(stack, client):
    response = client.submit({"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 5,
                              "temperature": 0}, wait=60)
    assert response.status_code == 201
    assert response.headers["Preference-Applied"] == "wait=60"
    job = response.json()
    assert job["status"] == "succeeded" and job["usage"]["completion_tokens"] >= 1
    assert job["completed_at"] and job["metrics"]["tokens_per_second"] is not None


def test_a_job_over_the_context_is_422_at_the_api(client):
    response = client.submit({"prompt": "x", "max_tokens": 100000})
    assert response.status_code == 422 and response.json()["max_model_len"] == 2048


def test_a_job_the_engine_rejects_fails_with_error_events(stack):
    # An API that cannot measure prompts (no model files here, and no worker has reported the model it
    # serves under this name) queues what the engine then refuses.
    from app.api import create_app
    from tests.support.service import ServerThread

    settings, _, _ = stack
    with ServerThread(create_app(settings.with_(model=None, model_name="unmeasured"))) as blind:
        client = JobsClient(blind.url, timeout=120, api_key=blind.api_key)
        response = client.submit({"prompt": "x", "max_tokens": 100000})
        assert response.status_code == 202, response.text
        job = response.json()
        events = collect(client, job["id"])
        final = client.get(job["id"])
    assert [e.event for e in events][-2:] == ["error", "done"]
    assert final["status"] == "failed" and final["error"]["type"] == "invalid_request"
    assert "max_model_len" in final["error"]["message"]
    assert events[-2].data == final["error"]


def test_metrics_show_worker_engine_and_jobs(stack):
    _, url, _ = stack
    text = requests.get(f"{url}/metrics", timeout=10).text
    assert 'genq_jobs{status="succeeded"}' in text
    assert "genq_engine_max_batch_size{" in text and "genq_workers 1.0" in text


def test_health_is_ok_once_a_worker_is_warm(stack):
    _, url, _ = stack
    health = requests.get(f"{url}/health", timeout=10)   # what vLLM-style clients probe
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "checks": {"database": "ok", "redis": "ok", "workers": 1}}
