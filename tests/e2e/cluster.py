"""Real processes for fault tests and the chaos soak: a redis-server we may stop and restart (its data
kept in an append-only file, or none), a PostgreSQL server of our own we may stop, kill and restart,
the API (`genq api`) we may SIGKILL and start again on its port, and `genq worker` processes we may
SIGKILL or SIGTERM (each in a process group of its own, ended with the test run:
tests/support/processes.py)."""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
from sqlalchemy import select

from app.infra.channels import Channels
from app.jobs.models import FINAL_STATUSES, Job
from app.infra.worker_reports import live_workers
from tests.support.processes import start_child, stop_child

ROOT = Path(__file__).resolve().parents[2]
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL to a child and its whole process group at once (a crash), then reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(30)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """redis-server on a free port with AOF (fsync always) in `data_dir`: a stop and start keeps
    every acknowledged write, as a production Redis with appendonly does. `persistent=False`: no AOF
    and no snapshots, so every start (after `wipe`) is empty, as a cache-only Redis."""

    def __init__(self, data_dir: Path, port: int | None = None, persistent: bool = True):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.persistent = persistent
        self.process: subprocess.Popen | None = None

    def start(self) -> "RedisServer":
        persistence = (["--appendonly", "yes", "--appendfsync", "always"] if self.persistent
                       else ["--appendonly", "no"])
        self.process = start_child(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
             *persistence, "--save", "", "--protected-mode", "no"],
            stdout=open(self.data_dir / "redis.log", "ab"), stderr=subprocess.STDOUT)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + 30
        while True:
            try:
                if client.ping():
                    break
            except redis.RedisError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)
        # Wait until the AOF is loaded (PING answers during loading with an error on other commands).
        while client.info("persistence").get("loading", 0):
            time.sleep(0.05)
        client.close()
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM: a clean shutdown; SIGKILL: a crash (AOF with fsync always still has every write)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(30)
        self.process = None

    def wipe(self) -> None:
        """Forget the data on disk (stopped servers only): the next start is empty."""
        assert not self.running
        for path in self.data_dir.iterdir():
            if path.name != "redis.log":
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(signal.SIGKILL)


PG_ROOT = Path("/usr/lib/postgresql")


def pg_tool(name: str) -> str | None:
    """A PostgreSQL server program (initdb, postgres) of the newest version installed."""
    found = sorted(PG_ROOT.glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    return str(found[-1]) if found else shutil.which(name)


class PostgresServer:
    """A throwaway PostgreSQL cluster (initdb, trust authentication) on a free port, the `postgres`
    server its own child process here (so that a stop, a crash and a restart are ours to cause) with
    one database, `database`. PostgreSQL refuses to run as root: as root, initdb and the server run
    as the `postgres` user, in a data directory that user owns. fsync is off (a killed server keeps
    its writes: the page cache outlives the process), which keeps the tests fast.

    stop(): SIGINT, PostgreSQL's fast shutdown (sessions are ended, the data written); kill(): SIGKILL
    to the server and its backends (a crash: the next start recovers from the WAL); start() again
    after either; restart(): stop (fast) and start."""

    def __init__(self, database: str = "genq", port: int | None = None):
        self.initdb, self.postgres = pg_tool("initdb"), pg_tool("postgres")
        self.database = database
        self.port = port or free_port()
        self.root: Path | None = None
        self.process: subprocess.Popen | None = None
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"
        self.admin_dsn = f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres connect_timeout=2"

    @staticmethod
    def available() -> str | None:
        """Why this machine cannot run one (None: it can)."""
        if not pg_tool("initdb") or not pg_tool("postgres"):
            return "initdb/postgres not installed"
        if os.geteuid() == 0:
            import pwd

            try:
                pwd.getpwnam("postgres")
            except KeyError:
                return "running as root and there is no postgres user"
        return None

    def _as_postgres(self) -> dict:
        """Popen arguments that run a program as the postgres user (when we are root)."""
        if os.geteuid() != 0:
            return {}
        return {"user": "postgres", "group": "postgres", "extra_groups": []}

    def init(self) -> "PostgresServer":
        self.root = Path(tempfile.mkdtemp(prefix="genq-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        done = subprocess.run([self.initdb, "-D", str(self.root / "data"), "-A", "trust", "-U", "postgres", "-E",
                               "UTF8", "--no-sync"], capture_output=True, text=True, timeout=180,
                              cwd=self.root, **self._as_postgres())
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
        return self

    def start(self, timeout: float = 60) -> "PostgresServer":
        if self.root is None:
            self.init()
        self._log = open(self.root / "postgres.log", "ab")
        self.process = start_child(
            [self.postgres, "-D", str(self.root / "data"), "-p", str(self.port), "-k", str(self.root),
             "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=400", "-c", "shared_buffers=32MB",
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
            cwd=self.root, stdout=self._log, stderr=subprocess.STDOUT, **self._as_postgres())
        self._wait_ready(timeout)
        self._create_database()
        return self

    def _wait_ready(self, timeout: float) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.admin_dsn).close()
                return
            except psycopg.Error:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not start on port {self.port}:\n{self.output()}")
            time.sleep(0.05)

    def _create_database(self) -> None:
        import psycopg

        with psycopg.connect(self.admin_dsn, autocommit=True) as connection:
            if connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)).fetchone() is None:
                connection.execute(f'CREATE DATABASE "{self.database}"')

    def stop(self, timeout: float = 60) -> None:
        """Fast shutdown: every session is ended (clients see their connection closed), then the
        server writes its data and exits."""
        if self.running:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reap()

    def kill(self) -> None:
        """A crash: SIGKILL to the server and every backend (its process group)."""
        if self.process is not None:
            kill_group(self.process)
        self._reap()

    def restart(self) -> None:
        self.stop()
        self.start()

    def _reap(self) -> None:
        if self.process is not None:
            stop_child(self.process, timeout=10)   # (already exited: reaps it and what it left)
            self._log.close()
        self.process = None

    def terminate_connections(self) -> int:
        """pg_terminate_backend on every connection to `database` (not ours): how many."""
        import psycopg

        with psycopg.connect(self.admin_dsn, autocommit=True) as connection:
            rows = connection.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (self.database,)).fetchall()
        return sum(1 for (ended,) in rows if ended)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def output(self) -> str:
        path = self.root / "postgres.log" if self.root else None
        return path.read_text(errors="replace")[-5000:] if path and path.exists() else ""

    def close(self) -> None:
        self.kill()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


