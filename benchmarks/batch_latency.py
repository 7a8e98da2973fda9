"""Interactive latency under a batch: the time to first token of a streamed chat request on an idle
service, and while a 200-line batch runs, for several GENQ_BATCH_MAX_IN_FLIGHT values in one run
(0: no cap, every line queued at once, as before the cap), and the batch's own progress (lines
finished per second over the first seconds of the measurement). Each cap gets a fresh service: the API
on real HTTP, one `genq worker` process (tiny model, max_num_seqs 64, as tests/e2e/test_openai.py),
Redis and the database from REDIS_URL / DATABASE_URL (else embedded). Prints a table and writes JSON.

    python benchmarks/batch_latency.py                          # caps 0 and 8, 5 samples each
    python benchmarks/batch_latency.py --caps 0 4 8 16 --samples 7

The issue's goal: the interactive request's TTFT during the batch within 2x of its idle TTFT.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")   # as the test suite: one intra-op thread per process

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colors."}]


def time_to_first_token(client, model: str) -> tuple[float, float]:
    """(as the client sees it, as the service records it: the job's created_at to first_token_at)."""
    import requests

    start, first, response_id = time.perf_counter(), None, None
    for chunk in client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0, stream=True):
        response_id = chunk.id
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
    job = requests.get(f"{client.base_url}jobs/{response_id.removeprefix('chatcmpl-')}", timeout=30,
                       headers={"Authorization": f"Bearer {client.api_key}"}).json()
    return first, job["metrics"]["time_to_first_token_seconds"]


def batch_file(client, model: str, lines: int, max_tokens: int) -> str:
    rows = [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": model, "messages": [{"role": "user", "content": f"Count to {i}"}],
             "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}} for i in range(lines)]
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    return client.files.create(file=("input.jsonl", io.BytesIO(data)), purpose="batch").id


def wait_for(client, batch_id: str, ready, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if ready(batch):
            return batch
        time.sleep(0.1)
    raise RuntimeError(f"batch {batch_id} stayed {batch.status}")


def measure(cap: int, args, model_dir: Path, tmp: Path) -> dict:
    import openai

    from app.api import create_app
    from tests.support.service import ServerThread, WorkerProcess, service_settings

    with service_settings(tmp / f"cap-{cap}", model=str(model_dir), max_num_seqs=args.max_num_seqs,
                          lease_seconds=30, batch_max_in_flight=cap) as settings, \
            WorkerProcess(settings, tmp / f"worker-{cap}.log"), ServerThread(create_app(settings)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, timeout=120, max_retries=0)
        model = settings.model_name
        time_to_first_token(client, model)   # warm-up
        idle = [time_to_first_token(client, model) for _ in range(args.samples)]
        batch = client.batches.create(input_file_id=batch_file(client, model, args.lines, args.max_tokens),
                                      endpoint="/v1/chat/completions", completion_window="24h")
        before = wait_for(client, batch.id, lambda b: b.request_counts.completed > 0)   # generating
        start = time.monotonic()
        busy = [time_to_first_token(client, model) for _ in range(args.samples)]
        time.sleep(max(0.0, args.window - (time.monotonic() - start)))
        after = client.batches.retrieve(batch.id)
        elapsed = time.monotonic() - start
        client.batches.cancel(batch.id)
        wait_for(client, batch.id, lambda b: b.status in ("cancelled", "completed"))
    result = {"cap": cap, "batch_still_running": after.status == "in_progress",
              "batch_lines_per_second": (after.request_counts.completed - before.request_counts.completed) / elapsed}
    for index, kind in ((0, "client"), (1, "service")):
        result[f"{kind}_idle_ttft"], result[f"{kind}_busy_ttft"] = [x[index] for x in idle], [x[index] for x in busy]
        result[f"{kind}_idle_median"] = statistics.median(result[f"{kind}_idle_ttft"])
        result[f"{kind}_busy_median"] = statistics.median(result[f"{kind}_busy_ttft"])
        result[f"{kind}_ratio"] = result[f"{kind}_busy_median"] / result[f"{kind}_idle_median"]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--caps", type=int, nargs="+", default=[0, 8], help="GENQ_BATCH_MAX_IN_FLIGHT values")
    parser.add_argument("--samples", type=int, default=5, help="interactive requests per phase")
    parser.add_argument("--lines", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per batch line (ignore_eos)")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--window", type=float, default=8.0, help="seconds over which batch lines/s is counted")
    parser.add_argument("--out", default="benchmarks/results/batch_latency.json")
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)   # no access log lines between the results

    from tests.support.service import build_tiny

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        model_dir = build_tiny(tmp)
        results = []
        for cap in args.caps:
            print(f"cap {cap} ...", flush=True)
            results.append(measure(cap, args, model_dir, tmp))
    print(f"\n{args.lines}-line batch, {args.max_tokens} tokens a line; interactive chat TTFT in ms, median of "
          f"{args.samples}, idle -> during the batch (client: as the client sees it; service: the job's "
          f"created_at to first token)")
    print(f"{'cap':>5} {'client idle':>12} {'busy':>6} {'ratio':>6} {'service idle':>13} {'busy':>6} {'ratio':>6} "
          f"{'batch lines/s':>14}")
    for r in results:
        print(f"{r['cap'] or 'none':>5} {r['client_idle_median'] * 1000:>12.0f} {r['client_busy_median'] * 1000:>6.0f} "
              f"{r['client_ratio']:>5.2f}x {r['service_idle_median'] * 1000:>13.0f} "
              f"{r['service_busy_median'] * 1000:>6.0f} {r['service_ratio']:>5.2f}x {r['batch_lines_per_second']:>14.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
