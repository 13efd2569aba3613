"""The gateway's own metadata: API keys and usage records (SQLite by default, PostgreSQL by URL)."""

from __future__ import annotations

from sqlalchemy import Column, DateTime, Index, Integer, MetaData, String, Table

from services.core.db import Database, Migration, create_tables

metadata = MetaData()

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
    Index("ix_gateway_usage_key_model", "key_id", "model"),
)

MIGRATIONS = [Migration(1, "api keys and usage records", create_tables(api_keys, usage_records))]


def open_database(url: str) -> Database:
    db = Database(url)
    db.migrate("gateway", MIGRATIONS)
    return db
