"""The fault matrix (`make test-slow PYTEST_ARGS=tests/e2e/test_fault_matrix.py`): one fault per test,
injected into real processes while jobs run, on a cluster of our own — a PostgreSQL server, a
redis-server, the API (`genq api`, gunicorn) and two `genq worker` processes on the tiny model.

Each test submits a burst of short jobs, each with a `job.completed` webhook to a local receiver,
keeps submitting and polling through the fault, and then checks:

- nothing lost: every accepted (202) job ends `succeeded`;
- nothing answered twice: exactly one `job.completed` webhook event (webhook-id) per job, and a job
  ran more than once (`attempts` > 1) only if a killed or stopped worker held it;
- every answer during the window was a 2xx or a 503 with Retry-After (no other 5xx, no 4xx); only
  while the API itself is down may a request fail to connect;

and records how long the cluster took to recover (fault -> every accepted job final), printed at
the end as a table (docs/reliability.md, "The fault matrix").
"""
from __future__ import annotations

import contextlib
import json
import secrets
import signal
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
import requests
from sqlalchemy import select

from app.infra.db import session_factory
from app.infra.migrate import upgrade
from app.infra.settings import Settings
from app.jobs.models import FINAL_STATUSES, Job, JobStatus
from app.tenancy.keys import create_key
from tests.e2e.cluster import ApiServer, Cluster, PostgresServer, RedisServer, Worker
from tests.support.webhook_receiver import Receiver

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

FINAL = {s.value for s in FINAL_STATUSES}
BURST = 20                 # jobs submitted just before the fault
SUBMIT_EVERY = 0.25        # then one more every this long, through the fault
OUTAGE_SECONDS = 3.0       # how long a stopped dependency stays down
LEASE_SECONDS = 8.0        # longer than a dependency outage: a live worker's job is never run twice

RESULTS: list[dict] = []


@dataclass
class Answers:
    """Every answer the clients got during one test."""
    counts: Counter = field(default_factory=Counter)
    unexpected: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, what: str, response: requests.Response | None, error: Exception | None = None,
               ok: tuple[int, ...] = (200, 202)) -> None:
        if response is None:
            key = "connection refused/reset"
            bad = False   # judged by the test: allowed only while the API is down
        else:
            code = response.status_code
            retry_after = code == 503 and bool(response.headers.get("Retry-After"))
            key = f"{code}{' + Retry-After' if retry_after else ''}"
            bad = not (code in ok or retry_after)
        with self.lock:
            self.counts[key] += 1
            if bad:
                self.unexpected.append((what, response.status_code, response.text[:300]))


class Traffic:
    """Clients through a fault: a burst of submissions, then one every SUBMIT_EVERY seconds, and a
    poller reading jobs (GET /v1/jobs/{id}) and readiness (/readyz) all along."""

    def __init__(self, m: "Matrix", name: str, max_tokens: int):
        self.m, self.name, self.max_tokens = m, name, max_tokens
        self.hook_path = f"/ok/{secrets.token_hex(4)}"   # this test's deliveries
        self.answers = Answers()
        self.accepted: list[str] = []
        self.refused = 0
        self._local = threading.local()
        self._submitting = threading.Event()
        self._polling = threading.Event()
        self._threads: list[threading.Thread] = []
        self._count = 0
        self._lock = threading.Lock()

    def _http(self) -> requests.Session:
        http = getattr(self._local, "http", None)
        if http is None:
            http = self._local.http = requests.Session()
            http.headers["Authorization"] = f"Bearer {self.m.api_key}"
        return http

    def submit_one(self) -> None:
        with self._lock:
            i = self._count
            self._count += 1
        body = {"prompt": f"{self.name} job {i}", "max_tokens": self.max_tokens, "ignore_eos": True,
                "temperature": 0, "webhook": f"{self.m.receiver.url}{self.hook_path}",
                "webhook_events_filter": ["completed"]}
        try:
            response = self._http().post(f"{self.m.api.url}/v1/jobs", json=body, timeout=30)
        except requests.RequestException as exc:
            self.answers.record("POST /v1/jobs", None, exc)
            return
        self.answers.record("POST /v1/jobs", response, ok=(202,))
        if response.status_code == 202:
            with self._lock:
                self.accepted.append(response.json()["id"])

    def burst(self, n: int) -> None:
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda _: self.submit_one(), range(n)))

    def start(self) -> "Traffic":
        self._submitting.set()
        self._polling.set()
        self._threads = [threading.Thread(target=self._submit_loop, daemon=True),
                         threading.Thread(target=self._poll_loop, daemon=True)]
        for thread in self._threads:
            thread.start()
        return self

    def _submit_loop(self) -> None:
        while self._submitting.is_set():
            self.submit_one()
            time.sleep(SUBMIT_EVERY)

    def _poll_loop(self) -> None:
        i = 0
        while self._polling.is_set():
            i += 1
            try:
                if i % 5 == 0 or not self.accepted:
                    self.answers.record("GET /readyz", self._http().get(f"{self.m.api.url}/readyz", timeout=30))
                else:
                    job_id = self.accepted[i % len(self.accepted)]
                    self.answers.record("GET /v1/jobs/{id}",
                                        self._http().get(f"{self.m.api.url}/v1/jobs/{job_id}", timeout=30))
            except requests.RequestException as exc:
                self.answers.record("GET", None, exc)
            time.sleep(0.1)

    def stop_submitting(self) -> None:
        self._submitting.clear()
        self._threads[0].join(60)

    def stop(self) -> None:
        self._submitting.clear()
        self._polling.clear()
        for thread in self._threads:
            thread.join(60)


