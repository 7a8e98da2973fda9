"""Database outages for unit tests: the errors a dropped PostgreSQL connection raises, and a store
function patched to fail after its write was committed (the answer lost on the way back)."""
from __future__ import annotations

import psycopg
from sqlalchemy import exc as sa


def dropped_connection() -> sa.OperationalError:
    """What SQLAlchemy raises when the server closes the connection under a statement."""
    return sa.OperationalError("UPDATE ...", {}, psycopg.OperationalError("server closed the connection unexpectedly"))


def commits_then_drops(monkeypatch, module, name: str, times: int = 1) -> list:
    """Replace `module.name(session, ...)` by one that does its work, commits it, and then raises a
    dropped connection, for the first `times` calls (then it is the real function). Returns the list
    of calls that failed so."""
    real = getattr(module, name)
    failed: list = []

    def flaky(session, *args, **kwargs):
        result = real(session, *args, **kwargs)
        if len(failed) < times:
            session.commit()
            failed.append(result)
            raise dropped_connection()
        return result

    monkeypatch.setattr(module, name, flaky)
    return failed


def always_drops(monkeypatch, module, name: str) -> list:
    """Replace `module.name` by one that always raises a dropped connection (writing nothing)."""
    calls: list = []

    def down(*args, **kwargs):
        calls.append(args)
        raise dropped_connection()

    monkeypatch.setattr(module, name, down)
    return calls
