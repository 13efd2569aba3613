"""Datasets as versioned, content-hashed resources (``datasets/{dataset}/versions/{version}``).

An upload is spooled to a local file (it has to be read whole for validation), validated with
:mod:`services.core.datasets`, stored in S3 and recorded with its SHA-256. A file without
any recognisable row format is refused; bad rows of a recognisable training set are counted at
upload and reported row by row by ``validate``. An evaluation set (``multiple_choice``, ``qa``) is
refused when any row is bad: its scores must cover exactly the rows the user uploaded.

An image+text dataset is uploaded as an archive (``.zip``, ``.tar``, ``.tar.gz``: one data file and the
images its rows refer to) and stored as uploaded; validation extracts it into a temporary folder (an unsafe
archive, with ``..`` or absolute paths, links or devices, is refused) and reads and decodes every image a row
refers to, so a missing, corrupt or remote image is a bad row naming its field. Validating against a model
version adds the model's view: a text-only model takes no images, a vision-language model at most
``max_images_per_row`` per row, and its processor counts the image tokens into each row's length.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.core.artifacts import FileEntry, file_key
from services.core.datasets import (  # (formats checked there)
    EVALUATION_FORMATS,
    DatasetFormat,
    ImageCheck,
    ValidationReport,
    validate_dataset,
)
from services.core.db import lock_or_create, utcnow
from services.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from services.core.listing import EQUALITY, Field, Page, Schema, int_value, sql_page, time_value
from services.core.listing import parse as parse_list
from services.core.logging import get_logger

from .domain import Registry, check_labels
from .names import check_id, parse_parent, parse_version
from .records import Dataset, DatasetVersion
from .settings import MAX_UPLOAD_SETTING
from .tables import DatasetRow, DatasetVersionRow, EdgeRow, VersionRow

log = get_logger(__name__)

_FILENAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_TOKENIZER_SUFFIXES = (".json", ".model", ".txt", ".jinja", ".tiktoken")
# Config keys (top level or vision_config) by which a vision-language model names how many images it takes.
_IMAGE_LIMIT_KEYS = ("max_images", "max_num_images", "max_images_per_prompt", "max_image_count")

_VERSION_COUNT = (select(func.count()).select_from(DatasetVersionRow)
                  .where(DatasetVersionRow.dataset == DatasetRow.name).correlate(DatasetRow).scalar_subquery())

DATASET_SCHEMA = Schema(
    {
        "name": Field(DatasetRow.name, sortable=True),
        "create_time": Field(DatasetRow.create_time, parse=time_value, sortable=True),
        "version_count": Field(_VERSION_COUNT, parse=int_value, sortable=True),
    },
    default_order="create_time", name=Field(DatasetRow.name), labels=DatasetRow.labels,
)
DATASET_VERSION_SCHEMA = Schema(
    {
        "name": Field(DatasetVersionRow.name, sortable=True),
        "dataset": Field(DatasetVersionRow.dataset, ops=EQUALITY),
        "format": Field(DatasetVersionRow.format, ops=EQUALITY),
        "sha256": Field(DatasetVersionRow.sha256, ops=EQUALITY),
        "filename": Field(DatasetVersionRow.filename),
        "create_time": Field(DatasetVersionRow.create_time, parse=time_value, sortable=True),
        "size_bytes": Field(DatasetVersionRow.size_bytes, parse=int_value, sortable=True),
        "row_count": Field(DatasetVersionRow.row_count, parse=int_value, sortable=True),
    },
    default_order="create_time", name=Field(DatasetVersionRow.name), labels=DatasetVersionRow.labels,
)


def dataset_version_from_row(row: DatasetVersionRow) -> DatasetVersion:
    return DatasetVersion(row.name, row.filename, row.sha256, row.size_bytes, row.format, row.row_count,
                          row.invalid_row_count, row.description, dict(row.labels or {}), row.artifact_key,
                          row.create_time, int(row.image_count or 0))


def _too_large(max_bytes: int) -> ResourceExhausted:
    description = (f"the upload is larger than the registry's dataset upload cap of {max_bytes} bytes "
                   f"({MAX_UPLOAD_SETTING})")
    return ResourceExhausted(f"chunk: {description}", reason="DATASET_TOO_LARGE",
                             metadata={"max_upload_bytes": str(max_bytes)},
                             violations=[FieldViolation("chunk", description)])


@dataclass
class DatasetUpload:
    """An upload in progress: chunks are appended to a local spool file, refused as soon as the total would
    exceed ``max_bytes`` (before the chunk that crosses it is written)."""

    parent: str
    version_id: str
    filename: str
    expected_format: str
    description: str
    labels: dict[str, str]
    spool_dir: Path
    max_bytes: int = 1024**3
    size: int = 0
    _file: BinaryIO | None = field(default=None, repr=False)

    @property
    def path(self) -> Path:
        return self.spool_dir / self.filename

    def write(self, chunk: bytes) -> None:
        if self.size + len(chunk) > self.max_bytes:
            raise _too_large(self.max_bytes)
        if self._file is None:
            self._file = self.path.open("wb")
        self._file.write(chunk)
        self.size += len(chunk)

    def close(self) -> None:
        if self._file is None:
            self.path.touch()
        else:
            self._file.close()

    def discard(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
        shutil.rmtree(self.spool_dir, ignore_errors=True)


_LISTED_ROWS = 20


def _bad_evaluation_rows(filename: str, report: ValidationReport) -> InvalidArgument:
    """Why an evaluation set is refused: every bad row (the first 20 listed) with its field."""
    errors = report.errors[:_LISTED_ROWS]
    listed = "; ".join(f"row {e.row} {e.field}: {e.reason}".replace(" :", ":") for e in errors)
    more = f"; and {report.invalid_rows - len(errors)} more" if report.invalid_rows > len(errors) else ""
    return InvalidArgument(
        f"{filename}: {report.invalid_rows} of {report.row_count} rows of this {report.format} evaluation set are "
        f"invalid (evaluation sets must have no bad rows): {listed}{more}",
        reason="DATASET_INVALID_ROWS",
        metadata={"format": str(report.format), "invalid_row_count": str(report.invalid_rows),
                  "rows": ",".join(str(e.row) for e in errors)},
        violations=[FieldViolation(e.field or "row", f"row {e.row}: {e.reason}") for e in errors],
    )


def _model_image_limit(folder: Path) -> int:
    """The images per prompt a model's config.json says it takes (0: it says nothing)."""
    import json

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return 0
    for doc in (config, config.get("vision_config") or {}):
        for key in _IMAGE_LIMIT_KEYS:
            value = doc.get(key) if isinstance(doc, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return 0


class Datasets:
    """Dataset and dataset-version operations."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.db = registry.db
        self.store = registry.store

    # ------------------------------------------------------------------ upload

    def begin_upload(self, parent: str, *, version_id: str = "", filename: str, expected_format: str = "",
                     description: str = "", labels: dict[str, str] | None = None) -> DatasetUpload:
        """Check the upload's metadata before any byte is accepted."""
        parse_parent(parent, "datasets", "metadata.parent")
        if version_id:
            check_id(version_id, "metadata.version_id")
            with self.db.session() as s:
                self._refuse_existing(s, f"{parent}/versions/{version_id}")
        if not _FILENAME_RE.match(filename or ""):
            raise InvalidArgument.for_field(
                "metadata.filename", f"{filename!r} must be a plain file name (letters, digits, '.', '-', '_')")
        spool = Path(tempfile.mkdtemp(dir=self.registry.staging, prefix="dataset-"))
        return DatasetUpload(parent, version_id, filename, expected_format, description,
                             check_labels(labels or {}, "metadata.labels"), spool,
                             max_bytes=self.registry.settings.datasets.max_upload_bytes)

    def finish_upload(self, upload: DatasetUpload) -> DatasetVersion:
        """Validate the spooled file, store it and record the version (the spool is removed)."""
        try:
            upload.close()
            if upload.size == 0:
                raise InvalidArgument.for_field("chunk", "the uploaded file is empty", reason="DATASET_EMPTY")
            report = self._validate_file(upload.path, upload.filename, field_name="chunk",
                                         expected_format=cast(DatasetFormat, upload.expected_format or None),
                                         images=self._image_check())
            if report.format is None:
                first = "; ".join(f"row {e.row} {e.field}: {e.reason}".replace(" :", ":") for e in report.errors[:3])
                raise InvalidArgument.for_field(
                    "chunk", f"{upload.filename}: no known dataset format in {report.row_count} rows ({first})",
                    reason="DATASET_FORMAT_UNKNOWN")
            if report.format in EVALUATION_FORMATS and report.invalid_rows:
                raise _bad_evaluation_rows(upload.filename, report)
            key = f"{upload.parent}/{uuid.uuid4().hex[:12]}/{upload.filename}"
            stored = self.store.put_file(key, upload.path)
            try:
                with self.db.session() as s:
                    # created when missing and locked: concurrent uploads take version numbers in turn
                    row = lock_or_create(s, DatasetRow, {"name": upload.parent, "description": "", "labels": {},
                                                         "next_version": 1, "create_time": utcnow()})
                    version_id = upload.version_id or self._next_version_id(s, row)
                    name = f"{upload.parent}/versions/{version_id}"
                    self._refuse_existing(s, name)
                    vrow = DatasetVersionRow(
                        name=name, dataset=upload.parent, filename=upload.filename, sha256=stored.sha256,
                        size_bytes=stored.size, format=report.format.value, row_count=report.row_count,
                        invalid_row_count=report.invalid_rows, description=upload.description, labels=upload.labels,
                        artifact_key=key, create_time=utcnow(), image_count=report.image_count,
                    )
                    s.add(vrow)
                    s.flush()
                    version = dataset_version_from_row(vrow)
            except (AlreadyExists, IntegrityError) as exc:
                self.store.delete(key)
                if isinstance(exc, IntegrityError):
                    raise AlreadyExists(f"dataset version already exists under {upload.parent}",
                                        reason="DATASET_VERSION_EXISTS") from None
                raise
        finally:
            upload.discard()
        log.info("dataset_uploaded", version=version.name, sha256=version.sha256, rows=version.row_count,
                 invalid_rows=version.invalid_row_count, format=version.format, images=version.image_count)
        return version

    # ------------------------------------------------------------------ read / delete

    def get_dataset(self, name: str) -> Dataset:
        parse_parent(name, "datasets")
        with self.db.session() as s:
            row = s.get(DatasetRow, name)
            if row is None:
                raise NotFound(f"dataset {name!r} not found", reason="DATASET_NOT_FOUND", metadata={"name": name})
            count = s.scalar(select(func.count()).select_from(DatasetVersionRow).where(DatasetVersionRow.dataset == name))
            return Dataset(row.name, row.description, dict(row.labels or {}), int(count or 0), row.create_time)

    def list_datasets(self, *, filter: str = "", order_by: str = "", page_size: int = 0,
                      page_token: str = "") -> Page[Dataset]:
        """One page of datasets, filtered, ordered and counted in SQL."""
        query = parse_list(DATASET_SCHEMA, filter=filter, order_by=order_by, page_size=page_size, page_token=page_token)
        with self.db.session() as s:
            return sql_page(s, select(DatasetRow, _VERSION_COUNT), query, DATASET_SCHEMA, lambda row: Dataset(
                row[0].name, row[0].description, dict(row[0].labels or {}), int(row[1] or 0), row[0].create_time))

    def get_version(self, name: str) -> DatasetVersion:
        parse_version(name, "datasets")
        with self.db.session() as s:
            return dataset_version_from_row(self._version_row(s, name))

    def list_versions(self, parent: str, *, filter: str = "", order_by: str = "", page_size: int = 0,
                      page_token: str = "") -> Page[DatasetVersion]:
        """One page of the versions of ``parent`` (``datasets/-``: every dataset), filtered and paged in SQL."""
        dataset_id = parse_parent(parent, "datasets", "parent", allow_wildcard=True)
        query = parse_list(DATASET_VERSION_SCHEMA, filter=filter, order_by=order_by, page_size=page_size,
                           page_token=page_token, scope=parent)
        with self.db.session() as s:
            stmt = select(DatasetVersionRow)
            if dataset_id != "-":
                if s.get(DatasetRow, parent) is None:
                    raise NotFound(f"dataset {parent!r} not found", reason="DATASET_NOT_FOUND", metadata={"name": parent})
                stmt = stmt.where(DatasetVersionRow.dataset == parent)
            return sql_page(s, stmt, query, DATASET_VERSION_SCHEMA, dataset_version_from_row)

    def delete_version(self, name: str, *, force: bool = False) -> None:
        """Delete a dataset version and its file; refused while model versions record it as a
        parent, unless ``force`` (the lineage edges stay, flagged deleted)."""
        parse_version(name, "datasets")
        with self.db.session() as s:
            row = self._version_row(s, name)
            children = sorted(s.scalars(select(EdgeRow.child).join(VersionRow, VersionRow.name == EdgeRow.child)
                                        .where(EdgeRow.parent == name)))
            if children and not force:
                raise FailedPrecondition(
                    f"dataset version {name!r} has descendants ({', '.join(children[:5])}); pass force to delete it",
                    reason="VERSION_HAS_DESCENDANTS", metadata={"name": name, "descendants": ",".join(children[:20])})
            key = row.artifact_key
            s.execute(delete(DatasetVersionRow).where(DatasetVersionRow.name == name))
        self.store.delete(key)
        log.info("dataset_version_deleted", version=name, force=force)

    # ------------------------------------------------------------------ validation

    def validate(self, name: str, *, model_version: str = "", max_length: int = 0,
                 expected_format: str = "") -> ValidationReport:
        """Validate a stored version (verified download), with token statistics under the
        tokenizer of ``model_version`` when given."""
        version = self.get_version(name)
        if max_length < 0:
            raise InvalidArgument.for_field("max_length", f"must not be negative, got {max_length}")
        if max_length and not model_version:
            raise InvalidArgument.for_field("max_length", "needs model_version (its tokenizer counts the tokens)")
        with tempfile.TemporaryDirectory(dir=self.registry.staging, prefix="validate-") as tmp:
            local = Path(tmp) / version.filename
            self.store.get_file(version.artifact_key, local, FileEntry(version.artifact_key, version.size_bytes, version.sha256))
            tokenizer, images = (self._model_view(model_version, Path(tmp) / "tokenizer") if model_version
                                 else (None, self._image_check()))
            return self._validate_file(local, version.filename, field_name="name",
                                       expected_format=cast(DatasetFormat, expected_format or None),
                                       tokenizer=tokenizer, max_length=max_length or None, images=images)

    def _validate_file(self, path: Path, filename: str, *, field_name: str, **kw: Any) -> ValidationReport:
        """``validate_dataset``, an unsafe or unreadable archive named as ``filename`` under ``field_name``."""
        try:
            return validate_dataset(path, workdir=self.registry.staging, **kw)
        except InvalidArgument as err:
            if err.reason != "DATASET_ARCHIVE_INVALID":
                raise
            description = err.message.removeprefix(f"{path.name}: ")
            raise InvalidArgument.for_field(field_name, f"{filename}: {description}",
                                            reason="DATASET_ARCHIVE_INVALID") from None

    def _image_check(self, **kw: Any) -> ImageCheck:
        return ImageCheck(allow_remote=self.registry.settings.datasets.allow_remote_images, **kw)

    def _model_view(self, model_version: str, dest: Path) -> tuple[Any, ImageCheck]:
        """How ``model_version`` sees the rows: a text-only model its tokenizer (and no images); a
        vision-language model its processor (image tokens counted) and its image limit per row."""
        from transformers import AutoTokenizer

        from services.core.vision import load_processor, vision_info

        version = self.registry._ready_version(model_version)
        wanted = [f for f in version.files if "/" not in f.path and f.path.endswith(_TOKENIZER_SUFFIXES)]
        for f in wanted:
            self.store.get_file(file_key(version.artifact_prefix, f.path), dest / f.path, FileEntry(f.path, f.size, f.sha256))
        if version.metadata.get("vision") or vision_info(dest) is not None:
            try:
                processor = load_processor(dest)
            except Exception as exc:  # noqa: BLE001 - any failure means no usable processor
                raise FailedPrecondition(f"model version {model_version!r} is a vision-language model without a "
                                         f"usable processor: {exc}", reason="PROCESSOR_MISSING",
                                         metadata={"name": model_version}) from None
            limit = _model_image_limit(dest) or self.registry.settings.datasets.max_images_per_row
            return None, self._image_check(max_images_per_row=limit, model=model_version, processor=processor)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(dest), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure means no usable tokenizer
            raise FailedPrecondition(f"model version {model_version!r} has no usable tokenizer: {exc}",
                                     reason="TOKENIZER_MISSING", metadata={"name": model_version}) from None
        return tokenizer, self._image_check(model=model_version, takes_images=False)

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _version_row(s: Session, name: str) -> DatasetVersionRow:
        row = s.get(DatasetVersionRow, name)
        if row is None:
            raise NotFound(f"dataset version {name!r} not found", reason="DATASET_VERSION_NOT_FOUND",
                           metadata={"name": name})
        return row

    @staticmethod
    def _refuse_existing(s: Session, name: str) -> None:
        if s.get(DatasetVersionRow, name) is not None:
            raise AlreadyExists(f"dataset version {name!r} already exists", reason="DATASET_VERSION_EXISTS",
                                metadata={"name": name})

    @staticmethod
    def _next_version_id(s: Session, dataset: DatasetRow) -> str:
        while True:
            candidate = f"v{dataset.next_version}"
            dataset.next_version += 1
            if s.get(DatasetVersionRow, f"{dataset.name}/versions/{candidate}") is None:
                return candidate
