"""``/v1/files`` (purpose ``fine-tune``): validation of the rows, storage, listing, content.

An upload is checked row by row before anything is stored: OpenAI chat rows ``{"messages": [...]}``
(supervised) or OpenAI preference rows ``{"input": {"messages": [...]}, "preferred_output": [...],
"non_preferred_output": [...]}`` (DPO), one kind per file. A bad row refuses the whole file with a
400 naming its line and field (``line 3: messages[1].role: unknown role 'robot' ...``): no row is
dropped. The rows then become a registry dataset version (``datasets/{file id}/versions/v1``; DPO rows
in the registry's ``preference`` format), which the training service reads; the bytes as uploaded
and the file's metadata stay in the gateway database for ``GET /v1/files/{id}/content``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import string
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from sqlalchemy import and_, delete, or_, select

from services.core.datasets import DatasetFormat, RowError, iter_rows, row_errors
from services.core.db import Database, utcnow
from services.core.errors import FieldViolation, InvalidArgument, NotFound
from services.core.logging import get_logger

from .tables import file_chunks, files

log = get_logger("modelyard.gateway.files")

PURPOSE = "fine-tune"
SUPERVISED, DPO = "supervised", "dpo"
CHUNK_BYTES = 1 << 20
LISTED_ERRORS = 20
_ALPHABET = string.ascii_lowercase + string.digits
_DPO_KEYS = ("input", "preferred_output", "non_preferred_output")
# Field names of a converted DPO row -> the OpenAI names they came from (for the errors).
_DPO_FIELDS = (("messages", "input.messages"), ("chosen", "preferred_output"), ("rejected", "non_preferred_output"))


def new_id(prefix: str) -> str:
    """``prefix-`` and 24 random lowercase letters and digits (the training service's job id rules)."""
    return f"{prefix}-" + "".join(secrets.choice(_ALPHABET) for _ in range(24))


@dataclass(frozen=True)
class FileRecord:
    id: str
    project: str
    filename: str
    purpose: str
    bytes: int
    sha256: str
    kind: str
    row_count: int
    dataset_version: str
    created_at: datetime

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": int(self.created_at.timestamp()),
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
            "expires_at": None,
        }


def _record(row: Any) -> FileRecord:
    return FileRecord(
        row.id,
        row.project,
        row.filename,
        row.purpose,
        row.bytes,
        row.sha256,
        row.kind,
        row.row_count,
        row.dataset_version,
        row.created_at,
    )


# ----------------------------------------------------------------------------- validation


def _dpo_row(row: dict) -> tuple[dict | None, list[tuple[str, str]]]:
    """An OpenAI preference row as a registry ``preference`` row, or the problems that prevent it."""
    issues: list[tuple[str, str]] = []
    source = row.get("input")
    if not isinstance(source, dict):
        issues.append(("input", 'must be an object {"messages": [...]}' if source is not None else "missing"))
    elif not isinstance(source.get("messages"), list):
        issues.append(("input.messages", "must be a list of messages"))
    for key in _DPO_KEYS[1:]:
        value = row.get(key)
        if value is None:
            issues.append((key, "missing required field"))
        elif not isinstance(value, list) or len(value) != 1:
            issues.append((key, "must be a list of exactly one assistant message"))
        elif isinstance(value[0], dict) and value[0].get("role", "assistant") != "assistant":
            issues.append((f"{key}[0].role", f"must be 'assistant', got {value[0].get('role')!r}"))
    if issues or not isinstance(source, dict):
        return None, issues
    converted = {
        "messages": source["messages"],
        "chosen": row["preferred_output"],
        "rejected": row["non_preferred_output"],
    }
    found = row_errors(converted, DatasetFormat.PREFERENCE)
    return (None, [(_openai_field(f), r) for f, r in found]) if found else (converted, [])


def _openai_field(field: str) -> str:
    for ours, theirs in _DPO_FIELDS:
        if field == ours or field.startswith((f"{ours}[", f"{ours}.")):
            return theirs + field[len(ours) :]
    return field


def _weights(row: dict) -> list[tuple[str, str]]:
    """OpenAI's per-message ``weight``: 1 (or absent) is what the training recipes do; 0 is refused."""
    issues: list[tuple[str, str]] = []
    for i, msg in enumerate(row.get("messages") or []):
        if isinstance(msg, dict) and "weight" in msg:
            weight = msg["weight"]
            if weight is True or weight == 1:
                continue
            reason = (
                "0 (not training on this message) is not supported: every assistant message is trained on"
                if weight == 0 and not isinstance(weight, bool)
                else f"must be 0 or 1, got {weight!r}"
            )
            issues.append((f"messages[{i}].weight", reason))
    return issues


def row_kind(row: Any) -> str | None:
    if not isinstance(row, dict):
        return None
    if any(k in row for k in _DPO_KEYS):
        return DPO
    if "messages" in row:
        return SUPERVISED
    return None


