"""The metadata store a test runs on: a SQLite file (the embedded default) or a PostgreSQL database of its
own on the real server at 127.0.0.1:5432 (user ``postgres``, trust auth), created empty for the test
(``yard_t_<random>``) and dropped after it.

One place decides which backends the tests run on (``YARD_TEST_DATABASES``, default ``sqlite,postgresql``)
and hands out the URLs:

- ``tests/conftest.py``'s ``db_backend`` fixture (parametrized over those backends) is a ``Databases`` for
  the test (``postgres_backend``: PostgreSQL only); ``db_url`` is one fresh database of that backend.
- The stack helpers (``tests/support/*_stack.py``) take it as ``databases=`` and give each service a fresh
  database of its own (services never share one); without it each service keeps its SQLite file in its
  data dir. The registry fixture of ``test_registry.py`` takes the one its test asked for (``of_request``).

``YARD_TEST_DATABASES=sqlite`` (a machine without PostgreSQL) runs the SQLite half and skips the tests that
need PostgreSQL; otherwise an unreachable server fails the tests that need it, with the reason.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

PG_HOST = os.environ.get("YARD_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("YARD_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("YARD_TEST_PG_USER", "postgres")
# The database the test databases are created from a connection to (never dropped or altered).
PG_ADMIN_URL = f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/postgres"
PREFIX = "yard_t_"
BACKENDS = ("sqlite", "postgresql")


def enabled_backends() -> list[str]:
    """The backends the store tests run on: ``YARD_TEST_DATABASES`` (comma separated), default both."""
    raw = os.environ.get("YARD_TEST_DATABASES", ",".join(BACKENDS))
    chosen = [b.strip() for b in raw.split(",") if b.strip()]
    unknown = sorted(set(chosen) - set(BACKENDS))
    if unknown or not chosen:
        raise ValueError(f"YARD_TEST_DATABASES={raw!r}: expected a comma separated subset of {', '.join(BACKENDS)}")
    return chosen


def require_postgresql() -> None:
    """Skip the calling test (or fixture) when ``YARD_TEST_DATABASES`` leaves PostgreSQL out."""
    if "postgresql" not in enabled_backends():
        pytest.skip("PostgreSQL is not among YARD_TEST_DATABASES")


def pg_url(name: str) -> str:
    return f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"


def create_pg_database(label: str = "") -> str:
    """A new empty PostgreSQL database (``yard_t_[<label>_]<random>``); its name."""
    name = f"{PREFIX}{label[:16] + '_' if label else ''}{uuid.uuid4().hex[:16]}"
    try:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as e:  # PostgreSQL runs as a system service here and in CI
        raise RuntimeError(
            f"PostgreSQL at {PG_HOST}:{PG_PORT} is unreachable ({e}); start it, or run only the SQLite half of the "
            "store tests with YARD_TEST_DATABASES=sqlite"
        ) from e
    return name


def drop_pg_databases(names: list[str]) -> None:
    """Drop databases this test run created (connections still open to them are terminated)."""
    if not names:
        return
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=10) as conn:
        for name in names:
            assert name.startswith(PREFIX), name  # only ever what create_pg_database made
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def pg_database() -> Iterator[str]:
    """The URL of a fresh PostgreSQL database, dropped on exit."""
    require_postgresql()
    name = create_pg_database()
    try:
        yield pg_url(name)
    finally:
        drop_pg_databases([name])


class Databases:
    """Fresh databases of one backend for one test (or one module), dropped by ``close``."""

    def __init__(self, backend: str) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown database backend {backend!r}")
        self.backend = backend
        self._created: list[str] = []
        self._lock = threading.Lock()

    @property
    def postgresql(self) -> bool:
        return self.backend == "postgresql"

    def new_url(self, sqlite_file: Path) -> str:
        """A fresh, empty database: ``sqlite_file`` (must not exist yet) or a new PostgreSQL database."""
        if not self.postgresql:
            sqlite_file.parent.mkdir(parents=True, exist_ok=True)
            return f"sqlite:///{sqlite_file}"
        name = create_pg_database()
        with self._lock:
            self._created.append(name)
        return pg_url(name)

    def service_url(self, service: str) -> str:
        """A service's ``database_url``: "" (its SQLite file in its data dir) or a new PostgreSQL database."""
        if not self.postgresql:
            return ""
        name = create_pg_database(service)
        with self._lock:
            self._created.append(name)
        return pg_url(name)

    def close(self) -> None:
        with self._lock:
            names, self._created = self._created, []
        drop_pg_databases(names)


def service_url(service: str, databases: Databases | None) -> str:
    """The ``database_url`` a stack helper gives ``service``: a fresh database from ``databases``, or "" (the
    service's SQLite file in its data dir) without."""
    return databases.service_url(service) if databases is not None else ""


def of_request(request) -> Databases | None:
    """The ``Databases`` a test asked for (``db_backend`` or ``postgres_backend``), set up now so that a fixture
    building a service after it gets that backend; None when the test asked for neither (SQLite)."""
    for fixture in ("db_backend", "postgres_backend"):
        if fixture in request.fixturenames:
            return request.getfixturevalue(fixture)
    return None
