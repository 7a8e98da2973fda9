"""Fair sharing between API keys on the real stack: `genq api` (gunicorn) and two `genq worker`
processes (Celery) as subprocesses, Redis (REDIS_URL or embedded) and the database (DATABASE_URL or a
fresh SQLite file). Not part of `make test`.

Phases (each stack fresh; the fair stack runs `solo`, `fair` (the flood) and `weights`, the fifo stack
`fifo` (the flood), and a fair stack with GENQ_FAIR_STEP_SHARE=0 `fair-wide` (the flood); the
default runs all but `fair-wide`):
- solo: key B alone submits 20 jobs, one every 2 s (`--late-every`);
- flood: key A submits 400 jobs at once; 5 s later key B starts its 20 jobs, at that pace. B's queue
  wait (created -> started) and end-to-end time (created -> completed), median and p95, and the
  flood's output tokens per second (every job's, first submission to last completion);
- weights: A (weight 2) and B (weight 1) each submit 150 jobs at once; the tokens each was served
  (prompt + output tokens of its jobs completed) while both were backlogged, as a ratio.

Prompts are 64-256 tokens of words, 32-64 output tokens (ignore_eos), as the issue says.

The ratios compare phases run one after another, minutes apart, and a VM's speed drifts between them
(one solo phase's B decoded at 58 ms a token, the next run's at 77 on the same VM and code). So
before each phase, with the stack idle, a probe times a fixed memory-bound matmul in this process
(one thread; its own spread on an idle VM ~6%); the report prints each phase's probe against the
first's, to tell drift from effect.

    python benchmarks/fairness.py                       # the default model, everything (~25 min on 2 cores)
    python benchmarks/fairness.py --model tiny --flood 120 --late 10
    python benchmarks/fairness.py --rounds 3           # every phase three times; the median of each ratio

Targets (issue 18): B's median end-to-end with A flooding <= 2x B solo (fifo: many times worse);
weights within +-15% of 2:1; the flood's output tokens/s with fair >= 0.95x fifo. Prints the CPU flags.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cpu_info  # noqa: E402  (benchmarks/)
import requests  # noqa: E402
from sqlalchemy import select  # noqa: E402

from app.infra.children import stop_all  # noqa: E402
from app.infra.db import session_factory  # noqa: E402
from app.infra.migrate import upgrade  # noqa: E402
from app.infra.redis_client import resolve_redis_url  # noqa: E402
from app.infra.settings import Settings  # noqa: E402
from app.jobs.models import FINAL_STATUSES, Job  # noqa: E402
from app.tenancy.keys import create_key  # noqa: E402

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact river garden window music letter story market system "
         "question evening morning summer winter mountain village teacher doctor friend family country").split()
FINAL = {s.value for s in FINAL_STATUSES}


class Stack:
    """The API and `workers` worker processes on a key prefix and database of their own."""

    def __init__(self, home: Path, args, scheduling: str, step_share: bool = True):
        home.mkdir(parents=True, exist_ok=True)
        prefix = f"genqfair-{secrets.token_hex(4)}"
        base = Settings.from_env()
        database_url = base.database_url if os.environ.get("DATABASE_URL") else f"sqlite:///{home / 'bench.db'}"
        self.database = None
        if os.environ.get("DATABASE_URL", "").startswith("postgresql"):
            self.database = prefix.replace("-", "_")
            database_url = postgres_database(os.environ["DATABASE_URL"], self.database, "CREATE")
        self.settings = base.with_(
            home=str(home), database_url=database_url, model=args.model_path, model_name=None, key_prefix=prefix,
            queue=f"{prefix}-jobs", api_port=free_port(), api_host="127.0.0.1", api_url=None, api_workers=1,
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
            worker_concurrency=None, torch_threads=1, scheduling=scheduling, fair_step_share=step_share,
            rate_limit_per_minute=10**9)
        self.settings = self.settings.with_(redis_url=resolve_redis_url(self.settings))
        upgrade(self.settings.database_url)
        self.sessions = session_factory(self.settings.database_url)
        self.workers = args.workers
        self.url = self.settings.api_url
        self.processes: list[subprocess.Popen] = []
        self.log = open(home / "stack.log", "wb")

    def key(self, name: str, weight: float = 1.0) -> tuple[str, str]:
        with self.sessions.begin() as session:
            key, secret = create_key(session, name, weight=weight, rate_limit_per_minute=10**9,
                                     max_active_jobs=10**9)
            return key.id, secret

    def __enter__(self) -> "Stack":
        env = {**os.environ, **self.settings.to_env(), "GENQ_LOG_LEVEL": "WARNING", "OMP_NUM_THREADS": "1"}
        commands = ["api"] + ["worker"] * self.workers
        for command in commands:
            self.processes.append(subprocess.Popen([sys.executable, "-m", "app.cli", command], env=env, cwd=ROOT,
                                                   stdout=self.log, stderr=subprocess.STDOUT))
        _, secret = self.key("probe")
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.processes):
                raise RuntimeError(f"the stack failed to start; see {self.log.name}")
            try:
                workers = requests.get(f"{self.url}/v1/workers", headers={"Authorization": f"Bearer {secret}"},
                                       timeout=2).json()["data"]
                if len(workers) >= self.workers:
                    return self
            except (requests.RequestException, ValueError, KeyError):
                pass
            time.sleep(0.5)
        raise RuntimeError("the stack did not become ready")

    def __exit__(self, *exc) -> None:
        stop_all(self.processes)
        self.log.close()
        self.sessions.kw["bind"].dispose()
        if self.database:
            postgres_database(os.environ["DATABASE_URL"], self.database, "DROP")

    def jobs(self, ids: list[str]) -> dict[str, Job]:
        with self.sessions() as session:
            found: dict[str, Job] = {}
            for start in range(0, len(ids), 500):
                found.update({j.id: j for j in session.scalars(select(Job).where(Job.id.in_(ids[start:start + 500])))})
            return found

    def wait_final(self, ids: list[str], timeout: float = 3600) -> dict[str, Job]:
        deadline = time.monotonic() + timeout
        while True:
            jobs = self.jobs(ids)
            if all(job.status in FINAL for job in jobs.values()):
                failed = [j for j in jobs.values() if j.status != "succeeded"]
                if failed:
                    raise RuntimeError(f"{len(failed)} job(s) did not succeed, e.g. {failed[0].error_message}")
                return jobs
            if time.monotonic() > deadline:
                raise RuntimeError("jobs did not finish in time")
            time.sleep(1.0)


def postgres_database(url: str, name: str, verb: str) -> str:
    """CREATE or DROP the benchmark's own database next to DATABASE_URL's; returns its URL."""
    from sqlalchemy import create_engine, text

    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'{verb} DATABASE "{name}"' + (" WITH (FORCE)" if verb == "DROP" else "")))
    admin.dispose()
    return url.rsplit("/", 1)[0] + f"/{name}"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def job_body(rng: random.Random, phase: str = "") -> dict:
    """A job of random words. `phase` starts the prompt, so that a phase's prompts are not in the
    prefix cache from an earlier phase on the same stack (the same `rng` seed gives the same jobs)."""
    words = rng.randint(50, 200)       # ~64-256 tokens with the instruct model's tokenizer
    prompt = " ".join(rng.choice(WORDS) for _ in range(words))
    return {"prompt": f"{phase}Write about: {prompt}.", "max_tokens": rng.randint(32, 64), "ignore_eos": True,
            "temperature": 0}


def submit_many(stack: Stack, secret: str, bodies: list[dict]) -> list[str]:
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {secret}"

    def one(body):
        response = http.post(f"{stack.url}/v1/jobs", json=body, timeout=120)
        response.raise_for_status()
        return response.json()["id"]

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(one, bodies))


def trickle(stack: Stack, secret: str, bodies: list[dict], every: float, delay: float) -> list[str]:
    """Submit one job per `every` seconds, starting after `delay`; returns the ids in order."""
    time.sleep(delay)
    ids = []
    start = time.monotonic()
    for i, body in enumerate(bodies):
        time.sleep(max(0.0, start + i * every - time.monotonic()))
        ids.extend(submit_many(stack, secret, [body]))
    return ids


def latency(jobs: dict[str, Job], ids: list[str]) -> dict:
    waits = [(jobs[i].started_at - jobs[i].created_at).total_seconds() for i in ids]
    e2e = [(jobs[i].completed_at - jobs[i].created_at).total_seconds() for i in ids]
    # where a job's time in the engine went: to its first token (prefill, behind whatever shares its
    # steps), then per further token (the steps it decodes in)
    ttft = [(jobs[i].first_token_at - jobs[i].started_at).total_seconds() for i in ids if jobs[i].first_token_at]
    per_token = [(jobs[i].completed_at - jobs[i].first_token_at).total_seconds() / (jobs[i].completion_tokens - 1)
                 for i in ids if jobs[i].first_token_at and (jobs[i].completion_tokens or 0) > 1]
    return {"wait_median": statistics.median(waits), "wait_p95": pct(waits, 0.95),
            "e2e_median": statistics.median(e2e), "e2e_p95": pct(e2e, 0.95), "n": len(ids),
            "first_token_median": statistics.median(ttft) if ttft else None,
            "per_token_median": statistics.median(per_token) if per_token else None}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def speed_probe() -> float:
    """Milliseconds of a fixed one-thread workload like a decode step's (8 rows against 64 MB of
    float32 weights, beyond the last-level cache), median of 40: the machine's speed right now."""
    import torch
    time.sleep(2.0)   # the previous phase's last results and settlements written
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        w, x = torch.randn(4096, 4096, generator=gen), torch.randn(8, 4096, generator=gen)
        times = []
        for _ in range(41):
            start = time.perf_counter()
            torch.nn.functional.linear(x, w)
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times[1:])
    finally:
        torch.set_num_threads(threads)


