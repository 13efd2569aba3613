"""The registry's metadata tables (component ``registry``) and their migrations."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Float, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from services.core.db import Base, Migration, create_tables, utcnow

COMPONENT = "registry"


class ModelRow(Base):
    __tablename__ = "registry_models"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)  # models/{model}
    description: Mapped[str] = mapped_column(Text, default="")
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    next_version: Mapped[int] = mapped_column(Integer, default=1)  # next automatic vN, never reused
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


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
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class EdgeRow(Base):
    """parent -> child lineage edge; kept when the parent is force-deleted (history)."""

    __tablename__ = "registry_lineage_edges"
    child: Mapped[str] = mapped_column(String(300), primary_key=True)
    parent: Mapped[str] = mapped_column(String(300), primary_key=True)
    relation: Mapped[str] = mapped_column(String(32))  # base_model | dataset
    job: Mapped[str] = mapped_column(String(300), default="")
    __table_args__ = (Index("ix_registry_lineage_parent", "parent"),)


class ImportRow(Base):
    __tablename__ = "registry_imports"
    name: Mapped[str] = mapped_column(String(100), primary_key=True)  # imports/{id}
    source_uri: Mapped[str] = mapped_column(Text)
    model_version: Mapped[str] = mapped_column(String(300))
    state: Mapped[str] = mapped_column(String(16), index=True)
    fraction: Mapped[float] = mapped_column(Float, default=0.0)
    stage: Mapped[str] = mapped_column(String(32), default="")
    bytes_done: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_total: Mapped[int] = mapped_column(BigInteger, default=0)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_model: Mapped[bool] = mapped_column(default=False)  # the model row was created by this import
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    end_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class DatasetRow(Base):
    __tablename__ = "registry_datasets"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)  # datasets/{dataset}
    description: Mapped[str] = mapped_column(Text, default="")
    labels: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    next_version: Mapped[int] = mapped_column(Integer, default=1)
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


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
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


MIGRATIONS = [
    Migration(
        1,
        "models, versions, lineage, imports, datasets",
        create_tables(
            ModelRow.__table__, VersionRow.__table__, EdgeRow.__table__, ImportRow.__table__,
            DatasetRow.__table__, DatasetVersionRow.__table__,
        ),
    ),
]