def check_rows(path: Path, filename: str, converted: IO[str] | None) -> tuple[str, int]:
    """(kind, rows) of the JSONL file at ``path``; InvalidArgument naming each bad line otherwise.
    Each row, as the registry stores it, is written to ``converted`` (DPO rows are converted)."""
    kind: str | None = None
    rows = 0
    errors: list[RowError] = []
    bad = 0
    for line, value in iter_rows(path, "jsonl"):
        issues: list[tuple[str, str]]
        if isinstance(value, RowError):
            issues = [(value.field, value.reason)]
        else:
            this = row_kind(value)
            out: dict | None = value if isinstance(value, dict) else None
            if this is None:
                issues = [
                    (
                        "",
                        'must be a chat row {"messages": [...]} or a preference row '
                        '{"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}',
                    )
                ]
            elif kind is not None and this != kind:
                issues = [("", f"a {this} row in a file of {kind} rows (one kind of row per file)")]
            elif this == DPO:
                out, issues = _dpo_row(value)
            else:
                issues = row_errors(value, DatasetFormat.MESSAGES) + _weights(value)
            if this is not None and kind is None and not issues:
                kind = this
            if not issues and converted is not None and out is not None:
                converted.write(json.dumps(out, ensure_ascii=False) + "\n")
        rows += 1
        if issues:
            bad += 1
            errors.extend(RowError(line, f, r) for f, r in issues[: max(0, LISTED_ERRORS - len(errors))])
    if bad:
        listed = "; ".join(f"line {e.row}: {e.field + ': ' if e.field else ''}{e.reason}" for e in errors)
        more = f" (and more: {bad} bad rows in all)" if bad > len({e.row for e in errors}) else ""
        raise InvalidArgument(
            f"{filename} is not a valid fine-tuning file ({bad} of {rows} rows are invalid): {listed}{more}",
            reason="INVALID_FILE_FORMAT",
            metadata={"rows": ",".join(str(e.row) for e in errors)},
            violations=[
                FieldViolation("file", f"line {e.row}: {e.field + ': ' if e.field else ''}{e.reason}") for e in errors
            ],
        )
    if kind is None:
        raise InvalidArgument(
            "the file holds no rows (JSONL: one JSON object per line)",
            reason="INVALID_FILE_FORMAT",
            violations=[FieldViolation("file", "no rows")],
        )
    return kind, rows


# ----------------------------------------------------------------------------- storage


class FileStore:
    """The files' rows and bytes in the gateway database (blocking: run off the event loop)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def insert(self, record: FileRecord, content: Path) -> None:
        with self._db.session() as s:
            s.execute(files.insert().values(**record.__dict__))
            with content.open("rb") as f:
                seq = 0
                while chunk := f.read(CHUNK_BYTES):
                    s.execute(file_chunks.insert().values(file_id=record.id, seq=seq, data=chunk))
                    seq += 1

    def get(self, project: str, file_id: str) -> FileRecord:
        with self._db.session() as s:
            row = s.execute(select(files).where(files.c.id == file_id, files.c.project == project)).first()
        if row is None:
            raise NotFound(f"No such File object: {file_id}", reason="FILE_NOT_FOUND", metadata={"file_id": file_id})
        return _record(row)

    def list(
        self, project: str, *, purpose: str | None, limit: int, after: str | None, order: str
    ) -> tuple[list[FileRecord], bool]:
        c = files.c
        query = select(files).where(c.project == project)
        if purpose:
            query = query.where(c.purpose == purpose)
        with self._db.session() as s:
            if after:
                cursor = s.execute(select(c.created_at, c.id).where(c.id == after, c.project == project)).first()
                if cursor is None:
                    raise NotFound(
                        f"No such File object: {after}",
                        reason="FILE_NOT_FOUND",
                        violations=[FieldViolation("after", f"no file {after!r}")],
                    )
                at, key = cursor
                if order == "asc":
                    query = query.where(or_(c.created_at > at, and_(c.created_at == at, c.id > key)))
                else:
                    query = query.where(or_(c.created_at < at, and_(c.created_at == at, c.id < key)))
            ordering = (c.created_at.asc(), c.id.asc()) if order == "asc" else (c.created_at.desc(), c.id.desc())
            rows = s.execute(query.order_by(*ordering).limit(limit + 1)).all()
        return [_record(r) for r in rows[:limit]], len(rows) > limit

    def delete(self, project: str, file_id: str) -> FileRecord:
        with self._db.session() as s:
            row = s.execute(
                select(files).where(files.c.id == file_id, files.c.project == project).with_for_update()
            ).first()
            if row is None:
                raise NotFound(
                    f"No such File object: {file_id}", reason="FILE_NOT_FOUND", metadata={"file_id": file_id}
                )
            s.execute(delete(file_chunks).where(file_chunks.c.file_id == file_id))
            s.execute(delete(files).where(files.c.id == file_id))
        return _record(row)

    def chunks(self, file_id: str) -> Iterator[bytes]:
        """The file's bytes, a chunk per query (never the whole file in memory)."""
        seq = 0
        while True:
            with self._db.session() as s:
                data = s.execute(
                    select(file_chunks.c.data).where(file_chunks.c.file_id == file_id, file_chunks.c.seq == seq)
                ).scalar()
            if data is None:
                return
            yield bytes(data)
            seq += 1


