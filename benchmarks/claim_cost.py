"""What one claim costs the worker, on a queue like the fairness benchmark's flood: 400 queued jobs of
one key (prompts of 64-256 tokens) in a database of its own, and claims made and rolled back so
that the queue stays as it is. Wall time and this process's CPU time per claim (the worker's
Python side; the database's own CPU is not counted), median of --rounds:

- the fair claim of a task (`fair_queue.claim_next`, the flood's key the only one waiting);
- the newcomer reserve's claim that finds nothing (the only key waiting is excluded: at its share);
- fifo's claim of a task's own job (`store.claim_job`).

    python benchmarks/claim_cost.py                      # DATABASE_URL (PostgreSQL), else a SQLite file
    python benchmarks/claim_cost.py --claims 200 --rounds 5

Not part of `make test`. Prints the CPU it ran on.
"""
from __future__ import annotations

import argparse
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

import cpu_info  # noqa: E402  (benchmarks/)
from fairness import job_body, postgres_database  # noqa: E402

from app.infra.db import session_factory  # noqa: E402
from app.infra.migrate import upgrade  # noqa: E402
from app.jobs import fair_queue, store  # noqa: E402
from app.tenancy.keys import create_key  # noqa: E402


def timed(fn, claims: int) -> tuple[float, float]:
    """(wall ms, CPU ms) per call of `fn`, over `claims` calls after one unmeasured."""
    fn()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(claims):
        fn()
    return 1000 * (time.perf_counter() - wall) / claims, 1000 * (time.process_time() - cpu) / claims


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=400, help="queued jobs of the flooding key")
    parser.add_argument("--claims", type=int, default=100, help="claims timed per kind and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    admin_url = os.environ.get("DATABASE_URL", "")
    name = f"genq_claims_{secrets.token_hex(3)}"
    tmp = tempfile.TemporaryDirectory()
    url = (postgres_database(admin_url, name, "CREATE") if admin_url.startswith("postgresql")
           else f"sqlite:///{Path(tmp.name) / 'claims.db'}")
    try:
        upgrade(url)
        sessions = session_factory(url)
        with sessions.begin() as session:
            flood = create_key(session, "flood")[0].id
        rng = random.Random(1)
        with sessions.begin() as session:
            ids = [store.create_job(session, model="m", input=job_body(rng), owner=flood).id
                   for _ in range(args.jobs)]
        with sessions.begin() as session:   # the key's counter row and the floor exist, as in a running service
            fair_queue.claim_next(session, "warm-up", 60)

        def rolled_back(claim):
            def run():
                with sessions() as session:
                    session.begin()
                    claim(session)
                    session.rollback()
            return run

        kinds = {
            "fair claim (a task)": rolled_back(lambda s: fair_queue.claim_next(s, "w1", 60, hint=ids[-1])),
            "reserve claim, nothing to take": rolled_back(
                lambda s: fair_queue.claim_next(s, "w1", 60, exclude=frozenset([flood]), reserve=True)),
            "fifo claim (the task's job)": rolled_back(lambda s: store.claim_job(s, ids[-1], "w1", 60)),
        }
        results: dict[str, list[tuple[float, float]]] = {kind: [] for kind in kinds}
        for _ in range(args.rounds):
            for kind, fn in kinds.items():
                results[kind].append(timed(fn, args.claims))
        print(f"CPU: {cpu_info.describe()}")
        print(f"database: {url.split('://')[0]}; {args.jobs} queued jobs; {args.claims} claims x {args.rounds} rounds")
        print(f"{'claim':<32} {'wall ms':>8} {'CPU ms':>8}")
        for kind, values in results.items():
            print(f"{kind:<32} {statistics.median(v[0] for v in values):>8.2f} "
                  f"{statistics.median(v[1] for v in values):>8.2f}")
        sessions.kw["bind"].dispose()
    finally:
        if admin_url.startswith("postgresql"):
            postgres_database(admin_url, name, "DROP")
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
