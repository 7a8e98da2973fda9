"""Prometheus metrics of the API and of two workers on one host (each on its own GENQ_METRICS_PORT),
moving as jobs run. Real processes, real Redis and database; parsed with prometheus_client's parser."""
from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from app.api import create_app
from app.cli.client import JobsClient
from app.infra.broker import make_celery, queue_depth, send_run_job
from app.infra.channels import Channels
from app.infra.redis_client import kombu_url, redis_client
from tests.support.service import ServerThread, WorkerProcess, build_tiny, free_port, service_settings

N_JOBS = 12
MAX_TOKENS = 6
SHARED_PREFIX = "The service shares this long instruction between its jobs so the prefix cache can hit. " * 2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The API (in this process) and two `genq worker` processes sharing Redis and the database."""
    tmp = tmp_path_factory.mktemp("metrics")
    model = build_tiny(tmp / "model")
    ports = [free_port(), free_port()]
    with service_settings(tmp, model=str(model), max_num_seqs=8, worker_concurrency=3, lease_seconds=30,
                          stats_interval_seconds=0.1) as settings, \
            ServerThread(create_app(settings)) as api, \
            both_running([WorkerProcess(settings.with_(metrics_port=port), tmp / f"worker-{i}.log")
                          for i, port in enumerate(ports)]) as processes:
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        for url, process in zip(urls, processes):   # a start returns once any worker is live: wait for each
            wait_until(lambda: healthz(url) == 200, 120, process.output)
        wait_until(lambda: len(requests.get(f"{api.url}/v1/workers", timeout=10).json()["data"]) == 2, 30)
        yield settings, api.url, urls


@contextlib.contextmanager
def both_running(processes: list[WorkerProcess]):
    """Start (and later stop) the worker processes side by side: each takes seconds to load."""
    started = []

    def start(process):
        process.__enter__()
        started.append(process)

    try:
        with ThreadPoolExecutor(len(processes)) as pool:
            for future in [pool.submit(start, process) for process in processes]:
                future.result()
        yield processes
    finally:
        with ThreadPoolExecutor(len(processes)) as pool:
            list(pool.map(lambda process: process.__exit__(None, None, None), started))


def healthz(url: str) -> int | None:
    try:
        return requests.get(f"{url}/healthz", timeout=5).status_code
    except requests.ConnectionError:
        return None


def wait_until(predicate, seconds: float, details=lambda: ""):
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds}s\n{details()}")
        time.sleep(0.1)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a /metrics page: {(sample name, sorted labels): value}."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def names(samples: dict) -> set[str]:
    return {name for name, _ in samples}


def run_jobs(url: str, prompts: list[str]) -> list[dict]:
    client = JobsClient(url, timeout=120)
    body = {"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        responses = list(pool.map(lambda p: client.submit({"prompt": p, **body}), prompts))
    assert [r.status_code for r in responses] == [202] * len(prompts)
    return [client.wait(r.json()["id"]) for r in responses]


WORKER_METRICS = {
    "genq_num_requests_running", "genq_num_requests_waiting", "genq_kv_cache_usage_perc",
    "genq_kv_cache_blocks_used", "genq_kv_cache_blocks_total", "genq_prefix_cache_hits_total",
    "genq_prefix_cache_queries_total", "genq_num_preemptions_total", "genq_prompt_tokens_total",
    "genq_generation_tokens_total", "genq_time_to_first_token_seconds_count",
    "genq_inter_token_latency_seconds_count", "genq_request_queue_time_seconds_count",
    "genq_e2e_request_latency_seconds_count", "genq_jobs_in_flight",
}


def test_two_workers_on_one_host_serve_their_own_metrics_ports(cluster):
    _, api, workers = cluster
    assert len(set(workers)) == 2
    for url in workers:
        assert healthz(url) == 200
        samples = scrape(url)
        assert WORKER_METRICS - {"genq_time_to_first_token_seconds_count", "genq_inter_token_latency_seconds_count",
                                 "genq_request_queue_time_seconds_count",
                                 "genq_e2e_request_latency_seconds_count"} <= names(samples)
        assert total(samples, "genq_kv_cache_blocks_total") > 0
    assert total(scrape(api), "genq_workers") == 2


def test_metrics_move_after_jobs(cluster):
    settings, api, workers = cluster
    api_before = scrape(api)
    before = [scrape(url) for url in workers]

    prompts = [f"{SHARED_PREFIX}Job {i} asks:" for i in range(N_JOBS)]
    jobs = run_jobs(api, prompts[: N_JOBS // 2]) + run_jobs(api, prompts[N_JOBS // 2:])   # 2nd wave hits the cache
    assert [job["status"] for job in jobs] == ["succeeded"] * N_JOBS
    assert all(job["usage"]["completion_tokens"] == MAX_TOKENS for job in jobs)
    generated = N_JOBS * MAX_TOKENS

    # The engine counters come from a stats snapshot taken every stats_interval: wait for the last one.
    def worker_delta(name, **labels):
        return sum(total(scrape(url), name, **labels) - total(b, name, **labels) for url, b in zip(workers, before))
    wait_until(lambda: worker_delta("genq_generation_tokens_total") == generated, 10)

    after = [scrape(url) for url in workers]
    for samples in after:
        assert WORKER_METRICS <= names(samples)
        assert 0.0 <= total(samples, "genq_kv_cache_usage_perc") <= 1.0
        assert total(samples, "genq_num_requests_running") == 0 and total(samples, "genq_num_requests_waiting") == 0
    per_worker = [total(a, "genq_worker_jobs_total", status="succeeded") - total(b, "genq_worker_jobs_total",
                                                                                  status="succeeded")
                  for a, b in zip(after, before)]
    assert sum(per_worker) == N_JOBS and all(n > 0 for n in per_worker), per_worker   # both workers took jobs

    def delta(name, **labels):
        return sum(total(a, name, **labels) - total(b, name, **labels) for a, b in zip(after, before))
    for histogram in ("genq_time_to_first_token_seconds", "genq_request_queue_time_seconds",
                      "genq_e2e_request_latency_seconds"):
        assert delta(f"{histogram}_count") == N_JOBS, histogram
        assert delta(f"{histogram}_sum") > 0, histogram
    # One token per engine step per job: every token after a job's first is one inter-token gap.
    assert delta("genq_inter_token_latency_seconds_count") == N_JOBS * (MAX_TOKENS - 1)
    assert delta("genq_request_success_total", finished_reason="length") == N_JOBS
    assert delta("genq_request_generation_tokens_sum") == generated
    assert delta("genq_prompt_tokens_total") > 0
    assert delta("genq_prefix_cache_queries_total") > 0 and delta("genq_prefix_cache_hits_total") > 0
    assert delta("genq_engine_steps_total") >= MAX_TOKENS
    assert delta("genq_num_preemptions_total") == 0

    api_after = scrape(api)
    posted = dict(method="POST", endpoint="/v1/jobs")
    assert (total(api_after, "genq_http_requests_total", status="202", **posted)
            - total(api_before, "genq_http_requests_total", status="202", **posted)) == N_JOBS
    assert (total(api_after, "genq_http_request_duration_seconds_count", **posted)
            - total(api_before, "genq_http_request_duration_seconds_count", **posted)) == N_JOBS
    polled = dict(method="GET", endpoint="/v1/jobs/<job_id>", status="200")
    assert total(api_after, "genq_http_requests_total", **polled) >= N_JOBS
    assert total(api_after, "genq_jobs", status="succeeded") == N_JOBS
    assert total(api_after, "genq_queue_depth", queue=settings.queue) == 0
    assert total(api_after, "genq_engine_generation_tokens") >= generated


def test_queue_depth_counts_every_priority_list(cluster):
    """The gauge reads kombu's lists directly: compare it with kombu's own count for the same queue."""
    from kombu import Connection

    settings, _, _ = cluster
    idle = settings.with_(queue=f"{settings.queue}-idle")   # no worker listens to this one
    celery = make_celery(idle, settings.redis_url)
    for priority in (0, 3, 9, 9):
        send_run_job(celery, idle, f"no-such-job-{priority}", priority)
    redis = redis_client(settings.redis_url)
    channels = Channels(settings.key_prefix)
    with Connection(kombu_url(settings.redis_url),
                    transport_options=celery.conf.broker_transport_options) as connection:
        kombu_count = connection.default_channel.queue_declare(idle.queue).message_count
    assert queue_depth(redis, channels, idle.queue) == kombu_count == 4
