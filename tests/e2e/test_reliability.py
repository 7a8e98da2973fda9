"""Fault tests (issue 7): real worker processes killed and stopped, a real redis-server stopped and
restarted with its data, an engine step that raises. No accepted job is lost or answered twice."""
from __future__ import annotations

import json
import secrets
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests
from sqlalchemy import select

from app.cli.client import JobsClient
from app.infra.db import session_factory
from app.infra.settings import Settings
from app.jobs.models import FINAL_STATUSES, Job, JobStatus
from tests.support.service import ServerThread, database_for_tests, primary_database_kind
from tests.support.webhook_receiver import Receiver
from tests.e2e.cluster import Cluster as ClusterBase
from tests.e2e.cluster import RedisServer, Worker

pytestmark = pytest.mark.timeout(240)

FAULT_MARKER = "EXPLODE"
FINAL = {s.value for s in FINAL_STATUSES}


class Cluster(ClusterBase):
    """The API (real HTTP), two workers and a redis-server of our own, on the primary database."""

    def __init__(self, settings, api_url, redis_server, tmp, receiver):
        self.settings = settings
        self.receiver = receiver
        self.url = api_url
        self.redis_server = redis_server
        self.tmp = tmp
        self.client = JobsClient(api_url, timeout=60)
        self.sessions = session_factory(settings.database_url)
        self.workers: list[Worker] = []

    def submit(self, prompts, **body) -> list[str]:
        with ThreadPoolExecutor(max_workers=16) as pool:
            responses = list(pool.map(lambda p: self.client.submit({"prompt": p, **body}), prompts))
        assert [r.status_code for r in responses] == [202] * len(prompts), [r.text for r in responses]
        return [r.json()["id"] for r in responses]

    def running_on(self, worker: Worker) -> int:
        with self.sessions() as session:
            ids = session.scalars(select(Job.worker_id).where(Job.status == JobStatus.RUNNING.value))
            return sum(1 for worker_id in ids if worker_id and f"-{worker.pid}-" in worker_id)


class DoneCounter:
    """Counts `done` events per job on the live channels (what clients and waiters act on)."""

    def __init__(self, redis_url: str, prefix: str):
        self.client = redis.Redis.from_url(redis_url, decode_responses=True)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe(f"{prefix}:job:*:live")
        self.counts: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self.pubsub.get_message(timeout=0.5)
            if message and json.loads(message["data"]).get("type") == "done":
                self.counts[message["channel"].split(":")[-2]] += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.pubsub.close()
        self.client.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir):
    from app.api import create_app

    tmp = tmp_path_factory.mktemp("reliability")
    prefix = f"genqtest-{secrets.token_hex(5)}"
    with RedisServer(tmp / "redis") as redis_server, Receiver() as receiver, \
            database_for_tests(primary_database_kind(), tmp) as db_url:
        settings = Settings(
            home=str(tmp / "home"), database_url=db_url, redis_url=redis_server.url, key_prefix=prefix,
            queue=f"{prefix}-jobs", model=str(tiny_model_dir), max_num_seqs=16, stats_interval_seconds=0.2,
            lease_seconds=4, reconcile_interval_seconds=0.5, requeue_after_seconds=3, drain_seconds=1,
            max_attempts=5, torch_threads=1, fault_injection=f"step_error:{FAULT_MARKER}",
            webhook_allow_private=True)
        with ServerThread(create_app(settings)) as server:
            c = Cluster(settings, server.url, redis_server, tmp, receiver)
            try:
                yield c
            finally:
                for worker in c.workers:
                    worker.close()


def test_an_engine_step_that_raises_fails_its_jobs_and_the_next_jobs_succeed(cluster):
    cluster.ensure_workers()
    bad = cluster.submit([f"{FAULT_MARKER} number {i}" for i in range(3)], max_tokens=8, temperature=0)
    jobs = cluster.wait_final(bad)
    for job in jobs.values():
        assert job.status == "failed" and job.error_type == "engine_error"
        assert "injected step fault" in job.error_message
    good = cluster.submit([f"a calm prompt {i}" for i in range(6)], max_tokens=8, temperature=0)
    assert {job.status for job in cluster.wait_final(good).values()} == {"succeeded"}
    assert all(worker.alive for worker in cluster.workers)


def test_sigterm_drains_then_hands_the_rest_to_another_worker(cluster):
    cluster.ensure_workers()
    victim = cluster.workers[0]
    ids = cluster.submit([f"drain {i}" for i in range(12)], max_tokens=300, ignore_eos=True, temperature=0)
    deadline = time.monotonic() + 60
    while cluster.running_on(victim) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    code = victim.terminate(timeout=cluster.settings.drain_seconds + 45)
    assert code == 0, victim.output()
    jobs = cluster.wait_final(ids)
    assert {job.status for job in jobs.values()} == {"succeeded"}, {j.id: j.error_message for j in jobs.values()}
    assert all(job.completion_tokens == 300 for job in jobs.values())