TICKS = os.sysconf("SC_CLK_TCK")
CPU_GROUPS = ("engine", "worker other", "api", "postgres", "redis", "client", "other")


def _stat(path: str) -> tuple[str, int, float] | None:
    """(comm, ppid, CPU seconds: user + system, with reaped children's) of a /proc stat file."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    comm, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
    return comm, int(rest[1]), sum(int(v) for v in rest[11:15]) / TICKS


def cpu_seconds(stack: Stack) -> dict[str, float]:
    """CPU seconds used so far on this machine, by who: the workers' engine loops (the thread the
    worker names "genq-engine"), the workers' other threads (Celery, claims, heartbeats, the
    newcomer reserve), the API (gunicorn and its workers), PostgreSQL, Redis, this process (the
    client), and everything else. Read from /proc; differences between two readings tell where a
    phase's CPU went (a dead process's time counts in its parent's, once reaped)."""
    procs = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (found := _stat(f"/proc/{entry.name}/stat")) is not None:
            procs[int(entry.name)] = found
    workers = {p.pid for p in stack.processes[1:]}
    api = {stack.processes[0].pid}
    for pid in sorted(procs):   # the API's descendants (gunicorn's workers)
        if procs[pid][1] in api:
            api.add(pid)
    used = dict.fromkeys(CPU_GROUPS, 0.0)
    for pid, (comm, _, seconds) in procs.items():
        if pid in workers:
            # the process's own time counts the threads that ended too (the reserve's, per job); the
            # engine's is its loop thread's (user + system: a thread's stat has no children's time)
            engine = sum(thread[2] for task in Path(f"/proc/{pid}/task").iterdir()
                         if (thread := _stat(f"{task}/stat")) is not None and thread[0] == "genq-engine")
            used["engine"] += engine
            used["worker other"] += seconds - engine
            continue
        group = ("api" if pid in api else "client" if pid == os.getpid() else "postgres" if comm == "postgres"
                 else "redis" if comm.startswith("redis") else "other")
        used[group] += seconds
    return used


