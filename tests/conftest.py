"""Shared fixtures: a real S3 server (nanio) on loopback for the whole session, a fresh bucket
per test, and S3 settings pointing at it; the metadata store's backends (SQLite and PostgreSQL, see
``tests/support/databases.py``)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The SDK takes TLS files from YARD_TLS_* or from the data dir `yard up --tls` wrote (~/.modelyard): the
# tests' servers are plaintext, whatever the developer's data dir holds (a TLS test sets its own).
for _name in ("YARD_TLS_CA_FILE", "YARD_TLS_CERT_FILE", "YARD_TLS_KEY_FILE"):
    os.environ[_name] = ""

from cli.s3server import start_s3_server  # noqa: E402
from services.core.settings import S3Settings  # noqa: E402
from tests.support import databases  # noqa: E402
from tests.support.s3 import s3_bucket  # noqa: E402


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = start_s3_server(tmp_path_factory.mktemp("s3-data"))
    yield server
    server.stop()


@pytest.fixture
def s3_settings(s3_server) -> S3Settings:
    """S3 settings with a bucket of its own for this test (created by the store on start)."""
    return s3_bucket(s3_server)


@pytest.fixture(params=databases.enabled_backends())
def db_backend(request):
    """Run the test once per metadata store backend (SQLite, PostgreSQL; ``YARD_TEST_DATABASES`` narrows it).

    Hands out fresh databases of this backend (``databases=`` of the stack helpers: one per service); the
    PostgreSQL ones are dropped after the test."""
    dbs = databases.Databases(request.param)
    yield dbs
    dbs.close()


@pytest.fixture
def postgres_backend():
    """Like ``db_backend``, PostgreSQL only: for a slow test whose SQLite run is another test already."""
    databases.require_postgresql()
    dbs = databases.Databases("postgresql")
    yield dbs
    dbs.close()


@pytest.fixture
def db_url(db_backend, tmp_path) -> str:
    """One fresh, empty database of the test's backend (a SQLite file, or a PostgreSQL database)."""
    return db_backend.new_url(tmp_path / "db" / "store.db")


@pytest.fixture
def pg_url():
    """The URL of a fresh, empty PostgreSQL database (dropped after the test)."""
    with databases.pg_database() as url:
        yield url
