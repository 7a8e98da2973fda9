import pytest

from tests.support.service import build_tiny, service_settings


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def settings(tmp_path_factory, tiny_model_dir):
    with service_settings(tmp_path_factory.mktemp("worker"), model=str(tiny_model_dir), max_num_seqs=32,
                          lease_seconds=30) as settings:
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