class Matrix(Cluster):
    final_timeout = 90.0
    final_poll = 0.2

    def __init__(self, settings: Settings, pg: PostgresServer, redis_server: RedisServer, api: ApiServer,
                 receiver: Receiver, tmp, api_key: str):
        self.settings, self.pg, self.redis, self.api = settings, pg, redis_server, api
        self.receiver, self.tmp, self.api_key = receiver, tmp, api_key
        self.sessions = session_factory(settings.database_url)
        self.workers: list[Worker] = []
        self.config = None        # pytest's, for printing past the capture

    def ensure_healthy(self) -> None:
        """What the previous test may have left down is up again: every test starts on a whole cluster."""
        if not self.pg.running:
            self.pg.start()
        if not self.redis.running:
            self.redis.start()
        if not self.api.alive:
            self.api.start()
        self.ensure_workers()
        deadline = time.monotonic() + 30
        while requests.get(f"{self.api.url}/readyz", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "the cluster is not ready"
            time.sleep(0.2)

    def _read(self, fn):
        """A read of the test's own, retried while the database is down."""
        deadline = time.monotonic() + 60
        while True:
            try:
                with self.sessions() as session:
                    return fn(session)
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def jobs(self, ids) -> dict[str, Job]:
        return self._read(lambda s: {j.id: j for j in s.scalars(select(Job).where(Job.id.in_(list(ids))))})

    def running(self) -> list[tuple[str, str | None]]:
        return self._read(lambda s: list(s.execute(select(Job.id, Job.worker_id)
                                                   .where(Job.status == JobStatus.RUNNING.value))))

    def running_on(self, worker: Worker) -> set[str]:
        return {job_id for job_id, worker_id in self.running() if worker_id and f"-{worker.pid}-" in worker_id}

    def wait_running(self, at_least: int, on: Worker | None = None, timeout: float = 30, why=None) -> None:
        deadline = time.monotonic() + timeout
        while (len(self.running_on(on)) if on else len(self.running())) < at_least:
            assert time.monotonic() < deadline, f"jobs never started: {why}"
            time.sleep(0.05)

    def completed_webhooks(self, path: str, ids, timeout: float = 60) -> tuple[dict[str, set[str]], Counter]:
        """(job id -> the distinct webhook-ids of its job.completed deliveries, job id -> deliveries),
        once every job has one (or the timeout passed)."""
        deadline = time.monotonic() + timeout
        while True:
            events: dict[str, set[str]] = defaultdict(set)
            deliveries: Counter = Counter()
            for delivery in self.receiver.at(path):
                payload = json.loads(delivery.body)
                if payload["type"] == "job.completed":
                    headers = {k.lower(): v for k, v in delivery.headers.items()}
                    events[payload["data"]["id"]].add(headers["webhook-id"])
                    deliveries[payload["data"]["id"]] += 1
            if all(events[i] for i in ids) or time.monotonic() > deadline:
                return {i: events[i] for i in ids}, deliveries
            time.sleep(0.2)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, tiny_model_dir, request):
    why = PostgresServer.available()
    if why:
        pytest.skip(f"cannot run a PostgreSQL server of our own: {why}")
    tmp = tmp_path_factory.mktemp("fault-matrix")
    prefix = f"genqtest-{secrets.token_hex(5)}"
    with PostgresServer() as pg, RedisServer(tmp / "redis") as redis_server, Receiver() as receiver:
        upgrade(pg.url)
        settings = Settings(
            home=str(tmp / "home"), database_url=pg.url, redis_url=redis_server.url, key_prefix=prefix,
            queue=f"{prefix}-jobs", model=str(tiny_model_dir), max_num_seqs=16, stats_interval_seconds=0.5,
            lease_seconds=LEASE_SECONDS, reconcile_interval_seconds=0.5, requeue_after_seconds=3, drain_seconds=1,
            max_attempts=5, torch_threads=1, webhook_allow_private=True, webhook_timeout_seconds=5,
            log_level="WARNING")
        with session_factory(pg.url).begin() as session:
            api_key = create_key(session, "fault-matrix")[1]
        api = ApiServer(settings, tmp / "api.log")
        m = Matrix(settings, pg, redis_server, api, receiver, tmp, api_key)
        m.config = request.config
        try:
            api.start()
            m.ensure_workers()
            yield m
        finally:
            for worker in m.workers:
                worker.close()
            api.close()
            _print_table(request.config)


