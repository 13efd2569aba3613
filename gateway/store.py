"""The gateway's own metadata: projects, API keys and usage records (SQLite by default, PostgreSQL by URL).

Migrations are never edited once released. Migration 1 creates its tables from the ``Table``
objects below, which now carry the columns later migrations add: on a new database those columns
exist already, so every later migration checks before it adds (``_add_column``, ``_create_index``).
"""

from __future__ import annotations

from sqlalchemy import Column, DateTime, Index, Integer, MetaData, String, Table, Text, inspect, text
from sqlalchemy.engine import Connection

from services.core.db import Database, Migration, create_tables, utcnow

metadata = MetaData()

# Keys created before projects existed, and keys created without one, belong to this project; it is
# made by migration 2 allowing every model, so that upgrading changes nobody's access.
DEFAULT_PROJECT = "default"

projects = Table(
    "gateway_projects",
    metadata,
    Column("name", String(64), primary_key=True),
    # JSON list of allowed model entries: "*" (every model), "<model>" (a deployment's base model),
    # "<model>:<adapter>" (one adapter), "<model>:*" (every adapter of that deployment)
    Column("models", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

api_keys = Table(
    "gateway_api_keys",
    metadata,
    Column("id", String(32), primary_key=True),  # key_<hex>, shown in lists; not a secret
    Column("name", String(200), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),  # sha256 hex of the secret key
    Column("prefix", String(20), nullable=False),  # first characters of the key, to recognise it
    Column("rpm", Integer, nullable=False, default=0),  # 0: unlimited
    Column("tpm", Integer, nullable=False, default=0),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    Column("project", String(64), nullable=False, server_default=DEFAULT_PROJECT),  # migration 2
)

usage_records = Table(
    "gateway_usage",
    metadata,
    Column("request_id", String(128), primary_key=True),  # a retried request id never counts twice
    Column("key_id", String(32), nullable=False),
    Column("model", String(300), nullable=False),
    Column("endpoint", String(40), nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("project", String(64), nullable=False, server_default=DEFAULT_PROJECT),  # migration 2
    Index("ix_gateway_usage_key_model", "key_id", "model"),
    Index("ix_gateway_usage_project_model", "project", "model"),  # migration 2
)


def _add_column(conn: Connection, table: Table, name: str) -> None:
    """``ALTER TABLE ... ADD COLUMN`` of ``table.c[name]``, unless the table has it already."""
    if name in {c["name"] for c in inspect(conn).get_columns(table.name)}:
        return
    column = table.c[name]
    ddl = f"ALTER TABLE {table.name} ADD COLUMN {name} {column.type.compile(conn.dialect)}"
    default = getattr(column.server_default, "arg", None)
    if default is not None:
        ddl += f" NOT NULL DEFAULT '{default}'"
    conn.execute(text(ddl))


def _create_index(conn: Connection, table: Table, name: str) -> None:
    if name not in {i["name"] for i in inspect(conn).get_indexes(table.name)}:
        next(i for i in table.indexes if i.name == name).create(conn)


def _projects(conn: Connection) -> None:
    projects.create(conn, checkfirst=True)
    _add_column(conn, api_keys, "project")
    _add_column(conn, usage_records, "project")
    _create_index(conn, usage_records, "ix_gateway_usage_project_model")
    exists = conn.execute(projects.select().where(projects.c.name == DEFAULT_PROJECT)).first()
    if exists is None:
        now = utcnow()
        conn.execute(projects.insert().values(name=DEFAULT_PROJECT, models='["*"]', created_at=now, updated_at=now))


def _fine_tuning(conn: Connection) -> None:
    from .finetune.tables import create_all  # the OpenAI files and fine-tuning jobs (gateway/finetune/)

    create_all(conn)


MIGRATIONS = [
    Migration(1, "api keys and usage records", create_tables(api_keys, usage_records)),
    Migration(2, "projects: keys belong to one, usage recorded per project", _projects),
    Migration(3, "OpenAI files and fine-tuning jobs, events", _fine_tuning),
]


def open_database(url: str) -> Database:
    db = Database(url)
    db.migrate("gateway", MIGRATIONS)
    return db
