"""Schema migrations on both metadata store backends (a SQLite file and a real PostgreSQL database)."""

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, inspect, select, text

from services.core.db import Database, Migration, UTCDateTime, create_tables, execute_sql
from services.core.errors import FailedPrecondition


def _things(md):
    return Table("things", md, Column("id", Integer, primary_key=True), Column("name", String(20)))


def test_migrations_upgrade_an_existing_database_in_place(db_url):
    v1 = [Migration(1, "things", create_tables(_things(MetaData())))]
    db = Database(db_url)
    assert db.migrate("demo", v1) == 1
    with db.session() as s:
        s.execute(text("INSERT INTO things (name) VALUES ('kept')"))
    db.dispose()

    v2 = v1 + [Migration(2, "add colour", execute_sql("ALTER TABLE things ADD COLUMN colour VARCHAR(10)"))]
    db = Database(db_url)
    assert db.schema_version("demo") == 1
    assert db.migrate("demo", v2) == 2
    assert db.migrate("demo", v2) == 2  # idempotent
    cols = {c["name"] for c in inspect(db.engine).get_columns("things")}
    assert cols == {"id", "name", "colour"}
    with db.session() as s:
        assert s.execute(text("SELECT name FROM things")).scalar() == "kept"
    db.dispose()


def test_database_newer_than_code_is_refused(db_url):
    db = Database(db_url)
    first = Migration(1, "a", create_tables(_things(MetaData())))
    db.migrate("demo", [first, Migration(2, "b", execute_sql("SELECT 1"))])
    with pytest.raises(FailedPrecondition, match="newer than this code"):
        db.migrate("demo", [first])
    db.dispose()


def test_failed_migration_rolls_back_and_keeps_version(db_url):
    db = Database(db_url)
    first = Migration(1, "a", create_tables(_things(MetaData())))
    db.migrate("demo", [first])
    # the bad statement comes after a good one: the whole migration is one transaction, so the column
    # added first is gone too (PostgreSQL and SQLite both have transactional DDL)
    bad = [first, Migration(2, "broken", execute_sql("ALTER TABLE things ADD COLUMN colour VARCHAR(10)",
                                                     "ALTER TABLE nope ADD x INT"))]
    with pytest.raises(Exception, match="nope"):
        db.migrate("demo", bad)
    assert db.schema_version("demo") == 1
    assert {c["name"] for c in inspect(db.engine).get_columns("things")} == {"id", "name"}
    db.dispose()


def test_times_come_back_as_the_same_utc_instant(db_url):
    """A stored time reads back as the same instant in UTC, whatever zone it was written in (SQLite keeps no
    zone: without UTCDateTime it would store the wall-clock time and give it back naive)."""
    table = Table("stamps", MetaData(), Column("id", Integer, primary_key=True),
                  Column("at", UTCDateTime, nullable=False))
    db = Database(db_url)
    db.migrate("demo", [Migration(1, "stamps", create_tables(table))])
    written = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    with db.session() as s:
        s.execute(table.insert().values(id=1, at=written))
    with db.session() as s:
        read = s.execute(select(table.c.at)).scalar_one()
        newer = s.execute(select(table.c.id).where(table.c.at > written - timedelta(microseconds=1))).scalar()
    assert read == written and read.tzinfo == UTC and newer == 1
    naive = datetime(2026, 1, 2, 3, 4, 5)  # a naive time is taken as UTC
    with db.session() as s:
        s.execute(table.insert().values(id=2, at=naive))
        assert s.execute(select(table.c.at).where(table.c.id == 2)).scalar_one() == naive.replace(tzinfo=UTC)
    db.dispose()


def test_replicas_starting_together_apply_each_migration_once(db_url):
    """Four replicas open and migrate one fresh database at the same moment: every one starts, and the
    schema holds each migration once (the migration lock serialises them)."""
    migrations = [Migration(1, "things", create_tables(_things(MetaData()))),
                  Migration(2, "add colour", execute_sql("ALTER TABLE things ADD COLUMN colour VARCHAR(10)"))]
    barrier = threading.Barrier(4)

    def replica() -> int:
        barrier.wait(30)
        db = Database(db_url)
        try:
            return db.migrate("demo", migrations)
        finally:
            db.dispose()

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda _: replica(), range(4))) == [2, 2, 2, 2]
    db = Database(db_url)
    with db.session() as s:
        applied = s.execute(text("SELECT version FROM schema_migrations WHERE component = 'demo'")).scalars().all()
    assert sorted(applied) == [1, 2]
    db.dispose()