def spool(source: IO[bytes], dest: Path, max_bytes: int) -> tuple[int, str]:
    """Copy the upload to ``dest``: (size, sha256). InvalidArgument past ``max_bytes``."""
    digest, size = hashlib.sha256(), 0
    with dest.open("wb") as out:
        while chunk := source.read(CHUNK_BYTES):
            size += len(chunk)
            if size > max_bytes:
                raise InvalidArgument.for_field(
                    "file", f"larger than {max_bytes} bytes (fine_tuning.max_file_bytes)", reason="FILE_TOO_LARGE"
                )
            digest.update(chunk)
            out.write(chunk)
    return size, digest.hexdigest()


def clean_filename(name: str | None) -> str:
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1].strip()
    return base[:255] or "upload.jsonl"


class Files:
    """The files API of one gateway: checks, the registry dataset version, the database rows."""

    def __init__(self, db: Database, registry: Any, *, max_bytes: int, timeout_s: float, staging: Path) -> None:
        self.store = FileStore(db)
        self._registry = registry  # () -> RegistryClient
        self._max_bytes = max_bytes
        self._timeout = timeout_s
        self._staging = staging

    async def create(self, project: str, purpose: str, filename: str | None, source: IO[bytes]) -> FileRecord:
        if purpose != PURPOSE:
            raise InvalidArgument.for_field(
                "purpose", f"this gateway stores files for purpose 'fine-tune' only, got {purpose[:40]!r}"
            )
        name = clean_filename(filename)
        file_id = new_id("file")
        self._staging.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self._staging, prefix="upload-") as tmp:
            raw, rows_path = Path(tmp) / "raw.jsonl", Path(tmp) / f"{file_id}.jsonl"
            size, sha = await asyncio.to_thread(spool, source, raw, self._max_bytes)
            if size == 0:
                raise InvalidArgument.for_field("file", "the file is empty", reason="INVALID_FILE_FORMAT")

            def check() -> tuple[str, int]:
                with rows_path.open("w", encoding="utf-8") as converted:
                    return check_rows(raw, name, converted)

            kind, rows = await asyncio.to_thread(check)
            version = await self._registry().upload_dataset(
                rows_path,
                parent=f"datasets/{file_id}",
                version_id="v1",
                expected_format="preference" if kind == DPO else "messages",
                description=f"OpenAI file {name[:200]} (project {project})",
                labels={"openai-file": file_id, "project": project},
                timeout=self._timeout * 10,
            )
            record = FileRecord(file_id, project, name, purpose, size, sha, kind, rows, version.name, utcnow())
            try:
                await asyncio.to_thread(self.store.insert, record, raw)
            except BaseException:
                await self._drop_dataset(version.name)
                raise
        log.info("file_created", file=file_id, project=project, kind=kind, rows=rows, bytes=size)
        return record

    async def get(self, project: str, file_id: str) -> FileRecord:
        return await asyncio.to_thread(self.store.get, project, file_id)

    async def list(
        self, project: str, *, purpose: str | None, limit: int, after: str | None, order: str
    ) -> tuple[list[FileRecord], bool]:
        return await asyncio.to_thread(self.store.list, project, purpose=purpose, limit=limit, after=after, order=order)

    async def delete(self, project: str, file_id: str) -> FileRecord:
        record = await asyncio.to_thread(self.store.delete, project, file_id)
        await self._drop_dataset(record.dataset_version)
        log.info("file_deleted", file=file_id, project=project)
        return record

    async def content(self, project: str, file_id: str) -> tuple[FileRecord, AsyncIterator[bytes]]:
        record = await self.get(project, file_id)

        async def body() -> AsyncIterator[bytes]:
            chunks = self.store.chunks(file_id)
            while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
                yield chunk

        return record, body()

    async def _drop_dataset(self, version: str) -> None:
        """Delete the registry copy (forced: models trained on it keep their lineage, flagged deleted)."""
        try:
            await self._registry().delete_dataset_version(version, force=True, timeout=self._timeout)
        except NotFound:
            pass
        except Exception as exc:  # noqa: BLE001 - the gateway's record is gone; the copy is reported
            log.warning("file_dataset_not_deleted", version=version, error=str(exc))
