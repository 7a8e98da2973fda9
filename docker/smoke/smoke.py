#!/usr/bin/env python3
"""`make deploy-smoke`'s checks: genq's CPU stack in real containers, checked from outside.

Builds the images, starts docker-compose.yml + docker-compose.cpu.yml (+ docker/smoke/compose.smoke.yml)
under the project name `genq-smoke` with the monitoring profile, and talks to it only through its
published ports, `docker compose exec` (to create a key) and `docker kill` / `docker compose restart`
(the faults). One line per check, then a summary; exit status 1 when any check failed.

    1 up          every service healthy (`up -d --wait`); `migrate` ran once and exited 0
    2 jobs        a key from `genq keys create --json`; 20 jobs over REST all succeed with text;
                  one streamed over SSE equals its polled text
    3 webhooks    each of those jobs' `job.completed` reached a receiver on this host (the compose
                  network's gateway), signed with the key's secret
    4 kill        two workers; 40 jobs; one worker `docker kill`ed mid-run: every job succeeds, with
                  exactly one `job.completed` webhook each
    5 redis       `docker compose restart redis` mid-run: no accepted job lost; every API request made
                  meanwhile is answered (a status, never a hang)
    6 metrics     Prometheus's targets API shows the API and both workers `up`; the API's /metrics shows
                  the queue depth and the workers' engine gauges
    7 drain       `docker stop` (SIGTERM) of a worker holding jobs: it finishes them, exits 0 within its
                  grace period; no job runs twice
    8 down        SIGTERM stops every container within its grace period; `down -v` leaves nothing

Standard library only: it runs with the system's python3, before any virtual environment exists.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
PROJECT = os.environ.get("SMOKE_PROJECT", "genq-smoke")
FILES = ("docker-compose.yml", "docker-compose.cpu.yml", "docker/smoke/compose.smoke.yml")
TAG = "smoke"
WAIT_TIMEOUT = int(os.environ.get("SMOKE_WAIT_TIMEOUT", "900"))     # seconds for `up --wait`
JOB_TIMEOUT = float(os.environ.get("SMOKE_JOB_TIMEOUT", "600"))     # seconds for a batch of jobs to end
FINAL = {"succeeded", "failed", "canceled"}
PROMPTS = ("Write one sentence about the sea.", "Name three colours.", "What is the capital of France?",
           "Give me a short tip for learning to cook.", "Describe a cat in a few words.")


def log(message: str) -> None:
    print(f"deploy-smoke: {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- compose ----------------------------------------------------------------------------------------

class Compose:
    def __init__(self, env: dict[str, str]):
        self.env = env

    def command(self, *args: str) -> list[str]:
        files = [part for name in FILES for part in ("-f", str(ROOT / name))]
        return ["docker", "compose", "-p", PROJECT, "--project-directory", str(ROOT), *files,
                "--profile", "monitoring", *args]

    def run(self, *args: str, timeout: float | None = None, check: bool = True,
            quiet: bool = False) -> subprocess.CompletedProcess:
        done = subprocess.run(self.command(*args), env=self.env, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)
        if check and done.returncode != 0:
            raise Failure(f"`docker compose {' '.join(args)}` exited {done.returncode}: "
                          f"{(done.stderr or done.stdout)[-2000:]}")
        if not quiet and done.stderr.strip() and done.returncode != 0:
            log(done.stderr.strip()[-2000:])
        return done

    def containers(self, service: str | None = None) -> list[dict[str, Any]]:
        """`docker inspect` of this project's containers (every state), optionally one service's."""
        labels = ["--filter", f"label=com.docker.compose.project={PROJECT}"]
        if service:
            labels += ["--filter", f"label=com.docker.compose.service={service}"]
        ids = subprocess.run(["docker", "ps", "-aq", *labels], capture_output=True, text=True,
                             check=True).stdout.split()
        if not ids:
            return []
        out = subprocess.run(["docker", "inspect", *ids], capture_output=True, text=True, check=True).stdout
        return json.loads(out)


class Failure(Exception):
    pass


# -- HTTP -------------------------------------------------------------------------------------------

@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Api:
    def __init__(self, base: str):
        self.base = base
        self.key: str | None = None

    def request(self, method: str, path: str, body: Any = None, *, timeout: float = 30,
                headers: dict[str, str] | None = None) -> Reply:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.key:
            req.add_header("Authorization", f"Bearer {self.key}")
        for name, value in (headers or {}).items():
            req.add_header(name, value)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return Reply(resp.status, dict(resp.headers), resp.read())
        except urllib.error.HTTPError as exc:
            return Reply(exc.code, dict(exc.headers), exc.read())

    def submit(self, prompt: str, max_tokens: int, webhook: str | None = None, *, ignore_eos: bool = False) -> str:
        body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                                "temperature": 0, "ignore_eos": ignore_eos}
        if webhook:
            body["webhook"] = webhook
        reply = self.request("POST", "/v1/jobs", body)
        if reply.status not in (201, 202):
            raise Failure(f"POST /v1/jobs answered {reply.status}: {reply.body[:300]!r}")
        return reply.json()["id"]

    def wait_all(self, ids: list[str], timeout: float = JOB_TIMEOUT) -> dict[str, dict]:
        jobs: dict[str, dict] = {}
        deadline = time.monotonic() + timeout
        pending = list(ids)
        while pending and time.monotonic() < deadline:
            for job_id in list(pending):
                reply = self.request("GET", f"/v1/jobs/{job_id}")
                if reply.status == 200 and reply.json()["status"] in FINAL:
                    jobs[job_id] = reply.json()
                    pending.remove(job_id)
            if pending:
                time.sleep(1)
        if pending:
            raise Failure(f"{len(pending)} of {len(ids)} jobs not final after {timeout:.0f} s "
                          f"(e.g. {pending[0]})")
        return jobs

    def stream(self, job_id: str, timeout: float = 300) -> tuple[str, dict]:
        """The concatenated `token` texts of a job's SSE stream, and its `done` event."""
        req = urllib.request.Request(f"{self.base}/v1/jobs/{job_id}/events",
                                     headers={"Authorization": f"Bearer {self.key}"})
        text, event, done = [], None, None
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            for raw in resp:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event == "token":
                    text.append(json.loads(line[5:])["text"])
                elif line.startswith("data:") and event == "done":
                    done = json.loads(line[5:])
                    break
        if done is None:
            raise Failure(f"the SSE stream of {job_id} ended without `done`")
        return "".join(text), done