def cpu_used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(after[k] - before[k], 1) for k in CPU_GROUPS}


def phase_solo(stack: Stack, args) -> dict:
    _, secret = stack.key("solo-b")
    rng = random.Random(2)
    ids = trickle(stack, secret, [job_body(rng, "Solo. ") for _ in range(args.late)], args.late_every, 0.0)
    return latency(stack.wait_final(ids), ids)


def phase_flood(stack: Stack, args) -> dict:
    _, secret_a = stack.key("flood-a")
    _, secret_b = stack.key("late-b")
    rng = random.Random(1)
    flood_bodies = [job_body(rng) for _ in range(args.flood)]
    # B's jobs are the solo phase's (the same seed), each its own prompt, none in the prefix cache
    # from that phase. (Until 2026-11-30 every one of B's flood jobs had the same prompt, the first
    # of the solo phase's: from its second job on, B's prompts were found cached, and its time under
    # the flood was compared with a solo time that computed every prompt.)
    late_rng = random.Random(2)
    late_bodies = [job_body(late_rng, "Flood. ") for _ in range(args.late)]
    late: list[str] = []
    thread = threading.Thread(target=lambda: late.extend(trickle(stack, secret_b, late_bodies, args.late_every, 5.0)))
    thread.start()
    flood = submit_many(stack, secret_a, flood_bodies)
    thread.join()
    jobs = stack.wait_final(flood + late)
    every = list(jobs.values())
    span = (max(j.completed_at for j in every) - min(j.created_at for j in every)).total_seconds()
    output = sum(j.completion_tokens for j in every)
    return {**latency(jobs, late), "flood_seconds": span, "output_tokens": output,
            "output_tokens_per_second": output / span}


