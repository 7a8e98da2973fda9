"""Suite-wide set-up.

- Kernel tests run Triton under its CPU interpreter; the variable must be set before triton is
  first imported anywhere in the process.
- One intra-op thread per process: the suite runs an API, workers and the test process side by
  side on a 2-core machine, and OpenMP threads spinning against each other make small tensor ops
  tens of times slower. Subprocesses inherit the variable.
- Nothing a run starts outlives it: every process it starts inherits the run's token in
  GENQ_TEST_RUN; SIGTERM interrupts the run as Ctrl-C does (fixtures still tear down); and at the
  end the harness's children and embedded Redis servers are stopped, then anything else of the run's
  own (by that token, or a working directory under the run's temporary directory) is reported and
  stopped (tests/support/processes.py). A system Redis or another run's processes are never touched.
"""
import os
import secrets
import signal
import sys
import threading

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("GENQ_WEBHOOK_ALLOW_PRIVATE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

RUN_TOKEN = secrets.token_hex(6)
os.environ["GENQ_TEST_RUN"] = f"{os.environ.get('GENQ_TEST_RUN', '')} {RUN_TOKEN}".strip()

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
    signal.signal(signal.SIGTERM, _interrupt)

_run_dirs: list = []


@pytest.fixture(scope="session", autouse=True)
def _run_temp_dir(tmp_path_factory):
    """Where this run's temporary directories are (the end-of-run check looks for processes there)."""
    _run_dirs.append(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module", autouse=True)
def _module_job_hooks():
    """The apps and workers a test module creates register job-transition hooks (webhook dispatcher,
    batch progress) for their own deployment; they go when the module ends, so a later module's jobs
    never reach a deployment that is gone (one whose database was a closed port retries each event)."""
    from app.jobs import transitions

    before = transitions.hooks()
    yield
    for hook in transitions.hooks():
        if hook not in before:
            transitions.unregister(hook)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
    from tests.support import processes

    processes.stop_children()
    redis_client = sys.modules.get("app.infra.redis_client")
    if redis_client is not None:
        redis_client.shutdown_embedded_redis()
    left = processes.wait_for_none(RUN_TOKEN, _run_dirs, timeout=2)
    if left:
        report = processes.describe(left)
        processes.end(left)
        message = f"genq: {len(left)} process(es) of this test run were still running, now stopped:\n{report}"
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(message, yellow=True)
        else:
            print(message, file=sys.stderr)