# -- webhooks ---------------------------------------------------------------------------------------

@dataclass
class Delivery:
    webhook_id: str
    event_type: str
    job_id: str
    verified: bool


@dataclass
class Receiver:
    """An HTTP server on this host that records (and verifies) every webhook delivery."""
    secret: str = ""
    deliveries: list[Delivery] = field(default_factory=list)

    def start(self) -> int:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.record(dict(self.headers), body)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("0.0.0.0", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self.server.server_address[1]

    def record(self, headers: dict[str, str], body: bytes) -> None:
        lowered = {k.lower(): v for k, v in headers.items()}
        msg_id, stamp = lowered.get("webhook-id", ""), lowered.get("webhook-timestamp", "")
        key = base64.b64decode(self.secret.removeprefix("whsec_"))
        expected = base64.b64encode(hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest())
        given = [s.split(",", 1)[1] for s in lowered.get("webhook-signature", "").split() if s.startswith("v1,")]
        verified = any(hmac.compare_digest(expected.decode(), s) for s in given) and \
            abs(time.time() - int(stamp or 0)) < 300
        payload = json.loads(body)
        self.deliveries.append(Delivery(msg_id, payload.get("type", ""), payload.get("data", {}).get("id", ""),
                                        verified))

    def completed(self, job_ids: list[str]) -> dict[str, list[Delivery]]:
        wanted = set(job_ids)
        seen: dict[str, list[Delivery]] = {job_id: [] for job_id in job_ids}
        for delivery in list(self.deliveries):
            if delivery.event_type == "job.completed" and delivery.job_id in wanted:
                seen[delivery.job_id].append(delivery)
        return seen

    def wait_completed(self, job_ids: list[str], timeout: float = 120) -> dict[str, list[Delivery]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = self.completed(job_ids)
            if all(seen.values()):
                time.sleep(3)      # a duplicate would come right behind
                return self.completed(job_ids)
            time.sleep(0.5)
        return self.completed(job_ids)


# -- the run ----------------------------------------------------------------------------------------

class Smoke:
    def __init__(self):
        self.ports = {name: free_port() for name in ("API_PORT", "PROMETHEUS_PORT", "REDIS_PORT",
                                                     "POSTGRES_PORT", "FLOWER_PORT")}
        env = {**os.environ, **{k: str(v) for k, v in self.ports.items()},
               "POSTGRES_PASSWORD": secrets.token_hex(16), "REDIS_PASSWORD": secrets.token_hex(16),
               "IMAGE_TAG": TAG}
        env.pop("COMPOSE_FILE", None)
        env.pop("COMPOSE_PROFILES", None)
        self.compose = Compose(env)
        self.api = Api(f"http://127.0.0.1:{self.ports['API_PORT']}")
        self.receiver = Receiver()
        self.webhook_url = ""
        self.results: list[tuple[str, bool, float, str]] = []

    def check(self, name: str, fn: Callable[[], str]) -> bool:
        start = time.monotonic()
        try:
            detail, ok = fn(), True
        except Failure as exc:
            detail, ok = str(exc), False
        except Exception as exc:   # a bug in a check is a failed check, with its reason
            detail, ok = f"{type(exc).__name__}: {exc}", False
        seconds = time.monotonic() - start
        self.results.append((name, ok, seconds, detail))
        print(f"{'PASS' if ok else 'FAIL'}  {name:<9} {seconds:7.1f} s  {detail}", flush=True)
        return ok

    # 0 -------------------------------------------------------------------------------------------
    def build(self) -> str:
        self.compose.run("build", timeout=3600)
        sizes = []
        for image in (f"genq-api:{TAG}", f"genq-worker-cpu:{TAG}"):
            size = json.loads(subprocess.run(["docker", "image", "inspect", image], capture_output=True,
                                             text=True, check=True).stdout)[0]["Size"]
            sizes.append(f"{image} {size / 1e6:.0f} MB")
        torch = subprocess.run(["docker", "run", "--rm", "--entrypoint", "python", f"genq-worker-cpu:{TAG}", "-c",
                                "import torch; print(torch.__version__, torch.version.cuda)"],
                               capture_output=True, text=True, timeout=300)
        if torch.returncode != 0 or not torch.stdout.strip().endswith("None"):
            raise Failure(f"the CPU worker image's torch is not a CPU build: {(torch.stdout + torch.stderr)[-300:]}")
        return "images: " + ", ".join(sizes)

    # 1 -------------------------------------------------------------------------------------------
    def up(self) -> str:
        self.compose.run("up", "-d", "--wait", "--wait-timeout", str(WAIT_TIMEOUT), timeout=WAIT_TIMEOUT + 120)
        states = {}
        for c in self.compose.containers():
            service = c["Config"]["Labels"]["com.docker.compose.service"]
            states.setdefault(service, []).append(c["State"])
        expected = {"redis", "postgres", "migrate", "api", "worker", "prometheus"}
        if set(states) != expected:
            raise Failure(f"services {sorted(states)}, expected {sorted(expected)}")
        migrate = states.pop("migrate")
        if len(migrate) != 1 or migrate[0]["Status"] != "exited" or migrate[0]["ExitCode"] != 0:
            raise Failure(f"migrate: {[(s['Status'], s['ExitCode']) for s in migrate]}")
        unhealthy = {name: [s.get("Health", {}).get("Status") for s in st] for name, st in states.items()
                     if any(s.get("Health", {}).get("Status") != "healthy" for s in st)}
        if unhealthy:
            raise Failure(f"not healthy: {unhealthy}")
        gateway = next(iter(self.compose.containers("api")[0]["NetworkSettings"]["Networks"].values()))["Gateway"]
        self.webhook_url = f"http://{gateway}:{self.receiver.start()}/hook"
        return f"{len(states)} services healthy, migrate exited 0 once; webhooks to {self.webhook_url}"

    # 2 -------------------------------------------------------------------------------------------
    def jobs(self) -> str:
        out = self.compose.run("exec", "-T", "api", "genq", "keys", "create", "--name", "deploy-smoke", "--json")
        key = json.loads(out.stdout.strip().splitlines()[-1])
        self.api.key, self.receiver.secret = key["key"], key["webhook_secret"]
        ids = [self.api.submit(PROMPTS[i % len(PROMPTS)], 24, self.webhook_url) for i in range(20)]
        streamed, done = self.api.stream(ids[0])
        jobs = self.api.wait_all(ids)
        bad = {i: (j["status"], j["error"]) for i, j in jobs.items() if j["status"] != "succeeded"}
        if bad:
            raise Failure(f"{len(bad)} of 20 jobs did not succeed: {list(bad.items())[:3]}")
        wordless = [i for i, j in jobs.items() if sum(w.isalpha() for w in j["output"]["text"].split()) < 2]
        if wordless:
            raise Failure(f"{len(wordless)} jobs answered without words, e.g. {jobs[wordless[0]]['output']!r}")
        polled = jobs[ids[0]]["output"]["text"]
        if not (streamed == polled == done["output"]["text"]):
            raise Failure(f"streamed {streamed!r} != polled {polled!r} (done: {done['output']['text']!r})")
        self.first_jobs = ids
        return f"20/20 succeeded; e.g. {PROMPTS[0]!r} -> {polled.strip()[:60]!r}; SSE text == polled text"

    # 3 -------------------------------------------------------------------------------------------
    def webhooks(self) -> str:
        seen = self.receiver.wait_completed(self.first_jobs)
        missing = [i for i, d in seen.items() if not d]
        if missing:
            raise Failure(f"{len(missing)} of 20 jobs' job.completed never arrived")
        unsigned = [d for ds in seen.values() for d in ds if not d.verified]
        if unsigned:
            raise Failure(f"{len(unsigned)} deliveries failed signature verification")
        return "20/20 job.completed deliveries, all signed with the key's secret"

    # 4 -------------------------------------------------------------------------------------------
    def kill(self) -> str:
        self.compose.run("up", "-d", "--wait", "--wait-timeout", str(WAIT_TIMEOUT), "--scale", "worker=2",
                         timeout=WAIT_TIMEOUT + 120)
        workers = [c for c in self.compose.containers("worker") if c["State"]["Running"]]
        if len(workers) != 2:
            raise Failure(f"{len(workers)} worker containers running after --scale worker=2")
        ids = [self.api.submit(PROMPTS[i % len(PROMPTS)], 128, self.webhook_url, ignore_eos=True) for i in range(40)]
        victim, held = self._busiest_worker(workers)
        subprocess.run(["docker", "kill", victim["Id"]], check=True, capture_output=True)
        killed_at = time.monotonic()
        jobs = self.api.wait_all(ids)
        recovered = time.monotonic() - killed_at
        bad = {i: (j["status"], j["error"]) for i, j in jobs.items() if j["status"] != "succeeded"}
        if bad:
            raise Failure(f"{len(bad)} of 40 jobs did not succeed after the kill: {list(bad.items())[:3]}")
        retried = sum(1 for j in jobs.values() if j["attempts"] > 1)
        if retried == 0:
            raise Failure(f"the killed worker held {held} jobs, yet no job ran a second time")
        seen = self.receiver.wait_completed(ids)
        counts = {i: len({d.webhook_id for d in ds}) for i, ds in seen.items()}
        deliveries = sum(len(ds) for ds in seen.values())
        wrong = {i: n for i, n in counts.items() if n != 1}
        if wrong:
            raise Failure(f"job.completed webhooks per job != 1 for {len(wrong)} jobs: {list(wrong.items())[:3]}")
        self.compose.run("up", "-d", "--wait", "--wait-timeout", str(WAIT_TIMEOUT), "--scale", "worker=2",
                         timeout=WAIT_TIMEOUT + 120)   # the killed one back, for the next checks
        return (f"killed {victim['Name'].lstrip('/')} with {held} jobs in flight; 40/40 succeeded ({retried} ran "
                f"again on the other worker), the last {recovered:.0f} s after the kill; one job.completed each "
                f"({deliveries} deliveries)")

    def _busiest_worker(self, workers: list[dict], timeout: float = 120, both: bool = True) -> tuple[dict, int]:
        """The worker container with the most jobs in its engine, once both workers (or one, with
        `both=False`) hold some (each worker's report names it: `<container hostname>-<pid>-<random>`)."""
        deadline, reports = time.monotonic() + timeout, []
        while time.monotonic() < deadline:
            reports = self.api.request("GET", "/v1/workers").json()["data"]
            busy = sorted(((r.get("engine", {}).get("jobs_in_flight", 0), r["worker_id"]) for r in reports),
                          reverse=True)
            if busy and busy[0][0] > 0 and (not both or (len(busy) >= 2 and busy[1][0] > 0)):
                held, worker_id = busy[0]
                host = worker_id.split("-")[0]
                for container in workers:
                    if container["Config"]["Hostname"] == host or container["Id"].startswith(host):
                        return container, held
                raise Failure(f"no worker container has hostname {host!r}")
            time.sleep(0.3)
        raise Failure(f"the two workers did not both hold jobs within {timeout:.0f} s: {reports}")

    # 5 -------------------------------------------------------------------------------------------
    def redis(self) -> str:
        ids = [self.api.submit(PROMPTS[i % len(PROMPTS)], 128, ignore_eos=True) for i in range(20)]
        replies: list[tuple[str, int | str, float]] = []
        restart = threading.Thread(target=lambda: self.compose.run("restart", "redis", timeout=300))
        deadline = time.monotonic() + 120
        while not (running := [i for i in ids if self.api.request("GET", f"/v1/jobs/{i}").json()["status"] == "running"]):
            if time.monotonic() > deadline:
                raise Failure("no job was running within 120 s of submission")
            time.sleep(0.3)
        restart.start()
        started = time.monotonic()
        n = 0
        while restart.is_alive() or time.monotonic() - started < 5:
            n += 1
            for method, path, body in (("GET", f"/v1/jobs/{ids[n % len(ids)]}", None),
                                       ("POST", "/v1/jobs", {"prompt": PROMPTS[n % len(PROMPTS)], "max_tokens": 8, "ignore_eos": True})):
                t0 = time.monotonic()
                try:
                    reply = self.api.request(method, path, body, timeout=15)
                    replies.append((method, reply.status, time.monotonic() - t0))
                    if method == "POST" and reply.status in (201, 202):
                        ids.append(reply.json()["id"])
                except (urllib.error.URLError, TimeoutError) as exc:
                    replies.append((method, f"no answer ({exc})", time.monotonic() - t0))
            time.sleep(0.2)
        restart.join()
        hung = [r for r in replies if isinstance(r[1], str)]
        if hung:
            raise Failure(f"{len(hung)} of {len(replies)} requests unanswered during the restart: {hung[:3]}")
        odd = [r for r in replies if r[1] not in (200, 201, 202, 503)]
        if odd:
            raise Failure(f"unexpected statuses during the restart: {odd[:5]}")
        jobs = self.api.wait_all(ids)
        bad = {i: (j["status"], j["error"]) for i, j in jobs.items() if j["status"] != "succeeded"}
        if bad:
            raise Failure(f"{len(bad)} of {len(ids)} accepted jobs did not succeed: {list(bad.items())[:3]}")
        statuses: dict[Any, int] = {}
        for _, status, _ in replies:
            statuses[status] = statuses.get(status, 0) + 1
        slowest = max(r[2] for r in replies)
        return (f"restarted with {len(running)} jobs running; {len(ids)}/{len(ids)} accepted jobs succeeded; "
                f"{len(replies)} requests during the restart "
                f"answered {dict(sorted(statuses.items()))}, slowest {slowest:.1f} s")

    # 6 -------------------------------------------------------------------------------------------
    def metrics(self) -> str:
        prometheus = Api(f"http://127.0.0.1:{self.ports['PROMETHEUS_PORT']}")
        deadline, targets = time.monotonic() + 120, []
        while time.monotonic() < deadline:
            reply = prometheus.request("GET", "/api/v1/targets?state=active")
            targets = reply.json()["data"]["activeTargets"] if reply.status == 200 else []
            up = {t["labels"]["job"]: [] for t in targets}
            for t in targets:
                up[t["labels"]["job"]].append(t["health"])
            if up.get("genq-api") == ["up"] and up.get("genq-worker") == ["up", "up"]:
                break
            time.sleep(2)
        else:
            raise Failure(f"Prometheus targets: {[(t['labels']['job'], t['scrapeUrl'], t['health'], t.get('lastError')) for t in targets]}")
        text = self.api.request("GET", "/metrics").body.decode()
        lines = [line for line in text.splitlines() if not line.startswith("#")]
        depth = [line for line in lines if line.startswith("genq_queue_depth")]
        engine = [line for line in lines if line.startswith("genq_engine_")]
        if not depth or not engine:
            raise Failure(f"API /metrics lacks genq_queue_depth ({len(depth)}) or genq_engine_* ({len(engine)})")
        workers = {line.split('worker="', 1)[1].split('"', 1)[0] for line in engine if 'worker="' in line}
        return (f"Prometheus: genq-api up, 2 genq-worker targets up; API /metrics: {depth[0]!r}, "
                f"{len(engine)} engine gauge lines for {len(workers)} workers")

    # 7 -------------------------------------------------------------------------------------------
    def drain(self) -> str:
        workers = [c for c in self.compose.containers("worker") if c["State"]["Running"]]
        ids = [self.api.submit(PROMPTS[i % len(PROMPTS)], 96, ignore_eos=True) for i in range(8)]
        victim, held = self._busiest_worker(workers, both=False)
        t0 = time.monotonic()
        subprocess.run(["docker", "stop", "--time", "90", victim["Id"]], check=True, capture_output=True, timeout=120)
        stopped = time.monotonic() - t0
        state = json.loads(subprocess.run(["docker", "inspect", victim["Id"]], capture_output=True, text=True,
                                          check=True).stdout)[0]["State"]
        jobs = self.api.wait_all(ids)
        bad = {i: (j["status"], j["error"]) for i, j in jobs.items() if j["status"] != "succeeded"}
        if bad:
            raise Failure(f"{len(bad)} of 8 jobs did not succeed: {list(bad.items())[:3]}")
        if state["ExitCode"] != 0 or state["OOMKilled"]:
            raise Failure(f"the stopped worker exited {state['ExitCode']} (OOM killed: {state['OOMKilled']})")
        rerun = sum(1 for j in jobs.values() if j["attempts"] > 1)
        if rerun:
            raise Failure(f"{rerun} jobs ran twice: the stopping worker did not finish what it held")
        self.compose.run("up", "-d", "--wait", "--wait-timeout", str(WAIT_TIMEOUT), "--scale", "worker=2",
                         timeout=WAIT_TIMEOUT + 120)
        return (f"SIGTERM to {victim['Name'].lstrip('/')} with {held} jobs in flight: it finished them and "
                f"exited 0 in {stopped:.1f} s (grace 90 s); 8/8 succeeded, none ran twice")

    # 8 -------------------------------------------------------------------------------------------
    def down(self) -> str:
        t0 = time.monotonic()
        self.compose.run("stop", timeout=300)
        stopped = time.monotonic() - t0
        codes = {c["Name"].lstrip("/"): c["State"]["ExitCode"] for c in self.compose.containers()
                 if c["Config"]["Labels"]["com.docker.compose.service"] in ("api", "worker")}
        killed = {name: code for name, code in codes.items() if code in (137, -1)}
        self.compose.run("down", "-v", "--remove-orphans", timeout=300)
        left = self.compose.containers()
        volumes = subprocess.run(["docker", "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}"],
                                 capture_output=True, text=True, check=True).stdout.split()
        networks = subprocess.run(["docker", "network", "ls", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}"],
                                  capture_output=True, text=True, check=True).stdout.split()
        if killed:
            raise Failure(f"killed at the end of the grace period instead of stopping: {killed}")
        if left or volumes or networks:
            raise Failure(f"left behind: {len(left)} containers, {len(volumes)} volumes, {len(networks)} networks")
        return f"stopped in {stopped:.0f} s (exit codes {sorted(set(codes.values()))}); nothing left"

    def dump_logs(self) -> None:
        out = self.compose.run("logs", "--no-color", "--tail", "40", check=False, quiet=True)
        sys.stderr.write(out.stdout[-20000:])

    def main(self) -> int:
        t0 = time.monotonic()
        log(f"project {PROJECT}, API on 127.0.0.1:{self.ports['API_PORT']}")
        self.compose.run("down", "-v", "--remove-orphans", timeout=300, check=False)   # a previous run's leftovers
        steps = [("build", self.build), ("up", self.up), ("jobs", self.jobs), ("webhooks", self.webhooks),
                 ("kill", self.kill), ("redis", self.redis), ("metrics", self.metrics), ("drain", self.drain)]
        ok = True
        for name, fn in steps:
            if not self.check(name, fn):
                ok = False
                if name in ("build", "up", "jobs"):
                    break   # nothing after these can run
        if not ok:
            self.dump_logs()
        if os.environ.get("SMOKE_KEEP"):
            log(f"SMOKE_KEEP: the stack stays up (docker compose -p {PROJECT} down -v removes it)")
        else:
            ok = self.check("down", self.down) and ok
        passed = sum(1 for r in self.results if r[1])
        build = next((r[2] for r in self.results if r[0] == "build"), 0.0)
        print(f"deploy-smoke: {'PASSED' if ok else 'FAILED'}: {passed}/{len(self.results)} checks passed in "
              f"{time.monotonic() - t0:.0f} s (build {build:.0f} s)", flush=True)
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(Smoke().main())
