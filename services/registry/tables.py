"""The registry's metadata tables (component ``registry``) and their migrations."""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Connection,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.orm import Mapped, mapped_column

from services.core.db import Base, Migration, UTCDateTime, create_tables, utcnow

COMPONENT = "registry"


class ModelRow(Base):
    __tablename__ = "registry_models"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)  # models/{model}
    description: Mapped[str] = mapped_column(Text, default="")
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    next_version: Mapped[int] = mapped_column(Integer, default=1)  # next automatic vN, never reused
    create_time: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    update_time: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class VersionRow(Base):
    __tablename__ = "registry_model_versions"
    name: Mapped[str] = mapped_column(String(300), primary_key=True)  # models/{model}/versions/{version}
    model: Mapped[str] = mapped_column(String(200), index=True)  # models/{model}
    kind: Mapped[str] = mapped_column(String(32))
    format: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16))
    description: Mapped[str] = mapped_column(Text, default="")
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    artifact_prefix: Mapped[str] = mapped_column(String(600), index=True)
    files: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)  # [{path, size, sha256}]
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # inspected metadata
    base_model_version: Mapped[str] = mapped_column(String(300), default="")
    dataset_versions: Mapped[list[str]] = mapped_column(JSON, default=list)
    job: Mapped[str] = mapped_column(String(300), default="")
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    source_uri: Mapped[str] = mapped_column(Text, default="")
    deployed_by: Mapped[list[str]] = mapped_column(JSON, default=list)
    # Denormalised from files / meta so List can filter and sort on them in SQL (migration 2).
    total_size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    parameter_count: Mapped[int] = mapped_column(BigInteger, default=0)
    create_time: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    update_time: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class EdgeRow(Base):
    """parent -> child lineage edge; kept when the parent is force-deleted (history)."""

    __tablename__ = "registry_lineage_edges"
    child: Mapped[str] = mapped_column(String(300), primary_key=True)
    parent: Mapped[str] = mapped_column(String(300), primary_key=True)
    relation: Mapped[str] = mapped_column(String(32))  # base_model | dataset
    job: Mapped[str] = mapped_column(String(300), default="")
    __table_args__ = (Index("ix_registry_lineage_parent", "parent"),)


class DatasetRow(Base):
    __tablename__ = "registry_datasets"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)  # datasets/{dataset}
    description: Mapped[str] = mapped_column(Text, default="")
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    next_version: Mapped[int] = mapped_column(Integer, default=1)
    create_time: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class DatasetVersionRow(Base):
    __tablename__ = "registry_dataset_versions"
    name: Mapped[str] = mapped_column(String(300), primary_key=True)
    dataset: Mapped[str] = mapped_column(String(200), index=True)
    filename: Mapped[str] = mapped_column(String(300))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    format: Mapped[str] = mapped_column(String(32))
    row_count: Mapped[int] = mapped_column(BigInteger)
    invalid_row_count: Mapped[int] = mapped_column(BigInteger)
    description: Mapped[str] = mapped_column(Text, default="")
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    artifact_key: Mapped[str] = mapped_column(String(600))
    create_time: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    image_count: Mapped[int] = mapped_column(BigInteger, default=0)  # migration 4


class ScoreRow(Base):
    """A score an evaluation recorded on a version (migration 3); one row per (benchmark, metric)."""

    __tablename__ = "registry_version_scores"
    version: Mapped[str] = mapped_column(
        String(300), ForeignKey(f"{VersionRow.__tablename__}.name", ondelete="CASCADE"), primary_key=True
    )
    evaluation: Mapped[str] = mapped_column(String(300), primary_key=True)  # evaluations/{evaluation}
    benchmark: Mapped[str] = mapped_column(String(300), primary_key=True)  # benchmarks/{benchmark}
    metric: Mapped[str] = mapped_column(String(200), primary_key=True)
    value: Mapped[float] = mapped_column(Float(precision=53))
    stderr: Mapped[float] = mapped_column(Float(precision=53), default=0.0)
    num_samples: Mapped[int] = mapped_column(BigInteger, default=0)
    create_time: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    __table_args__ = (Index("ix_registry_version_scores_version", "version"),)


def _sortable_sizes_and_jobs_for_imports(conn: Connection) -> None:
    """Version 2: ``total_size_bytes`` and ``parameter_count`` columns on versions (backfilled), and the
    old ``registry_imports`` table dropped (imports are jobs of the shared job runtime since)."""
    columns = {c["name"] for c in inspect(conn).get_columns(VersionRow.__tablename__)}
    for column in ("total_size_bytes", "parameter_count"):
        if column not in columns:
            conn.execute(text(f"ALTER TABLE {VersionRow.__tablename__} ADD COLUMN {column} BIGINT NOT NULL DEFAULT 0"))
    versions = cast(Table, VersionRow.__table__)
    for name, files, meta in conn.execute(select(versions.c.name, versions.c.files, versions.c.meta)).all():
        conn.execute(update(versions).where(versions.c.name == name).values(
            total_size_bytes=sum(int(f.get("size", 0)) for f in files or []),
            parameter_count=int((meta or {}).get("parameter_count", 0))))
    conn.execute(text("DROP TABLE IF EXISTS registry_imports"))


def _dataset_image_counts(conn: Connection) -> None:
    """Version 4: ``image_count`` on dataset versions (0 for the text datasets stored before)."""
    columns = {c["name"] for c in inspect(conn).get_columns(DatasetVersionRow.__tablename__)}
    if "image_count" not in columns:
        conn.execute(text(f"ALTER TABLE {DatasetVersionRow.__tablename__} ADD COLUMN image_count BIGINT NOT NULL "
                          "DEFAULT 0"))


MIGRATIONS = [
    Migration(
        1,
        "models, versions, lineage, datasets",
        create_tables(
            ModelRow.__table__, VersionRow.__table__, EdgeRow.__table__, DatasetRow.__table__,
            DatasetVersionRow.__table__,
        ),
    ),
    Migration(2, "sortable version sizes; imports moved to the job runtime", _sortable_sizes_and_jobs_for_imports),
    Migration(3, "evaluation scores of versions", create_tables(ScoreRow.__table__)),
    Migration(4, "image counts of dataset versions", _dataset_image_counts),
]