def test_sigkill_mid_batch_loses_nothing_and_answers_each_job_once(cluster):
    cluster.ensure_workers()
    victim = cluster.workers[1]
    done = DoneCounter(cluster.settings.redis_url, cluster.settings.key_prefix)
    try:
        ids = cluster.submit([f"job {i} of sixty" for i in range(60)], max_tokens=64, ignore_eos=True,
                             temperature=0, webhook=f"{cluster.receiver.url}/ok/sigkill",
                             webhook_events_filter=["completed"])
        deadline = time.monotonic() + 60
        while cluster.running_on(victim) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        victim_pid = victim.pid
        victim.kill()
        jobs = cluster.wait_final(ids)
        time.sleep(1.0)   # the last done events
    finally:
        done.close()
    assert {job.status for job in jobs.values()} == {"succeeded"}, {j.id: j.error_message for j in jobs.values()}
    assert any(job.attempts > 1 for job in jobs.values()), "the kill hit no running job"
    assert [job_id for job_id in ids if done.counts[job_id] > 1] == []   # never answered twice
    # A job with no live `done` is one the victim finished as it died (its result written, the kill
    # before the publish: a step can finish many jobs at once); a follower still gets its `done`,
    # from the database.
    unannounced = [job_id for job_id in ids if done.counts[job_id] == 0]
    assert [job_id for job_id in unannounced if f"-{victim_pid}-" not in (jobs[job_id].worker_id or "")] == []
    for job_id in unannounced:
        events = list(cluster.client.events(job_id, timeout=30))
        assert events and events[-1].event == "done" and events[-1].data["status"] == "succeeded", events[-1:]
    completed = completed_webhooks(cluster.receiver, "/ok/sigkill", ids)
    assert {job_id: len(events) for job_id, events in completed.items() if len(events) != 1} == {}


def test_sigkill_with_two_keys_sharing_fairly_loses_nothing_and_charges_each_job_once(cluster):
    """Fair ordering on (the default): a worker killed while two keys' jobs are interleaved. Every
    job succeeds, none is answered twice, and each key's counter settled each job exactly once."""
    from app.jobs.fair_queue import served_cost
    from app.jobs.models import FairShare
    from app.tenancy.keys import create_key

    assert cluster.settings.scheduling == "fair"
    cluster.ensure_workers()
    victim = cluster.workers[0]
    with cluster.sessions.begin() as session:
        key_a, secret_a = create_key(session, "fair-a")
        key_b, secret_b = create_key(session, "fair-b", weight=2)
    done = DoneCounter(cluster.settings.redis_url, cluster.settings.key_prefix)
    try:
        clients = {key_a.id: JobsClient(cluster.url, api_key=secret_a), key_b.id: JobsClient(cluster.url, api_key=secret_b)}
        body = {"max_tokens": 48, "ignore_eos": True, "temperature": 0}
        ids = {key_a.id: [], key_b.id: []}
        for i in range(40):
            owner = key_a.id if i % 4 else key_b.id
            response = clients[owner].submit({"prompt": f"fair job {i}", **body})
            assert response.status_code == 202, response.text
            ids[owner].append(response.json()["id"])
        every = ids[key_a.id] + ids[key_b.id]
        deadline = time.monotonic() + 60
        while cluster.running_on(victim) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        victim.kill()
        jobs = cluster.wait_final(every)
        time.sleep(1.0)   # the last done events
    finally:
        done.close()
    assert {job.status for job in jobs.values()} == {"succeeded"}, {j.id: j.error_message for j in jobs.values()}
    assert any(job.attempts > 1 for job in jobs.values()), "the kill hit no running job"
    assert [job_id for job_id in every if done.counts[job_id] > 1] == []
    with cluster.sessions() as session:
        for owner, owned in ids.items():
            share = session.get(FairShare, owner)
            tokens = sum(jobs[i].prompt_tokens + jobs[i].completion_tokens for i in owned)
            assert share.served_tokens == tokens            # each job settled once, re-runs included
            for job_id in owned:
                job = jobs[job_id]
                assert job.fair_charge == served_cost(job.prompt_tokens, job.cached_tokens, job.completion_tokens)


