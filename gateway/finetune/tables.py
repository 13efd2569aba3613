"""Tables of the OpenAI files and fine-tuning API (gateway migration 3).

Kept in the gateway's own database (SQLite, or the PostgreSQL every replica shares), so any replica
finds a file or a job; each row belongs to one project. A file's bytes are kept as uploaded
(``gateway_file_chunks``, 1 MiB a row) for ``GET /v1/files/{id}/content``; the rows the training
service reads are a registry dataset version (``dataset_version``).
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Index, Integer, LargeBinary, MetaData, String, Table, Text
from sqlalchemy.engine import Connection

from services.core.db import UTCDateTime

metadata = MetaData()

files = Table(
    "gateway_files",
    metadata,
    Column("id", String(40), primary_key=True),  # file-<24 alphanumerics>
    Column("project", String(64), nullable=False),
    Column("filename", String(255), nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("kind", String(16), nullable=False),  # "supervised" or "dpo": the rows it holds
    Column("row_count", Integer, nullable=False),
    Column("dataset_version", String(300), nullable=False),  # datasets/{dataset}/versions/{version}
    Column("created_at", UTCDateTime(), nullable=False),
    Index("ix_gateway_files_project_created", "project", "created_at"),
)

file_chunks = Table(
    "gateway_file_chunks",
    metadata,
    Column("file_id", String(40), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("data", LargeBinary, nullable=False),
)

jobs = Table(
    "gateway_fine_tuning_jobs",
    metadata,
    Column("id", String(40), primary_key=True),  # ftjob-<24 lowercase alphanumerics>; trainingJobs/{id}
    Column("project", String(64), nullable=False),
    Column("model", String(300), nullable=False),  # as the caller named it
    Column("base_version", String(300), nullable=False),  # the registry model version trained
    Column("served_base", String(128), nullable=False),  # the base's served name ("" when none)
    Column("method", String(16), nullable=False),  # supervised | dpo
    Column("training_file", String(40), nullable=False),
    Column("validation_file", String(40), nullable=True),
    Column("request", Text, nullable=False),  # JSON: hyperparameters, method, suffix, seed as asked
    Column("metadata", Text, nullable=True),  # JSON object of strings, or null
    Column("suffix", String(64), nullable=True),
    Column("alias", String(64), nullable=False),  # the adapter alias the result is loaded under
    Column("created_at", UTCDateTime(), nullable=False),
    # Set once, by the first replica that finalizes the job (compare-and-set on status):
    Column("status", String(20), nullable=False),  # "" while the training job decides; else terminal
    Column("finished_at", UTCDateTime(), nullable=True),
    Column("fine_tuned_model", String(300), nullable=True),
    Column("trained_tokens", BigInteger, nullable=True),
    Column("error", Text, nullable=True),  # JSON {code, message, param}
    Index("ix_gateway_ft_jobs_project_created", "project", "created_at"),
    Index("ix_gateway_ft_jobs_status", "status"),
)

events = Table(
    "gateway_fine_tuning_events",
    metadata,
    Column("job_id", String(40), primary_key=True),
    # Order of the job's events: the gateway's own at creation (0-9), those of the training job's
    # event N at (N + 1) * 10 + i, the final ones at FINAL_POSITION + i. Every replica computes the
    # same position for the same event, so one written twice is kept once.
    Column("position", BigInteger, primary_key=True),
    Column("source_seq", BigInteger, nullable=False),  # the training job's event sequence (0: none)
    Column("created_at", UTCDateTime(), nullable=False),
    Column("level", String(8), nullable=False),
    Column("type", String(8), nullable=False),
    Column("message", Text, nullable=False),
    Column("data", Text, nullable=True),  # JSON
)

FINAL_POSITION = 10**15


def create_all(conn: Connection) -> None:
    for table in (files, file_chunks, jobs, events):
        table.create(conn, checkfirst=True)
