"""Database engine and session factory (SQLAlchemy 2), shared by the API and the worker.

SQLite is the embedded default (WAL, so the API reads while the worker writes); PostgreSQL is the
production database. Every timestamp is stored and returned as an aware UTC datetime.
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

try:
    import fcntl
except ImportError:   # pragma: no cover - not on Windows: writers of several processes meet SQLite's busy handler
    fcntl = None

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


# SQLite has one writer at a time. A writer that finds the database locked waits in SQLite's busy
# handler, which sleeps 1, 2, 5, 10, ... 100 ms between retries: with a few writers at once (the API
# under load, the worker's claims) most of the time goes to those sleeps. genq's writers queue
# instead, from a transaction's first write until its COMMIT or ROLLBACK is done, so the next one
# starts soon after the last one finished: threads of one process on a lock per database file, and
# processes (the API's, the workers') on an advisory lock (flock) of a file beside it,
# `<database>-writers`, polled every 0.2 ms at first, backing off to 0.5 ms. A writer that is not
# genq's (a migration, the sqlite3 shell) still meets SQLite's own lock and busy handler: nothing
# depends on the queue for correctness, only for speed. Where the file cannot be opened, processes
# fall back to the busy handler. (A process whose threads write back to back can take the file lock
# again before a waiting process polls: the queue is not fair between processes.)
WRITER_POLL_SECONDS = 0.0002       # the first pause of a writer waiting for another process's, doubling to
WRITER_POLL_MAX_SECONDS = 0.0005   # this
_write_locks: dict[str, _WriterQueue] = {}
_write_locks_lock = threading.Lock()
_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")


class _WriterQueue:
    """The writers' queue of one database file: a thread lock, then (files only) the file lock."""

    def __init__(self, database: str):
        self.lock = threading.Lock()
        self.path = None if database == ":memory:" else f"{database}-writers"
        self._fd: int | None = None
        self._opened = False

    def acquire(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        if not self.lock.acquire(timeout=timeout):
            return False
        fd, pause = self._file(), WRITER_POLL_SECONDS
        while fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    self.lock.release()
                    return False
                time.sleep(pause)
                pause = min(2 * pause, WRITER_POLL_MAX_SECONDS)
        return True

    def release(self) -> None:
        try:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self.lock.release()

    def _file(self) -> int | None:
        """This process's descriptor of the lock file, opened on first use (read-only is enough for
        flock, so a writer running as another user can share it); None where there is none."""
        if not self._opened and self.path is not None and fcntl is not None:
            self._opened = True
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            except OSError:
                self._fd = None
        return self._fd

    def forget(self) -> None:
        """In a forked child: a lock of its own, and a descriptor of its own on first use. The
        inherited descriptor shares the parent's lock (an flock belongs to the open file, which a
        fork shares), so it is closed; that does not release the parent's lock."""
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
        self.lock, self._fd, self._opened = threading.Lock(), None, False


def _forget_writer_queues() -> None:
    global _write_locks_lock
    _write_locks_lock = threading.Lock()   # (another thread of the parent may have held it)
    for queue in _write_locks.values():
        queue.forget()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_writer_queues)


def _writer_queue_connection(database: str) -> type[sqlite3.Connection]:
    key = str(Path(database).resolve()) if database != ":memory:" else database
    with _write_locks_lock:
        queue = _write_locks.setdefault(key, _WriterQueue(key))

    class WriterQueueConnection(sqlite3.Connection):
        holds_write_lock = False

        def acquire_write_lock(self) -> None:
            if not self.holds_write_lock:
                # Bounded like SQLite's own wait: a writer nested inside another's transaction
                # fails as "database is locked" instead of hanging.
                if not queue.acquire(timeout=SQLITE_BUSY_TIMEOUT_MS / 1000):
                    raise sqlite3.OperationalError("database is locked (another genq writer)")
                self.holds_write_lock = True

        def _release_write_lock(self) -> None:
            if self.holds_write_lock:
                self.holds_write_lock = False
                queue.release()

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
