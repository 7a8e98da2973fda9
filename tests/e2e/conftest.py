import pytest

from tests.support.service import ServerThread, WorkerProcess, build_tiny, service_settings


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir):
    """The whole service: the API on real HTTP, one real `genq worker` process (Celery), Redis and
    the primary database. Yields (settings, API base URL, worker)."""
    from app.api import create_app

    tmp = tmp_path_factory.mktemp("e2e")
    with service_settings(tmp, model=str(tiny_model_dir), max_num_seqs=64, lease_seconds=30) as settings, \
            WorkerProcess(settings, tmp / "worker.log") as worker, \
            ServerThread(create_app(settings)) as server:
        yield settings, server.url, worker
