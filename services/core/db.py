"""Metadata store: SQLAlchemy 2 over a SQLite file by default, PostgreSQL by URL.

Schema versioning: each component (a service's own tables, the job runtime's tables) owns an
ordered list of ``Migration``s. ``Database.migrate(component, migrations)`` applies the ones a
database has not seen yet, in order, each in its own transaction, and records them in
``schema_migrations``. An existing database is upgraded in place; a database newer than the code
is refused with a clear error instead of being used. Migrations hold a database-wide lock (PostgreSQL: an
advisory lock; SQLite: the write lock), so replicas starting together apply each one once.

Times: columns of type ``UTCDateTime`` store UTC and read back timezone-aware (UTC) on both backends
(SQLite keeps no zone: without it a time written with an offset would be stored as its wall-clock time
and read back naive).
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from sqlalchemy import (
    Connection,
    DateTime,
    Dialect,
    Engine,
    Integer,
    String,
    Table,
    TypeDecorator,
    create_engine,
    event,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from .errors import FailedPrecondition
from .logging import get_logger

log = get_logger(__name__)

R = TypeVar("R", bound="Base")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A point in time: written as UTC (a naive value is taken as UTC), read back timezone-aware in UTC, on
    SQLite as on PostgreSQL. Filters compare in UTC too (their values go through the same conversion)."""

    impl = DateTime
    cache_ok = True

    def __init__(self) -> None:
        super().__init__(timezone=True)

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# Key of the PostgreSQL advisory lock migrations hold (one per database; any constant 64-bit integer).
_PG_MIGRATION_LOCK = int.from_bytes(hashlib.sha256(b"modelyard:schema_migrations").digest()[:8], "big", signed=True)


class Base(DeclarativeBase):
    """Declarative base for every service's tables (each service has its own database)."""


class SchemaMigration(Base):
    __tablename__ = "schema_migrations"
    component: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    description: Mapped[str] = mapped_column(String(200))
    applied_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


def _migrations_table() -> Table:
    return cast(Table, SchemaMigration.__table__)


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Connection], None]


def create_tables(*tables) -> Callable[[Connection], None]:
    """A migration step that creates the given ``Table`` objects (for a component's first version)."""

    def _apply(conn: Connection) -> None:
        for table in tables:
            table.create(conn, checkfirst=True)

    return _apply


class Database:
    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        kwargs: dict = {"echo": echo, "future": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs["pool_pre_ping"] = True
        self.engine: Engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        with self._migration_lock() as conn:  # replicas starting together: one creates it, the others see it
            _migrations_table().create(conn, checkfirst=True)

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session in a transaction: committed on success, rolled back on error."""
        with self._sessions() as s, s.begin():
            yield s

    @contextlib.contextmanager
    def _migration_lock(self) -> Iterator[Connection]:
        """A transaction holding the database's migration lock until it ends.

        PostgreSQL: a transaction-scoped advisory lock. SQLite: ``BEGIN IMMEDIATE`` (the write lock), which
        also makes the DDL transactional: the driver issues no BEGIN before DDL by itself, so without it each
        statement of a failed migration before the failing one would stay applied."""
        with self.engine.begin() as conn:
            if self.is_sqlite:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            elif self.engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
            yield conn

    @staticmethod
    def _version(conn: Connection, component: str) -> int:
        v = conn.execute(
            select(SchemaMigration.version)
            .where(SchemaMigration.component == component)
            .order_by(SchemaMigration.version.desc())
            .limit(1)
        ).scalar()
        return int(v or 0)

    def schema_version(self, component: str) -> int:
        with self.engine.connect() as conn:
            return self._version(conn, component)

    def migrate(self, component: str, migrations: Sequence[Migration]) -> int:
        """Apply pending migrations of ``component``; returns the resulting version."""
        versions = [m.version for m in migrations]
        if versions != sorted(set(versions)) or (versions and versions[0] < 1):
            raise ValueError(f"migrations of {component} must have strictly increasing versions >= 1")
        current = self.schema_version(component)
        latest = versions[-1] if versions else 0
        _check_not_newer(component, current, latest)
        for m in migrations:
            if m.version <= current:
                continue
            with self._migration_lock() as conn:
                current = self._version(conn, component)  # another replica may have applied it meanwhile
                _check_not_newer(component, current, latest)
                if m.version <= current:
                    continue
                m.apply(conn)
                conn.execute(
                    _migrations_table()
                    .insert()
                    .values(component=component, version=m.version, description=m.description, applied_at=utcnow())
                )
            log.info("schema_migrated", component=component, version=m.version, description=m.description)
            current = m.version
        return current

    def dispose(self) -> None:
        self.engine.dispose()


def _check_not_newer(component: str, current: int, latest: int) -> None:
    if current > latest:
        raise FailedPrecondition(
            f"database schema of {component} is at version {current}, newer than this code ({latest}); "
            "upgrade the service",
            reason="SCHEMA_TOO_NEW",
        )


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout=30000")
    # Switching a fresh file to WAL takes an exclusive lock without calling the busy handler: replicas opening
    # one new database together get "database is locked" at once, so the switch is retried here (WAL persists
    # in the file, so later connections find it set and take no lock).
    deadline = time.monotonic() + 30
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def execute_sql(*statements: str) -> Callable[[Connection], None]:
    """A migration step running raw SQL statements (for ALTERs in later versions)."""

    def _apply(conn: Connection) -> None:
        for stmt in statements:
            conn.execute(text(stmt))

    return _apply


def lock_or_create(s: Session, entity: type[R], values: dict[str, Any]) -> R:
    """The row of ``entity`` whose primary key is in ``values``, inserted from ``values`` when missing, and
    locked until the session's transaction ends: concurrent callers (threads, processes, replicas) take
    their turn, and none fails because another created the row first.

    ``INSERT ... ON CONFLICT DO NOTHING``, then ``SELECT ... FOR UPDATE`` on PostgreSQL; on SQLite the INSERT
    takes the database's write lock for the transaction (SQLite has no row locks).
    """
    table = cast(Table, entity.__table__)
    keys = [c.name for c in table.primary_key.columns]
    insert = postgresql.insert if s.get_bind().dialect.name == "postgresql" else sqlite.insert
    s.execute(insert(table).values(**values).on_conflict_do_nothing(index_elements=keys))
    ident = tuple(values[k] for k in keys)
    row = s.get(entity, ident[0] if len(ident) == 1 else ident, with_for_update=True, populate_existing=True)
    if row is None:  # pragma: no cover - inserted or found above, in this transaction
        raise RuntimeError(f"{table.name} row {ident} vanished")
    return row
