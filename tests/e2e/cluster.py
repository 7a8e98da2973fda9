"""Real processes for fault tests and the chaos soak: a redis-server we may stop and restart (its data
kept in an append-only file), and `genq worker` processes we may SIGKILL or SIGTERM (each in a process
group of its own, ended with the test run: tests/support/processes.py)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

from app.infra.channels import Channels
from app.infra.worker_reports import live_workers
from tests.support.processes import start_child

ROOT = Path(__file__).resolve().parents[2]
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """redis-server on a free port with AOF (fsync always) in `data_dir`: a stop and start keeps
    every acknowledged write, as a production Redis with appendonly does."""

    def __init__(self, data_dir: Path, port: int | None = None):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> "RedisServer":
        self.process = start_child(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "no"],
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

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(signal.SIGKILL)


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