def phase_weights(stack: Stack, args) -> dict:
    heavy, secret_a = stack.key("weight-2", weight=2.0)
    light, secret_b = stack.key("weight-1", weight=1.0)
    rng = random.Random(3)
    bodies = [job_body(rng) for _ in range(2 * args.weighted)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        a = pool.submit(submit_many, stack, secret_a, bodies[0::2])
        b = pool.submit(submit_many, stack, secret_b, bodies[1::2])
        ids_a, ids_b = a.result(), b.result()
    jobs = stack.wait_final(ids_a + ids_b)
    # The window: from the 10th completion until the first key's last job starts (both backlogged).
    completions = sorted(j.completed_at for j in jobs.values())
    start = completions[min(9, len(completions) - 1)]
    end = min(max(jobs[i].started_at for i in ids_a), max(jobs[i].started_at for i in ids_b))

    def served(ids):
        done = [jobs[i] for i in ids if start <= jobs[i].completed_at <= end]
        return sum(j.prompt_tokens + j.completion_tokens for j in done), len(done)

    (tokens_a, n_a), (tokens_b, n_b) = served(ids_a), served(ids_b)
    return {"window_seconds": (end - start).total_seconds(), "tokens_weight_2": tokens_a, "tokens_weight_1": tokens_b,
            "jobs_weight_2": n_a, "jobs_weight_1": n_b, "ratio": tokens_a / tokens_b if tokens_b else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), 'tiny' (a random "
                        "tiny Llama, for a quick run) or a model path")
    parser.add_argument("--flood", type=int, default=400, help="key A's jobs in the flood")
    parser.add_argument("--late", type=int, default=20, help="key B's jobs")
    parser.add_argument("--late-every", type=float, default=2.0, help="seconds between key B's jobs (the issue "
                        "says 1; on a 2-core CPU, B alone at one job a second already fills the machine)")
    parser.add_argument("--weighted", type=int, default=150, help="jobs of each key in the weights phase")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-num-seqs", type=int, default=16, help="per worker (and its Celery threads)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=256)
    parser.add_argument("--phases", nargs="+", default=["solo", "fair", "weights", "fifo"])
    parser.add_argument("--rounds", type=int, default=1, help="run every phase this many times, one round "
                        "after another, and report each round and the median of each ratio (the VM's speed "
                        "drifts between phases: more rounds tell drift from effect)")
    parser.add_argument("--out", default="benchmarks/results/fairness.json")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        if args.model == "tiny":
            from tests.support.service import build_tiny
            args.model_path = str(build_tiny(tmp))
        else:
            args.model_path = None if args.model == "default" else args.model
        print(f"CPU: {cpu_info.describe()}", flush=True)
        rounds = []
        for n in range(args.rounds):
            if args.rounds > 1:
                print(f"round {n + 1} of {args.rounds}", flush=True)
            rounds.append(run_round(tmp / f"round-{n}", args))
    for results in rounds:
        report(results, args)
    if len(rounds) > 1:
        report_rounds(rounds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rounds[0] if len(rounds) == 1 else {"cpu": cpu_info.describe(), "rounds": rounds},
                              indent=2, default=str))
    print(f"wrote {out}")
    return 0


def run_round(tmp: Path, args) -> dict:
    """Every phase once: the fair stack's (solo, fair, weights), then each other stack's flood."""
    results: dict = {"cpu": cpu_info.describe(), "args": {k: v for k, v in vars(args).items()}}
    if {"solo", "fair", "weights"} & set(args.phases):
        with Stack(tmp / "fair", args, "fair") as stack:
            for phase, fn in (("solo", phase_solo), ("fair", phase_flood), ("weights", phase_weights)):
                if phase in args.phases:
                    probe = speed_probe()
                    print(f"{phase} ... (speed probe {probe:.1f} ms)", flush=True)
                    before = cpu_seconds(stack)
                    results[phase] = {**fn(stack, args), "probe_ms": probe}
                    results[phase]["cpu_seconds"] = cpu_used(before, cpu_seconds(stack))
                    print(f"  {json.dumps(results[phase], default=str)}", flush=True)
    for name, scheduling, share in (("fair-wide", "fair", False), ("fifo", "fifo", False)):
        if name in args.phases:
            with Stack(tmp / name, args, scheduling, step_share=share) as stack:
                probe = speed_probe()
                print(f"{name} ... (speed probe {probe:.1f} ms)", flush=True)
                before = cpu_seconds(stack)
                results[name] = {**phase_flood(stack, args), "probe_ms": probe}
                results[name]["cpu_seconds"] = cpu_used(before, cpu_seconds(stack))
                print(f"  {json.dumps(results[name], default=str)}", flush=True)
    return results


