"""Chaos soak: N jobs against two real workers while a loop SIGKILLs, SIGTERMs and restarts workers and
stops and restarts Redis (with its append-only file) at random. Then everything is brought back and
the run settles; it prints what happened to every accepted job and writes JSON.

    .venv/bin/python benchmarks/chaos.py                 # 500 jobs
    .venv/bin/python benchmarks/chaos.py --jobs 100 --seed 3

Counted per accepted job (a submission answered 201/202):
- succeeded / failed: its final status in the database;
- lost: not final when the run settled (or missing from the database);
- duplicated: more than one `done` event seen on its live channel, or more than one distinct
  job.completed webhook event (webhook-id) at the receiver. (Pub/sub messages sent while Redis is
  down are lost, so a missing `done` is not counted; the database row is the record.)
Target: lost = 0 and duplicated = 0. Submissions answered 5xx other than 503 are counted as errors.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import secrets
import signal
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
import requests  # noqa: E402
from sqlalchemy import select  # noqa: E402

from app.infra.channels import Channels
from app.infra.db import session_factory
from app.infra.migrate import upgrade
from app.infra.redis_client import redis_client
from app.infra.settings import Settings
from app.infra.worker_reports import live_workers
from app.jobs.models import FINAL_STATUSES, Job
from tests.support.service import ServerThread  # noqa: E402
from tests.support.webhook_receiver import Receiver  # noqa: E402
from tests.e2e.cluster import RedisServer, Worker  # noqa: E402

FINAL = {s.value for s in FINAL_STATUSES}


class DoneCounter:
    """`done` events per job on the live channels; resubscribes after a Redis restart."""

    def __init__(self, redis_url: str, prefix: str):
        self.redis_url, self.pattern = redis_url, f"{prefix}:job:*:live"
        self.counts: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                client = redis.Redis.from_url(self.redis_url, decode_responses=True, socket_connect_timeout=1)
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.psubscribe(self.pattern)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message and json.loads(message["data"]).get("type") == "done":
                        self.counts[message["channel"].split(":")[-2]] += 1
            except (redis.RedisError, OSError):
                time.sleep(0.3)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--submit-rate", type=float, default=20.0, help="submissions per second")
    parser.add_argument("--fault-every", type=float, default=3.0, help="mean seconds between faults")
    parser.add_argument("--settle-seconds", type=float, default=300.0, help="how long to wait once faults stop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)   # no line per request
    logging.getLogger("urllib3").setLevel(logging.ERROR)

    from app.api import create_app
    from worker.engine.tiny import build_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="genq-chaos-"))
    model = build_tiny_model(tmp / "tiny-llama")
    db_url = f"sqlite:///{tmp / 'genq.db'}"
    upgrade(db_url)
    prefix = f"chaos-{secrets.token_hex(4)}"
    log = lambda msg: print(f"[{time.monotonic() - t0:7.1f}s] {msg}", flush=True)  # noqa: E731
    t0 = time.monotonic()

    with RedisServer(tmp / "redis") as redis_server, Receiver() as receiver:
        settings = Settings(
            home=str(tmp / "home"), database_url=db_url, redis_url=redis_server.url, key_prefix=prefix,
            queue=f"{prefix}-jobs", model=str(model), max_num_seqs=32, stats_interval_seconds=0.5,
            lease_seconds=4, reconcile_interval_seconds=1, requeue_after_seconds=5, drain_seconds=2,
            max_attempts=10, torch_threads=1, webhook_allow_private=True)
        sessions = session_factory(db_url)
        workers = [Worker(settings, tmp / f"worker-{i}.log").start(wait=False) for i in range(args.workers)]
        for worker in workers:
            worker.wait_ready()
        log(f"{len(workers)} workers ready; redis on port {redis_server.port}")
        faults: Counter[str] = Counter()
        statuses: Counter[str] = Counter()
        accepted: list[str] = []
        done = DoneCounter(redis_server.url, prefix)

        with ServerThread(create_app(settings)) as server:
            http = requests.Session()
            body = {"max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True,
                    "webhook": f"{receiver.url}/ok/chaos", "webhook_events_filter": ["completed"]}

            def submit(i: int) -> None:
                try:
                    response = http.post(f"{server.url}/v1/jobs", json={"prompt": f"chaos job {i}", **body},
                                         timeout=60)
                    statuses[str(response.status_code)] += 1
                    if response.status_code in (201, 202):
                        accepted.append(response.json()["id"])
                except requests.RequestException as exc:
                    statuses[type(exc).__name__] += 1

            submitting = threading.Event()
            submitting.set()

            def submitter() -> None:
                with ThreadPoolExecutor(max_workers=8) as pool:
                    for i in range(args.jobs):
                        pool.submit(submit, i)
                        time.sleep(1.0 / args.submit_rate)
                submitting.clear()

            threading.Thread(target=submitter, daemon=True).start()

            def final_count() -> int:
                with sessions() as session:
                    rows = session.execute(select(Job.status).where(Job.id.in_(list(accepted))))
                    return sum(1 for (status,) in rows if status in FINAL)

            def ready_workers() -> list[Worker]:
                try:
                    pids = {w.get("pid") for w in live_workers(redis_client(redis_server.url), Channels(prefix))}
                except redis.RedisError:
                    return []
                return [w for w in workers if w.alive and w.pid in pids]

            # Faults while submitting and until most jobs are done. Only workers that finished
            # loading are hit (one still loading its model makes no progress to interrupt).
            while submitting.is_set() or final_count() < 0.9 * len(accepted):
                time.sleep(rng.expovariate(1.0 / args.fault_every))
                action = rng.choice(["kill_worker", "kill_worker", "term_worker", "restart_redis"])
                victims = ready_workers()
                if action != "restart_redis" and not victims:
                    continue
                if action == "restart_redis":
                    redis_server.stop(rng.choice([signal.SIGTERM, signal.SIGKILL]))
                    time.sleep(rng.uniform(1, 4))
                    redis_server.start()
                else:
                    victim = rng.choice(victims)
                    if action == "kill_worker":
                        victim.kill()
                    else:
                        victim.terminate(timeout=settings.drain_seconds + 60)
                    time.sleep(rng.uniform(0.5, 3))
                faults[action] += 1
                workers = [w for w in workers if w.alive]
                while len(workers) < args.workers:   # restarted without waiting: faults go on while it loads
                    name = f"worker-{sum(faults.values())}-{len(workers)}.log"
                    workers.append(Worker(settings, tmp / name).start(wait=False))
                log(f"{action}; accepted {len(accepted)}, final {final_count()}")
                if time.monotonic() - t0 > 3600:
                    break

            log("faults stopped; settling")
            deadline = time.monotonic() + args.settle_seconds
            while final_count() < len(accepted) and time.monotonic() < deadline:
                time.sleep(1)
            def hooked() -> int:
                return len({json.loads(d.body)["data"]["id"] for d in receiver.at("/ok/chaos")
                            if json.loads(d.body).get("type") == "job.completed"})

            while hooked() < len(accepted) and time.monotonic() < deadline:   # webhooks may trail
                time.sleep(1)
            time.sleep(3)   # the last webhooks and done events
            log(f"settled: {final_count()} final, {hooked()} with a job.completed webhook")
            with sessions() as session:
                jobs = {job.id: job for job in session.scalars(select(Job).where(Job.id.in_(list(accepted))))}
        done.close()
        for worker in workers:
            worker.close()

        completed_hooks: dict[str, set[str]] = defaultdict(set)
        for delivery in receiver.at("/ok/chaos"):
            payload = json.loads(delivery.body)
            if payload.get("type") == "job.completed":
                headers = {k.lower(): v for k, v in delivery.headers.items()}
                completed_hooks[payload["data"]["id"]].add(headers.get("webhook-id"))

    by_status = Counter(job.status for job in jobs.values())
    lost = [i for i in accepted if i not in jobs or jobs[i].status not in FINAL]
    dup_done = [i for i in accepted if done.counts[i] > 1]
    dup_hooks = [i for i in accepted if len(completed_hooks[i]) > 1]
    no_hook = [i for i in accepted if i in jobs and jobs[i].status in FINAL and not completed_hooks[i]]
    result = {
        "jobs": args.jobs, "seed": args.seed, "faults": dict(faults), "submissions": dict(statuses),
        "accepted": len(accepted), "succeeded": by_status.get("succeeded", 0), "failed": by_status.get("failed", 0),
        "lost": len(lost), "duplicated": len(set(dup_done) | set(dup_hooks)),
        "duplicated_done_events": len(dup_done), "duplicated_completed_webhooks": len(dup_hooks),
        "final_without_completed_webhook": len(no_hook),
        "max_attempts_seen": max((job.attempts for job in jobs.values()), default=0),
        "failed_errors": dict(Counter(job.error_type for job in jobs.values() if job.status == "failed")),
        "seconds": round(time.monotonic() - t0, 1),
    }
    print()
    print(f"{'accepted':>10} {'succeeded':>10} {'failed':>8} {'lost':>6} {'duplicated':>11}")
    print(f"{result['accepted']:>10} {result['succeeded']:>10} {result['failed']:>8} {result['lost']:>6} "
          f"{result['duplicated']:>11}")
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"chaos-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0 if result["lost"] == 0 and result["duplicated"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