def completed_webhooks(receiver, path, ids, timeout: float = 60) -> dict[str, set[str]]:
    """job id -> the distinct webhook-ids of its job.completed deliveries, once every job has one
    (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    while True:
        events: dict[str, set[str]] = defaultdict(set)
        for delivery in receiver.at(path):
            payload = json.loads(delivery.body)
            if payload["type"] == "job.completed":
                headers = {k.lower(): v for k, v in delivery.headers.items()}
                events[payload["data"]["id"]].add(headers["webhook-id"])
        if all(events[i] for i in ids) or time.monotonic() > deadline:
            return {i: events[i] for i in ids}
        time.sleep(0.5)


def test_redis_stopped_and_restarted_mid_run_loses_nothing(cluster):
    cluster.ensure_workers()
    statuses: list[int] = []
    accepted: list[str] = []
    ready_codes: list[int] = []
    stop = threading.Event()

    def submitter():
        i = 0
        while not stop.is_set():
            try:
                response = cluster.client.submit({"prompt": f"through the outage {i}", "max_tokens": 40,
                                                  "ignore_eos": True, "temperature": 0,
                                                  "webhook": f"{cluster.receiver.url}/ok/outage",
                                                  "webhook_events_filter": ["completed"]})
                statuses.append(response.status_code)
                if response.status_code in (201, 202):
                    accepted.append(response.json()["id"])
            except requests.RequestException as exc:
                statuses.append(repr(exc))
            i += 1
            time.sleep(0.1)

    streamed: list[str] = []
    long_job = cluster.submit(["a long one to stream"], max_tokens=400, ignore_eos=True, temperature=0)[0]
    accepted.append(long_job)

    def stream():
        streamed.extend(event.event for event in cluster.client.events(long_job, timeout=60))

    streamer = threading.Thread(target=stream, daemon=True)
    streamer.start()
    thread = threading.Thread(target=submitter, daemon=True)
    thread.start()
    time.sleep(1.5)
    cluster.redis_server.stop()
    time.sleep(0.5)
    ready_codes.append(requests.get(f"{cluster.url}/readyz", timeout=30).status_code)
    time.sleep(2.5)
    cluster.redis_server.start()
    time.sleep(1.5)
    stop.set()
    thread.join(60)
    streamer.join(60)
    assert streamed and streamed[-1] in ("error", "done") and not streamer.is_alive()   # ended, not hung
    assert ready_codes == [503]
    assert statuses and all(s in (201, 202, 503) for s in statuses), Counter(map(str, statuses))
    jobs = cluster.wait_final(accepted)
    assert {job.status for job in jobs.values()} == {"succeeded"}, {j.id: j.error_message for j in jobs.values()}
    assert requests.get(f"{cluster.url}/readyz", timeout=30).status_code == 200
    hooked = [job_id for job_id in accepted if job_id != long_job]
    completed = completed_webhooks(cluster.receiver, "/ok/outage", hooked)
    assert {job_id: len(events) for job_id, events in completed.items() if len(events) != 1} == {}


def test_openai_requests_and_a_batch_sent_while_redis_is_down_are_not_lost(cluster):
    """A non-streamed completion and a new batch are accepted during the outage, as POST /v1/jobs
    is: the request waits (polling the database) until the reconciler has sent the job, and the
    reconciler's batch sweep starts the batch. A streamed request cannot be served without Redis:
    503, and its job is failed rather than left to run for nobody."""
    cluster.ensure_workers()
    model, url = cluster.settings.model_name, cluster.url
    lines = "".join(json.dumps({"custom_id": f"out-{i}", "method": "POST", "url": "/v1/completions",
                                "body": {"model": model, "prompt": f"outage {i}", "max_tokens": 4}}) + "\n"
                    for i in range(12))
    file_id = requests.post(f"{url}/v1/files", data={"purpose": "batch"}, timeout=30,
                            files={"file": ("outage.jsonl", lines.encode())}).json()["id"]
    chat = {"model": model, "messages": [{"role": "user", "content": "still there?"}], "max_tokens": 6}
    answers: dict[str, requests.Response] = {}
    waiter = threading.Thread(target=lambda: answers.update(
        plain=requests.post(f"{url}/v1/chat/completions", json=chat, timeout=120)), daemon=True)
    cluster.redis_server.stop()
    try:
        batch = requests.post(f"{url}/v1/batches", timeout=60, json={
            "input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h"})
        waiter.start()
        streamed = requests.post(f"{url}/v1/chat/completions", json={**chat, "stream": True}, timeout=60)
        time.sleep(2.0)
    finally:
        cluster.redis_server.start()
    assert batch.status_code == 200 and batch.json()["status"] == "validating", batch.text
    assert streamed.status_code == 503 and streamed.json()["error"]["code"] == "queue_unavailable"
    waiter.join(110)
    plain = answers["plain"]
    assert plain.status_code == 200, plain.text
    assert plain.json()["choices"][0]["message"]["content"] and plain.json()["usage"]["completion_tokens"] >= 1
    deadline = time.monotonic() + 120
    while (state := requests.get(f"{url}/v1/batches/{batch.json()['id']}", timeout=30).json())["status"] != "completed":
        assert time.monotonic() < deadline and state["status"] in ("validating", "in_progress", "finalizing"), state
        time.sleep(0.5)
    assert state["request_counts"] == {"total": 12, "completed": 12, "failed": 0}
