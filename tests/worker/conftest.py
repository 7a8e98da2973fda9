import pytest

from tests.support.service import build_tiny, service_settings


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def settings(tmp_path_factory, tiny_model_dir):
    # These tests call `run_job(job_id)` as a task would and check that job, in a database the module's
    # tests share: the task's own job is claimed (`fifo`). The fair claim, which may run another job
    # than the task's, has its own tests (test_fair_claim.py, tests/app/jobs/test_fair_queue.py) and
    # runs in every service-level test.
    with service_settings(tmp_path_factory.mktemp("worker"), model=str(tiny_model_dir), max_num_seqs=32,
                          lease_seconds=30, scheduling="fifo") as settings:
        yield settings


@pytest.fixture(scope="module")
def engine(settings):
    from worker.runtime import build_engine

    return build_engine(settings)


@pytest.fixture(scope="module")
def runtime(settings, engine):
    """A started worker runtime (engine, connections, heartbeat, control listener) on the module's engine."""
    from worker.runtime import WorkerRuntime

    runtime = WorkerRuntime(settings, engine=engine).start()
    yield runtime
    runtime.stop()
