"""Database connections survive a PostgreSQL restart: pooled connections are pre-pinged, so the
first transaction after the restart gets a fresh connection instead of a dead one. Runs its own
throwaway PostgreSQL cluster (initdb as the postgres user) on a free port; skipped without one."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from app.infra.db import session_factory
from app.infra.migrate import upgrade
from app.jobs.models import Job
from tests.support.service import free_port

PG_BIN = Path("/usr/lib/postgresql")


def _pg_tool(name: str) -> str | None:
    found = sorted(PG_BIN.glob(f"*/bin/{name}"))
    return str(found[-1]) if found else shutil.which(name)


def _as_postgres(*cmd: str) -> subprocess.CompletedProcess:
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120)


@pytest.fixture
def own_postgres():
    initdb, pg_ctl = _pg_tool("initdb"), _pg_tool("pg_ctl")
    if not initdb or not pg_ctl or (os.geteuid() == 0 and not shutil.which("runuser")):
        pytest.skip("initdb/pg_ctl not available")
    root = Path(tempfile.mkdtemp(prefix="genq-pg-"))
    os.chmod(root, 0o777)
    data, port = root / "data", free_port()
    done = _as_postgres(initdb, "-D", str(data), "-A", "trust", "-U", "postgres")
    if done.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"initdb failed: {done.stderr[-500:]}")
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
    ctl = lambda *args: _as_postgres(pg_ctl, "-D", str(data), "-w", "-t", "60", *args)  # noqa: E731
    assert ctl("-o", options, "-l", str(root / "pg.log"), "start").returncode == 0
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres", lambda: ctl(
            "-o", options, "-l", str(root / "pg.log"), "-m", "fast", "restart")
    finally:
        ctl("-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


def test_connections_survive_a_postgres_restart(own_postgres):
    from app.jobs import store

    url, restart = own_postgres
    upgrade(url)
    sessions = session_factory(url)
    with sessions.begin() as session:
        first = store.create_job(session, model="tiny", input={"prompt": "before"}).id
    assert restart().returncode == 0            # every pooled connection is now dead
    with sessions.begin() as session:           # pre-ping replaces it: no error here
        second = store.create_job(session, model="tiny", input={"prompt": "after"}).id
    with sessions() as session:
        assert {job.id for job in session.query(Job).filter(Job.id.in_([first, second]))} == {first, second}
