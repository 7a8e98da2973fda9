import pytest

from app.infra.db import session_factory
from app.jobs.models import FairShare, Job
from tests.support.service import database_for_tests


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory):
    with database_for_tests("sqlite", tmp_path_factory.mktemp("sqlite")) as url:
        yield url


@pytest.fixture(scope="session")
def postgresql_url(tmp_path_factory):
    with database_for_tests("postgresql", tmp_path_factory.mktemp("pg")) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request):
    """A migrated database of each kind, emptied before the test."""
    from sqlalchemy import delete

    url = request.getfixturevalue(f"{request.param}_url")
    with session_factory(url).begin() as session:
        session.execute(delete(Job))
        session.execute(delete(FairShare))
    return url


@pytest.fixture
def sessions(db_url):

    return session_factory(db_url)