def _write(config, lines: list[str]) -> None:
    """Lines on the terminal, past pytest's output capture."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None:
        return
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        for line in lines:
            reporter.write_line(line)


def _row(r: dict) -> str:
    batch = "-" if r["batch"] is None else f"{r['batch']:.1f}"
    return (f"{r['fault']:<34} {r['jobs']:>4} {r['down']:>6.1f} {r['recovery']:>10.1f} {r['webhooks']:>10.1f} "
            f"{batch:>7} {r['retried']:>7}  {r['answers']}  ({r['note'] or ''})")


HEADER = (f"{'fault':<34} {'jobs':>4} {'down s':>6} {'recovery s':>10} {'webhooks s':>10} {'batch s':>7} "
          f"{'retried':>7}  answers (note)")


def _print_table(config) -> None:
    if RESULTS:
        _write(config, ["", "fault matrix: recovery = fault injected -> every accepted job final; webhooks, "
                            "batch = -> every job.completed delivered, the batch completed", HEADER,
                        *map(_row, RESULTS)])


BATCH_LINES = 8


def start_batch(m: Matrix, max_tokens: int) -> str:
    """An OpenAI batch of BATCH_LINES completions, started before the fault (its lines run at batch
    priority, behind the jobs, a few at a time: they are in flight through the fault)."""
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {m.api_key}"
    lines = "".join(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/completions",
                                "body": {"model": m.settings.model_name, "prompt": f"batch line {i}",
                                         "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}}) + "\n"
                    for i in range(BATCH_LINES))
    file = http.post(f"{m.api.url}/v1/files", data={"purpose": "batch"}, timeout=30,
                     files={"file": ("lines.jsonl", lines.encode())})
    assert file.status_code == 200, file.text
    batch = http.post(f"{m.api.url}/v1/batches", timeout=30, json={
        "input_file_id": file.json()["id"], "endpoint": "/v1/completions", "completion_window": "24h"})
    assert batch.status_code == 200, batch.text
    return batch.json()["id"]


def wait_batch(m: Matrix, batch_id: str, timeout: float = 90) -> dict:
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {m.api_key}"
    deadline = time.monotonic() + timeout
    while True:
        state = http.get(f"{m.api.url}/v1/batches/{batch_id}", timeout=30).json()
        if state["status"] not in ("validating", "in_progress", "finalizing"):
            return state
        assert time.monotonic() < deadline, f"the batch never finished: {state}"
        time.sleep(0.2)


def run_fault(m: Matrix, name: str, inject, *, max_tokens: int = 200, wait_on=None, allow_refused: bool = False,
              may_retry=lambda: set(), batch: bool = False) -> dict:
    """Traffic (and with `batch`, an OpenAI batch), the fault (`inject()` returns once it is over:
    the dependency back, the signal sent), more traffic, then every check; returns the measurements."""
    m.ensure_healthy()
    traffic = Traffic(m, name, max_tokens)
    batch_id = start_batch(m, max_tokens) if batch else None
    traffic.burst(BURST)
    traffic.start()
    try:
        m.wait_running(2 if wait_on else 3, on=wait_on, why=traffic.answers.counts)
        fault_at = time.monotonic()
        note = inject()
        back_at = time.monotonic()
        time.sleep(1.5)   # a little more traffic on the recovering cluster
        traffic.stop_submitting()
        ids = list(traffic.accepted)
        jobs = m.wait_final(ids)
        final_at = time.monotonic()
        hooks, deliveries = m.completed_webhooks(traffic.hook_path, ids)
        hooks_at = time.monotonic()
        batch_state = wait_batch(m, batch_id) if batch_id else None
        batch_at = time.monotonic()
    finally:
        traffic.stop()
    lines = m._read(lambda s: list(s.scalars(select(Job).where(Job.batch_id == batch_id)))) if batch_id else []
    row = {"fault": name, "jobs": len(ids), "down": back_at - fault_at, "recovery": final_at - fault_at,
           "webhooks": hooks_at - fault_at, "batch": batch_at - fault_at if batch_id else None,
           "retried": sum(1 for j in [*jobs.values(), *lines] if j.attempts > 1),
           "answers": dict(sorted(traffic.answers.counts.items())), "note": note}
    RESULTS.append(row)
    if m.config is not None:
        _write(m.config, ["", _row(row)])

    assert len(ids) >= BURST, traffic.answers.counts
    assert {j.id: (j.status, j.error_type, j.error_message) for j in jobs.values() if j.status != "succeeded"} == {}
    assert traffic.answers.unexpected[:5] == []
    if not allow_refused:
        assert "connection refused/reset" not in traffic.answers.counts, traffic.answers.counts
    assert {i: len(events) for i, events in hooks.items() if len(events) != 1} == {}, "lost or duplicated webhooks"
    retried = {j.id for j in [*jobs.values(), *lines] if j.attempts > 1}
    assert retried <= may_retry(), f"jobs run twice though no worker holding them died: {retried - may_retry()}"
    if batch_id:
        assert batch_state["status"] == "completed", batch_state
        assert batch_state["request_counts"] == {"total": BATCH_LINES, "completed": BATCH_LINES, "failed": 0}
        assert len(lines) == BATCH_LINES
    return row


# -- the faults ---------------------------------------------------------------------------------------


def test_database_stopped_fast_and_started_mid_run(matrix):
    def inject():
        matrix.pg.stop()                 # fast shutdown: every session ended at once
        time.sleep(OUTAGE_SECONDS)
        matrix.pg.start()

    row = run_fault(matrix, "a. database stop (fast) + start", inject, batch=True)
    assert any(key.startswith("503") for key in row["answers"]), "the outage was never seen"


def test_database_connections_terminated_mid_run(matrix):
    def inject():
        ended = 0
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:   # every connection open at each moment, in use or idle
            ended += matrix.pg.terminate_connections()
            time.sleep(0.1)
        return f"{ended} connections terminated"

    row = run_fault(matrix, "b. pg_terminate_backend (all)", inject, batch=True)
    assert int(row["note"].split()[0]) > 0


def test_redis_killed_and_restarted_with_its_aof(matrix):
    def inject():
        matrix.redis.stop(signal.SIGKILL)
        time.sleep(OUTAGE_SECONDS)
        matrix.redis.start()             # appendonly, fsync always: every acknowledged write is back

    run_fault(matrix, "c. Redis SIGKILL + restart (AOF)", inject, batch=True)


def test_redis_killed_and_restarted_empty(matrix):
    def inject():
        matrix.redis.stop(signal.SIGKILL)
        matrix.redis.persistent = False  # from now on a Redis without persistence: it comes back empty
        matrix.redis.wipe()
        time.sleep(OUTAGE_SECONDS)
        matrix.redis.start()

    run_fault(matrix, "d. Redis SIGKILL + restart (empty)", inject, batch=True)


def test_api_killed_during_an_sse_stream_the_client_resumes_with_last_event_id(matrix):
    matrix.ensure_healthy()
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {matrix.api_key}"
    response = http.post(f"{matrix.api.url}/v1/jobs", timeout=30, json={
        "prompt": "a long one to stream", "max_tokens": 400, "ignore_eos": True, "temperature": 0})
    assert response.status_code == 202
    job_id = response.json()["id"]
    seen: list[tuple[str, str, dict]] = []     # (id, event, data) in the order the client got them
    reconnects = []

    def stream() -> None:
        last_id = None
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                with http.get(f"{matrix.api.url}/v1/jobs/{job_id}/events", headers=headers, stream=True,
                              timeout=30) as answer:
                    if answer.status_code != 200:
                        reconnects.append(answer.status_code)
                        time.sleep(0.2)
                        continue
                    from app.cli.client import iter_sse

                    for event in iter_sse(answer):
                        if event.id is not None:
                            last_id = event.id
                        seen.append((event.id, event.event, event.data))
                        if event.event == "done":
                            return
            except requests.RequestException as exc:
                reconnects.append(type(exc).__name__)
            time.sleep(0.2)

    streamer = threading.Thread(target=stream, daemon=True)
    streamer.start()
    deadline = time.monotonic() + 60
    while sum(1 for _, kind, _ in seen if kind == "token") < 10:
        assert time.monotonic() < deadline and streamer.is_alive(), seen[-3:]
        time.sleep(0.02)

    def inject():
        matrix.api.kill()                # SIGKILL: arbiter and workers, mid-stream
        time.sleep(1.0)
        matrix.api.start()
        return f"stream reconnects: {len(reconnects)}"

    run_fault(matrix, "e. API SIGKILL during SSE", inject, allow_refused=True)
    streamer.join(60)
    assert not streamer.is_alive() and seen and seen[-1][1] == "done"
    assert reconnects, "the stream was never cut"
    ids = [event_id for event_id, _, _ in seen if event_id is not None]
    assert len(ids) == len(set(ids)), "an event came twice"
    job = matrix.jobs([job_id])[job_id]
    assert job.status == "succeeded" and job.attempts == 1
    tokens = "".join(data["text"] for _, kind, data in seen if kind == "token")
    assert tokens == job.output_text and job.completion_tokens == 400


def test_worker_sigkilled_mid_run(matrix):
    matrix.ensure_healthy()
    victim = matrix.workers[0]
    held: set[str] = set()

    def inject():
        victim.kill()
        held.update(matrix.running_on(victim))   # its claims stay in the rows until another worker takes them
        return f"{len(held)} running job(s) on the killed worker"

    run_fault(matrix, "f. worker SIGKILL", inject, max_tokens=400, wait_on=victim, may_retry=lambda: held)
    assert held, "the kill hit no running job"


def test_worker_sigtermed_mid_run(matrix):
    matrix.ensure_healthy()
    victim = matrix.workers[0]
    held: set[str] = set()
    stop = threading.Event()

    def watch() -> None:                          # what it holds until it is gone (it hands them back)
        while not stop.is_set():
            held.update(matrix.running_on(victim))
            time.sleep(0.02)

    def inject():
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        time.sleep(0.1)
        code = victim.terminate(timeout=matrix.settings.drain_seconds + 45)
        stop.set()
        watcher.join(10)
        assert code == 0, victim.output()
        return f"exit {code}; {len(held)} job(s) held"

    # Jobs longer than the drain (1 s): the stopping worker hands them back and another one runs them.
    run_fault(matrix, "g. worker SIGTERM", inject, max_tokens=800, wait_on=victim, may_retry=lambda: held)
    assert held
