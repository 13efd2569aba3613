"""Metadata store: SQLAlchemy 2 over a SQLite file by default, PostgreSQL by URL.

Schema versioning: each component (a service's own tables, the job runtime's tables) owns an
ordered list of ``Migration``s. ``Database.migrate(component, migrations)`` applies the ones a
database has not seen yet, in order, each in its own transaction, and records them in
``schema_migrations``. An existing database is upgraded in place; a database newer than the code
is refused with a clear error instead of being used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import cast

from sqlalchemy import Connection, DateTime, Engine, Integer, String, Table, create_engine, event, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from .errors import FailedPrecondition
from .logging import get_logger

log = get_logger(__name__)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Declarative base for every service's tables (each service has its own database)."""


class SchemaMigration(Base):
    __tablename__ = "schema_migrations"
    component: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    description: Mapped[str] = mapped_column(String(200))
    applied_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


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
        _migrations_table().create(self.engine, checkfirst=True)

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session in a transaction: committed on success, rolled back on error."""
        with self._sessions() as s, s.begin():
            yield s

    def schema_version(self, component: str) -> int:
        with self.engine.connect() as conn:
            v = conn.execute(
                select(SchemaMigration.version)
                .where(SchemaMigration.component == component)
                .order_by(SchemaMigration.version.desc())
                .limit(1)
            ).scalar()
        return int(v or 0)

    def migrate(self, component: str, migrations: Sequence[Migration]) -> int:
        """Apply pending migrations of ``component``; returns the resulting version."""
        versions = [m.version for m in migrations]
        if versions != sorted(set(versions)) or (versions and versions[0] < 1):
            raise ValueError(f"migrations of {component} must have strictly increasing versions >= 1")
        current = self.schema_version(component)
        latest = versions[-1] if versions else 0
        if current > latest:
            raise FailedPrecondition(
                f"database schema of {component} is at version {current}, newer than this code ({latest}); "
                "upgrade the service",
                reason="SCHEMA_TOO_NEW",
            )
        for m in migrations:
            if m.version <= current:
                continue
            with self.engine.begin() as conn:
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


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def execute_sql(*statements: str) -> Callable[[Connection], None]:
    """A migration step running raw SQL statements (for ALTERs in later versions)."""

    def _apply(conn: Connection) -> None:
        for stmt in statements:
            conn.execute(text(stmt))

    return _apply
