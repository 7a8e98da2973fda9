"""Database engine and session factory (SQLAlchemy 2), shared by the API and the worker.

SQLite is the embedded default (WAL, so the API reads while the worker writes); PostgreSQL is the
production database. Every timestamp is stored and returned as an aware UTC datetime.
"""
from __future__ import annotations

import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import JSON, DateTime, MetaData, Text, create_engine, event
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

SQLITE_BUSY_TIMEOUT_MS = 30_000

_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
JSONType = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes on every dialect (SQLite has no time zones: it stores naive UTC)."""
    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTCDateTime column")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


NUL_ESCAPE = "\uffff"   # a Unicode noncharacter: text practically never contains it


class NulSafeText(TypeDecorator):
    """Text that may contain NUL characters (models can generate them), which PostgreSQL text
    refuses. On PostgreSQL a NUL is stored as U+FFFF "0" and a literal U+FFFF as two of them; the
    mapping is undone on read, and other text is stored unchanged."""
    impl = Text
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None or dialect.name != "postgresql" or ("\x00" not in value and NUL_ESCAPE not in value):
            return value
        return value.replace(NUL_ESCAPE, NUL_ESCAPE * 2).replace("\x00", NUL_ESCAPE + "0")

    def process_result_value(self, value, dialect):
        if value is None or dialect.name != "postgresql" or NUL_ESCAPE not in value:
            return value
        out, i = [], 0
        while i < len(value):
            if value[i] == NUL_ESCAPE and i + 1 < len(value):
                out.append("\x00" if value[i + 1] == "0" else NUL_ESCAPE)
                i += 2
            else:
                out.append(value[i])
                i += 1
        return "".join(out)


def create_db_engine(url: str, **kwargs) -> Engine:
    """A new engine for `url`; SQLite files get WAL, a busy timeout and their directory created."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs.setdefault("connect_args", {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000,
                                           "factory": _writer_queue_connection(parsed.database or ":memory:")})
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        event.listen(engine, "before_cursor_execute", _sqlite_before_write)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 40)
    return create_engine(url, **kwargs)


def _sqlite_on_connect(dbapi_connection, _record) -> None:
    # Take transaction control from pysqlite (which BEGINs only before DML) so that a transaction
    # is one snapshot. Write transactions in genq start with their write, so a deferred BEGIN takes
    # the write lock on that first statement and waits on the busy timeout, never on an upgrade.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_on_begin(connection) -> None:
    connection.exec_driver_sql("BEGIN")


# SQLite has one writer at a time. A thread that finds the database locked waits in SQLite's busy
# handler, which sleeps 1, 2, 5, 10, ... 100 ms between retries: with a few threads writing at
# once (the API under load) most of the time goes to those sleeps. Threads of one process instead
# queue on a lock per database file, taken at a transaction's first write and released once its
# COMMIT or ROLLBACK is done, so the next writer starts the moment the last one finished.
_write_locks: dict[str, threading.Lock] = {}
_write_locks_lock = threading.Lock()
_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")


def _writer_queue_connection(database: str) -> type[sqlite3.Connection]:
    with _write_locks_lock:
        lock = _write_locks.setdefault(str(Path(database).resolve()) if database != ":memory:" else database,
                                       threading.Lock())

    class WriterQueueConnection(sqlite3.Connection):
        holds_write_lock = False

        def acquire_write_lock(self) -> None:
            if not self.holds_write_lock:
                # Bounded like SQLite's own wait: a writer nested inside another's transaction
                # fails as "database is locked" instead of hanging.
                if not lock.acquire(timeout=SQLITE_BUSY_TIMEOUT_MS / 1000):
                    raise sqlite3.OperationalError("database is locked (another writer of this process)")
                self.holds_write_lock = True

        def _release_write_lock(self) -> None:
            if self.holds_write_lock:
                self.holds_write_lock = False
                lock.release()

        def commit(self) -> None:
            try:
                super().commit()
            finally:
                self._release_write_lock()

        def rollback(self) -> None:
            try:
                super().rollback()
            finally:
                self._release_write_lock()

        def close(self) -> None:
            try:
                super().close()
            finally:
                self._release_write_lock()

    return WriterQueueConnection


def _sqlite_before_write(connection, cursor, statement, parameters, context, executemany) -> None:
    if statement.lstrip()[:7].upper().startswith(_WRITES):
        dbapi = connection.connection.dbapi_connection
        if hasattr(dbapi, "acquire_write_lock"):
            dbapi.acquire_write_lock()


def get_engine(url: str) -> Engine:
    """One engine (and connection pool) per URL per process."""
    with _engines_lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = create_db_engine(url)
        return engine


def session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(url), expire_on_commit=False)


def dispose_engines() -> None:
    with _engines_lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