def ratios(results: dict) -> dict[str, float]:
    """A round's three ratios (those its phases give): B fair / solo, flood fair / fifo, weights."""
    out = {}
    if "solo" in results and "fair" in results:
        out["B fair / solo"] = results["fair"]["e2e_median"] / results["solo"]["e2e_median"]
    if "fair" in results and "fifo" in results:
        out["flood fair / fifo"] = (results["fair"]["output_tokens_per_second"]
                                    / results["fifo"]["output_tokens_per_second"])
    if results.get("weights", {}).get("ratio") is not None:
        out["weights"] = results["weights"]["ratio"]
    return out


def report_rounds(rounds: list[dict]) -> None:
    print(f"\n{len(rounds)} rounds (each ratio within one round; the median of the rounds):")
    for name in ("B fair / solo", "flood fair / fifo", "weights"):
        values = [r[name] for r in map(ratios, rounds) if name in r]
        if values:
            print(f"  {name:<18} " + "  ".join(f"{v:.3f}" for v in values) + f"   median {statistics.median(values):.3f}")


def report(results: dict, args) -> None:
    print(f"\nCPU: {results['cpu']}")
    print(f"{args.workers} workers x max_num_seqs {args.max_num_seqs}, max_num_batched_tokens "
          f"{args.max_num_batched_tokens}; model {args.model}")
    print(f"Key B: {args.late} jobs, one every {args.late_every:g} s (seconds)   wait median   wait p95   e2e median   e2e p95")
    for name, label in (("solo", "solo (A absent)"), ("fair", f"A floods {args.flood}, fair"),
                        ("fair-wide", f"A floods {args.flood}, fair, no step share"),
                        ("fifo", f"A floods {args.flood}, fifo")):
        if name in results:
            r = results[name]
            split = (f"   (in the engine: first token {r['first_token_median']:.2f} s, then "
                     f"{r['per_token_median'] * 1000:.0f} ms/token)" if r.get("per_token_median") else "")
            print(f"  {label:<38} {r['wait_median']:>11.2f} {r['wait_p95']:>10.2f} {r['e2e_median']:>12.2f} "
                  f"{r['e2e_p95']:>9.2f}{split}")
    if "solo" in results:
        for name in ("fair", "fair-wide", "fifo"):
            if name in results:
                print(f"  B median e2e, {name} / solo: {results[name]['e2e_median'] / results['solo']['e2e_median']:.2f}x"
                      f"{'  (target <= 2x)' if name == 'fair' else ''}")
    if "fair" in results and "fifo" in results:
        fair, fifo = results["fair"]["output_tokens_per_second"], results["fifo"]["output_tokens_per_second"]
        print(f"  flood output tokens/s: fair {fair:.1f}, fifo {fifo:.1f}: {fair / fifo:.3f}x (target >= 0.95x)")
        if "fair-wide" in results:
            wide = results["fair-wide"]["output_tokens_per_second"]
            print(f"  flood output tokens/s, fair without step share: {wide:.1f}: {wide / fifo:.3f}x fifo")
    if "weights" in results and results["weights"]["ratio"] is None:
        print("  weights: no weight-1 job completed while both keys were backlogged (too few jobs: --weighted)")
    elif "weights" in results:
        w = results["weights"]
        print(f"  weights 2:1 over {w['window_seconds']:.0f} s both backlogged: {w['tokens_weight_2']} vs "
              f"{w['tokens_weight_1']} tokens ({w['jobs_weight_2']} vs {w['jobs_weight_1']} jobs): "
              f"{w['ratio']:.2f}:1 (target 2 +-15%: 1.70-2.30)")
    for name in ("solo", "fair", "weights", "fair-wide", "fifo"):
        if "cpu_seconds" in results.get(name, {}):
            used = results[name]["cpu_seconds"]
            print(f"  CPU seconds, {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in used.items())
                  + (f"; outside the engines {sum(used.values()) - used['engine']:.1f} of {sum(used.values()):.1f}"))
    probes = [(name, results[name]["probe_ms"]) for name in ("solo", "fair", "weights", "fair-wide", "fifo")
              if "probe_ms" in results.get(name, {})]
    if probes:
        first = probes[0][1]
        print("  speed probe before each phase (ms; x the first: above 1, the machine was slower): "
              + ", ".join(f"{name} {ms:.1f} ({ms / first:.2f}x)" for name, ms in probes))


if __name__ == "__main__":
    sys.exit(main())
