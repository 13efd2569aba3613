import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, inspect, text

from services.core.db import Database, Migration, create_tables, execute_sql
from services.core.errors import FailedPrecondition


def _things(md):
    return Table("things", md, Column("id", Integer, primary_key=True), Column("name", String(20)))


def test_migrations_upgrade_an_existing_database_in_place(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    v1 = [Migration(1, "things", create_tables(_things(MetaData())))]
    db = Database(url)
    assert db.migrate("demo", v1) == 1
    with db.session() as s:
        s.execute(text("INSERT INTO things (name) VALUES ('kept')"))
    db.dispose()

    v2 = v1 + [Migration(2, "add colour", execute_sql("ALTER TABLE things ADD COLUMN colour VARCHAR(10)"))]
    db = Database(url)
    assert db.schema_version("demo") == 1
    assert db.migrate("demo", v2) == 2
    assert db.migrate("demo", v2) == 2  # idempotent
    cols = {c["name"] for c in inspect(db.engine).get_columns("things")}
    assert cols == {"id", "name", "colour"}
    with db.session() as s:
        assert s.execute(text("SELECT name FROM things")).scalar() == "kept"


def test_database_newer_than_code_is_refused(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'n.db'}")
    first = Migration(1, "a", create_tables(_things(MetaData())))
    db.migrate("demo", [first, Migration(2, "b", execute_sql("SELECT 1"))])
    with pytest.raises(FailedPrecondition, match="newer than this code"):
        db.migrate("demo", [first])


def test_failed_migration_rolls_back_and_keeps_version(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'f.db'}")
    first = Migration(1, "a", create_tables(_things(MetaData())))
    db.migrate("demo", [first])
    bad = [first, Migration(2, "broken", execute_sql("ALTER TABLE nope ADD x INT"))]
    with pytest.raises(Exception):
        db.migrate("demo", bad)
    assert db.schema_version("demo") == 1
