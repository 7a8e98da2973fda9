"""RFC 9457 problem details as an exception, Flask-free: domain code raises `Problem` for what it
refuses, and the API renders it as `application/problem+json` (app/api/problems.py). `Unavailable`
and `outage(exc)`: the database or Redis is down, a 503 with Retry-After instead of a 500.
"""
from __future__ import annotations

import sqlite3
from typing import Any

import psycopg
from kombu.exceptions import OperationalError as BrokerError
from redis import exceptions as redis_errors
from sqlalchemy import exc as sa


class Problem(Exception):
    """Raise anywhere in a request to answer with a problem document."""

    def __init__(self, status: int, detail: str, *, title: str | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None, **extensions: Any):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.title = title
        self.type = type
        self.headers = headers or {}
        self.extensions = extensions


# A dependency outage ---------------------------------------------------------------------------
#
# The database or Redis not answering (refused, dropped mid-request, the pool exhausted) is not a
# bug: the client is told which dependency is down and when to retry (503 + Retry-After), never a
# 500. `outage(exc)` says whether an exception is such an outage; anything else stays a bug.

OUTAGE_RETRY_AFTER_SECONDS = 5
DATABASE = "database"
REDIS = "redis"
_DEPENDENCY_NAMES = {DATABASE: "the database", REDIS: "Redis"}

# SQLite's OperationalError is also its syntax error and its missing table (bugs): only these are outages.
_SQLITE_TRANSIENT = ("database is locked", "database table is locked", "unable to open", "disk i/o error",
                     "database or disk is full")


class Unavailable(Problem):
    """503 + Retry-After: `dependency` (DATABASE or REDIS) is down; the request may be retried."""

    def __init__(self, dependency: str, detail: str | None = None, *,
                 retry_after: int = OUTAGE_RETRY_AFTER_SECONDS):
        name = _DEPENDENCY_NAMES[dependency]
        super().__init__(503, detail or f"{name} is unavailable; retry in {retry_after} s",
                         title="Service unavailable", type=f"{dependency}-unavailable",
                         headers={"Retry-After": str(retry_after)}, dependency=dependency)
        self.dependency = dependency


def outage(exc: BaseException) -> Unavailable | None:
    """The `Unavailable` for an exception that means the database or Redis is down (the exception
    itself or what it was raised from), else None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, Unavailable):
            return current
        dependency = _dependency_down(current)
        if dependency is not None:
            return Unavailable(dependency)
        current = current.__cause__
    return None


def _dependency_down(exc: BaseException) -> str | None:
    if isinstance(exc, (sa.TimeoutError, sa.DisconnectionError)):    # the pool: none in time, or none that works
        return DATABASE
    if isinstance(exc, sa.DBAPIError):
        if exc.connection_invalidated or isinstance(exc, sa.InterfaceError):
            return DATABASE
        if isinstance(exc, sa.OperationalError):
            if isinstance(exc.orig, sqlite3.OperationalError):
                return DATABASE if str(exc.orig).lower().startswith(_SQLITE_TRANSIENT) else None
            return DATABASE
        return None
    if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
        return DATABASE
    if isinstance(exc, (redis_errors.ConnectionError, redis_errors.TimeoutError, BrokerError)):
        return REDIS
    return None