class ApiServer:
    """`genq api` (gunicorn, threaded) as a real process on a fixed port: SIGKILL it (the whole
    process group: the arbiter and its workers) and start it again on the same port."""

    def __init__(self, settings, log_path: Path, port: int | None = None, threads: int = 64):
        self.settings = settings
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.threads = threads
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> "ApiServer":
        import requests

        env = {**os.environ, **self.settings.to_env(), "GENQ_LOG_LEVEL": "WARNING"}
        self._log = open(self.log_path, "ab")
        self.process = start_child([sys.executable, "-m", "app.cli", "api", "--port", str(self.port),
                                    "--workers", "1", "--threads", str(self.threads)],
                                   env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if requests.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start:\n{self.output()}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL to the arbiter and its workers at once: connections drop mid-response."""
        if self.process is not None:
            kill_group(self.process)
            stop_child(self.process)
            self._log.close()
            self.process = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-20000:]

    def close(self) -> None:
        if self.process is not None:
            stop_child(self.process, timeout=20)
            self._log.close()
            self.process = None


class Worker:
    """One `genq worker` process; ready once its own report (by pid) is in Redis."""

    def __init__(self, settings, log_path: Path, extra_env: dict[str, str] | None = None):
        self.settings = settings
        self.log_path = Path(log_path)
        self.extra_env = extra_env or {}
        self.process: subprocess.Popen | None = None

    def start(self, wait: bool = True, timeout: float = 180) -> "Worker":
        env = {**os.environ, **self.settings.to_env(), **self.extra_env}
        self._log = open(self.log_path, "ab")
        self.process = start_child([sys.executable, "-m", "app.cli", "worker", "--loglevel", "WARNING"],
                                   env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready(timeout)
        return self

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout: float = 180) -> None:

        client = redis.Redis.from_url(self.settings.redis_url, decode_responses=True, socket_connect_timeout=2)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    if any(w.get("pid") == self.pid for w in live_workers(client, Channels(self.settings.key_prefix))):
                        return
                except redis.RedisError:
                    pass
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the worker did not start:\n{self.output()}")
                time.sleep(0.2)
        finally:
            client.close()

    def kill(self) -> None:
        if self.alive:
            self.process.kill()
            self.process.wait(30)

    def terminate(self, timeout: float) -> int | None:
        """SIGTERM; the exit code, or None if it did not exit within `timeout` (then it is killed)."""
        if not self.alive:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-20000:]

    def close(self) -> None:
        if self.alive:
            self.terminate(30)
        if self.process is not None:
            self._log.close()


class Cluster:
    """What a fault test's cluster holds in common: its `genq worker` processes and its jobs as the
    database has them. A subclass sets `settings`, `tmp` (for worker logs), `sessions` and `workers`."""

    final_timeout = 150.0        # wait_final's default, seconds
    final_poll = 0.3

    def ensure_workers(self, n: int = 2) -> None:
        self.workers = [w for w in self.workers if w.alive]
        fresh = [Worker(self.settings, self.tmp / f"worker-{secrets.token_hex(3)}.log").start(wait=False)
                 for _ in range(n - len(self.workers))]
        for worker in fresh:
            worker.wait_ready()
        self.workers += fresh

    def jobs(self, ids) -> dict[str, Job]:
        with self.sessions() as session:
            return {job.id: job for job in session.scalars(select(Job).where(Job.id.in_(list(ids))))}

    def wait_final(self, ids, timeout: float | None = None) -> dict[str, Job]:
        final = {s.value for s in FINAL_STATUSES}
        deadline = time.monotonic() + (self.final_timeout if timeout is None else timeout)
        while True:
            jobs = self.jobs(ids)
            pending = [i for i in ids if jobs[i].status not in final]
            if not pending:
                return jobs
            if time.monotonic() > deadline:
                logs = "\n".join(w.output()[-3000:] for w in self.workers)
                raise AssertionError(f"{len(pending)} job(s) never finished, e.g. {jobs[pending[0]]!r} "
                                     f"attempts={jobs[pending[0]].attempts}\n{logs}")
            time.sleep(self.final_poll)
