"""The registry domain: models, versions, lineage and verified downloads.

Plain Python over the metadata database and the artifact store; raises the typed errors of
``services.core.errors``. Synchronous: the servicer calls it through ``asyncio.to_thread``.
A version's files live at ``{artifact_prefix}/files/{path}`` with ``{artifact_prefix}/manifest.json``.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections import deque
from collections.abc import Generator
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.core.artifacts import ArtifactStore, FileEntry, Manifest, file_key
from services.core.db import Database, lock_or_create, utcnow
from services.core.errors import Aborted, AlreadyExists, DataLoss, FailedPrecondition, InvalidArgument, NotFound
from services.core.listing import EQUALITY, Field, Page, Schema, enum_value, int_value, sql_page, time_value
from services.core.listing import parse as parse_list
from services.core.logging import get_logger

from . import scores as scoring
from .inspection import detect_format, validate_and_inspect
from .names import check_id, parse_any_version, parse_parent, parse_version
from .records import (
    EvaluationScore,
    FileInfo,
    Lineage,
    LineageEdge,
    LineageGraph,
    LineageNode,
    Model,
    ModelFormat,
    ModelKind,
    ModelVersion,
    Relation,
    VersionState,
)
from .settings import RegistrySettings
from .tables import DatasetVersionRow, EdgeRow, ModelRow, VersionRow

log = get_logger(__name__)
# Longest lineage.job stored (the size of the job columns of versions and lineage edges).
MAX_JOB_NAME = 300

DEPLOYED_LABEL = "deployed_by"  # a label that marks a version deployed (besides SetDeploymentMarker)
UPDATABLE_FIELDS = frozenset({"description", "labels"})

_VERSION_COUNT = (select(func.count()).select_from(VersionRow).where(VersionRow.model == ModelRow.name)
                  .correlate(ModelRow).scalar_subquery())

MODEL_SCHEMA = Schema(
    {
        "name": Field(ModelRow.name, sortable=True),
        "create_time": Field(ModelRow.create_time, parse=time_value, sortable=True),
        "update_time": Field(ModelRow.update_time, parse=time_value, sortable=True),
        "version_count": Field(_VERSION_COUNT, parse=int_value, sortable=True),
    },
    default_order="create_time", name=Field(ModelRow.name), labels=ModelRow.labels,
)
VERSION_SCHEMA = Schema(
    {
        "name": Field(VersionRow.name, sortable=True),
        "model": Field(VersionRow.model, ops=EQUALITY),
        "kind": Field(VersionRow.kind, parse=enum_value("MODEL_KIND_", choices=[k.value for k in ModelKind]),
                      ops=EQUALITY),
        "format": Field(VersionRow.format, parse=enum_value("MODEL_FORMAT_", choices=[f.value for f in ModelFormat]),
                        ops=EQUALITY),
        "state": Field(VersionRow.state, parse=enum_value("MODEL_VERSION_STATE_", choices=[v.value for v in VersionState]),
                       ops=EQUALITY),
        "base_model_version": Field(VersionRow.base_model_version, ops=EQUALITY),
        "job": Field(VersionRow.job, ops=EQUALITY),
        "source_uri": Field(VersionRow.source_uri, ops=EQUALITY),
        "create_time": Field(VersionRow.create_time, parse=time_value, sortable=True),
        "update_time": Field(VersionRow.update_time, parse=time_value, sortable=True),
        "parameter_count": Field(VersionRow.parameter_count, parse=int_value, sortable=True),
        "total_size_bytes": Field(VersionRow.total_size_bytes, parse=int_value, sortable=True),
    },
    default_order="create_time", name=Field(VersionRow.name), labels=VersionRow.labels,
)


def check_labels(labels: dict[str, str], field: str = "labels") -> dict[str, str]:
    for key, value in labels.items():
        if not key or len(key) > 63 or len(value) > 256:
            raise InvalidArgument.for_field(f"{field}.{key}", "label keys must be 1-63 characters, values at most 256")
    return dict(labels)


def check_mask(paths: list[str]) -> list[str]:
    """The update_mask paths (empty mask: every updatable field)."""
    for path in paths:
        if path not in UPDATABLE_FIELDS:
            raise InvalidArgument.for_field(
                "update_mask", f"cannot update {path!r}; updatable: {', '.join(sorted(UPDATABLE_FIELDS))}")
    return paths or sorted(UPDATABLE_FIELDS)


def model_from_row(row: ModelRow, version_count: int) -> Model:
    return Model(row.name, row.description, dict(row.labels or {}), version_count, row.create_time, row.update_time)


def version_from_row(row: VersionRow) -> ModelVersion:
    return ModelVersion(
        name=row.name, kind=ModelKind(row.kind), format=ModelFormat(row.format), state=VersionState(row.state),
        description=row.description, labels=dict(row.labels or {}),
        files=[FileInfo(f["path"], int(f["size"]), f["sha256"]) for f in row.files or []],
        metadata=dict(row.meta or {}),
        lineage=Lineage(row.base_model_version, list(row.dataset_versions or []), row.job,
                        dict(row.parameters or {}), row.source_uri),
        deployed_by=list(row.deployed_by or []), artifact_prefix=row.artifact_prefix,
        create_time=row.create_time, update_time=row.update_time,
    )


def manifest_of(version: ModelVersion) -> Manifest:
    return Manifest([FileEntry(f.path, f.size, f.sha256) for f in version.files])


class Registry:
    """Models, versions, lineage and downloads."""

    def __init__(self, db: Database, store: ArtifactStore, settings: RegistrySettings) -> None:
        self.db = db
        self.store = store
        self.settings = settings
        self.staging = settings.staging_path()

    # ------------------------------------------------------------------ models

    def create_model(self, model_id: str, description: str = "", labels: dict[str, str] | None = None) -> Model:
        name = f"models/{check_id(model_id, 'model_id')}"
        labels = check_labels(labels or {})
        try:
            with self.db.session() as s:
                if s.get(ModelRow, name) is not None:
                    raise AlreadyExists(f"model {name!r} already exists", reason="MODEL_EXISTS", metadata={"name": name})
                row = ModelRow(name=name, description=description, labels=labels, next_version=1,
                               create_time=utcnow(), update_time=utcnow())
                s.add(row)
        except IntegrityError:
            raise AlreadyExists(f"model {name!r} already exists", reason="MODEL_EXISTS", metadata={"name": name}) from None
        log.info("model_created", model=name)
        return model_from_row(row, 0)

    def get_model(self, name: str) -> Model:
        parse_parent(name, "models")
        with self.db.session() as s:
            row = self._model_row(s, name)
            return model_from_row(row, self._version_count(s, name))

    def list_models(self, *, filter: str = "", order_by: str = "", page_size: int = 0, page_token: str = "") -> Page[Model]:
        """One page of models, filtered, ordered and counted in SQL (version_count by a correlated subquery)."""
        query = parse_list(MODEL_SCHEMA, filter=filter, order_by=order_by, page_size=page_size, page_token=page_token)
        with self.db.session() as s:
            return sql_page(s, select(ModelRow, _VERSION_COUNT), query, MODEL_SCHEMA,
                            lambda row: model_from_row(row[0], int(row[1] or 0)))

    def update_model(self, name: str, *, description: str, labels: dict[str, str], mask: list[str]) -> Model:
        parse_parent(name, "models", "model.name")
        paths = check_mask(mask)
        labels = check_labels(labels)
        with self.db.session() as s:
            row = self._model_row(s, name)
            if "description" in paths:
                row.description = description
            if "labels" in paths:
                row.labels = labels
            row.update_time = utcnow()
            return model_from_row(row, self._version_count(s, name))

    def delete_model(self, name: str, *, force: bool = False) -> list[str]:
        """Delete a model; its versions too when ``force`` (FAILED_PRECONDITION otherwise)."""
        parse_parent(name, "models")
        with self.db.session() as s:
            self._model_row(s, name)
            versions = list(s.scalars(select(VersionRow.name).where(VersionRow.model == name).order_by(VersionRow.name)))
        if versions and not force:
            raise FailedPrecondition(
                f"model {name!r} has {len(versions)} versions; delete them first or pass force",
                reason="MODEL_HAS_VERSIONS", metadata={"name": name, "versions": ",".join(versions[:20])},
            )
        for version in versions:
            self.delete_version(version, force=True)
        with self.db.session() as s:
            s.execute(delete(ModelRow).where(ModelRow.name == name))
        log.info("model_deleted", model=name, versions=len(versions))
        return versions

    # ------------------------------------------------------------------ versions

    def get_version(self, name: str) -> ModelVersion:
        parse_version(name, "models")
        with self.db.session() as s:
            return self._with_scores(s, [version_from_row(self._version_row(s, name))])[0]

    def list_versions(self, parent: str, *, filter: str = "", order_by: str = "", page_size: int = 0,
                      page_token: str = "") -> Page[ModelVersion]:
        """One page of the versions of ``parent`` (``models/-``: every model), filtered and paged in SQL."""
        model_id = parse_parent(parent, "models", "parent", allow_wildcard=True)
        query = parse_list(VERSION_SCHEMA, filter=filter, order_by=order_by, page_size=page_size, page_token=page_token,
                      scope=parent)
        with self.db.session() as s:
            stmt = select(VersionRow)
            if model_id != "-":
                self._model_row(s, parent)
                stmt = stmt.where(VersionRow.model == parent)
            page = sql_page(s, stmt, query, VERSION_SCHEMA, version_from_row)
            self._with_scores(s, page.items)  # one query for the whole page
            return page

    def update_version(self, name: str, *, description: str, labels: dict[str, str], mask: list[str]) -> ModelVersion:
        parse_version(name, "models", "model_version.name")
        paths = check_mask(mask)
        labels = check_labels(labels, "model_version.labels")
        with self.db.session() as s:
            row = self._version_row(s, name)
            if "description" in paths:
                row.description = description
            if "labels" in paths:
                row.labels = labels
            row.update_time = utcnow()
            return self._with_scores(s, [version_from_row(row)])[0]

    def delete_version(self, name: str, *, force: bool = False) -> None:
        """Delete a version and its artifacts. Refused (FAILED_PRECONDITION) while it is being
        imported, and, unless ``force``, when versions derive from it or it is deployed."""
        parse_version(name, "models")
        with self.db.session() as s:
            row = self._version_row(s, name)
            if row.state == VersionState.CREATING:
                raise FailedPrecondition(f"version {name!r} is still being imported", reason="VERSION_CREATING",
                                         metadata={"name": name})
            children = self._live_children(s, name)
            deployed = sorted({*(row.deployed_by or []), *([row.labels[DEPLOYED_LABEL]] if DEPLOYED_LABEL in (row.labels or {}) else [])})
            if not force and children:
                raise FailedPrecondition(
                    f"version {name!r} has descendants ({', '.join(children[:5])}); delete them first or pass force",
                    reason="VERSION_HAS_DESCENDANTS", metadata={"name": name, "descendants": ",".join(children[:20])},
                )
            if not force and deployed:
                raise FailedPrecondition(
                    f"version {name!r} is deployed by {', '.join(deployed)}; undeploy it first or pass force",
                    reason="VERSION_DEPLOYED", metadata={"name": name, "deployed_by": ",".join(deployed)},
                )
            prefix = row.artifact_prefix
            scoring.delete_scores(s, name)
            s.delete(row)
            s.execute(delete(EdgeRow).where(EdgeRow.child == name))
            s.flush()
            shared = s.scalar(select(func.count()).select_from(VersionRow).where(VersionRow.artifact_prefix == prefix))
        if not shared:
            self.store.delete_prefix(prefix)
        log.info("version_deleted", version=name, force=force, artifacts_deleted=not shared)

    def register_version(
        self,
        parent: str,
        *,
        version_id: str = "",
        kind: ModelKind | None,
        fmt: ModelFormat | None,
        artifact_prefix: str,
        lineage: Lineage,
        description: str = "",
        labels: dict[str, str] | None = None,
        derived: bool = False,
    ) -> ModelVersion:
        """Register a READY version from files already uploaded under ``artifact_prefix``.

        The files are downloaded and verified against the manifest, then validated and
        inspected like an import. ``derived`` (RegisterDerivedVersion) requires an adapter,
        merged or quantized kind and a base model version.
        """
        parse_parent(parent, "models", "parent")
        if version_id:
            check_id(version_id, "version_id")
        labels = check_labels(labels or {})
        if len(lineage.job) > MAX_JOB_NAME:  # the column's size (PostgreSQL refuses longer; SQLite would keep it)
            raise InvalidArgument.for_field("lineage.job", f"must be at most {MAX_JOB_NAME} characters, got "
                                            f"{len(lineage.job)}")
        if derived:
            if kind in (None, ModelKind.BASE):
                raise InvalidArgument.for_field("kind", "a derived version is ADAPTER, MERGED or QUANTIZED")
            if not lineage.base_model_version:
                raise InvalidArgument.for_field("lineage.base_model_version", "is required for a derived version")
        if not artifact_prefix:
            raise InvalidArgument.for_field("artifact_prefix", "is required")
        with self.db.session() as s:
            self._check_parents(s, lineage)
            if version_id and s.get(VersionRow, f"{parent}/versions/{version_id}") is not None:
                raise AlreadyExists(f"version {parent}/versions/{version_id} already exists", reason="VERSION_EXISTS",
                                    metadata={"name": f"{parent}/versions/{version_id}"})
        try:
            manifest = self.store.read_manifest(artifact_prefix)
        except NotFound:
            raise InvalidArgument.for_field("artifact_prefix", f"no manifest.json under {artifact_prefix!r}",
                                            reason="MANIFEST_NOT_FOUND") from None
        with tempfile.TemporaryDirectory(dir=self.staging, prefix="register-") as tmp:
            folder = Path(tmp)
            self.store.download_dir(artifact_prefix, folder, manifest)
            detected_kind, detected_fmt = detect_format(folder)
            fmt = fmt or detected_fmt
            meta = validate_and_inspect(folder, fmt)
        with self.db.session() as s:
            self._check_parents(s, lineage)
            model_row = self._ensure_model(s, parent)
            name = f"{parent}/versions/{version_id or self._next_version_id(s, model_row)}"
            row = self._new_version_row(
                name, kind or detected_kind, fmt, artifact_prefix, lineage, description, labels,
                state=VersionState.READY, files=manifest.files, meta=meta.to_dict(),
            )
            self._insert_version(s, row, lineage)
            version = version_from_row(row)
        log.info("version_registered", version=name, kind=version.kind.value, format=fmt.value,
                 parameters=meta.parameter_count, derived=derived)
        return version

    def set_deployment_marker(self, name: str, deployment: str, deployed: bool) -> ModelVersion:
        parse_version(name, "models")
        if not deployment:
            raise InvalidArgument.for_field("deployment", "is required")
        with self.db.session() as s:
            row = self._version_row(s, name)
            markers = set(row.deployed_by or [])
            markers = markers | {deployment} if deployed else markers - {deployment}
            row.deployed_by = sorted(markers)
            row.update_time = utcnow()
            return self._with_scores(s, [version_from_row(row)])[0]

    # ------------------------------------------------------------------ evaluation scores

    def record_evaluation_scores(self, name: str, evaluation: str, scores: list[EvaluationScore]) -> ModelVersion:
        """Replace the scores ``evaluation`` recorded on version ``name`` with ``scores`` (none: remove them).

        Idempotent: recording the same evaluation again leaves one set of its scores (the time of its
        first recording is kept). The version must be READY; its ``update_time`` is not changed.
        """
        parse_version(name, "models")
        scoring.check_evaluation(evaluation)
        checked = scoring.check_scores(evaluation, scores)
        try:
            with self.db.session() as s:
                row = self._version_row(s, name)
                if row.state != VersionState.READY:
                    raise FailedPrecondition(f"version {name!r} is {row.state}, not ready", reason="VERSION_NOT_READY",
                                             metadata={"name": name})
                scoring.replace_scores(s, name, evaluation, checked, utcnow())
                version = self._with_scores(s, [version_from_row(row)])[0]
        except IntegrityError:
            raise Aborted(f"scores of {evaluation} on {name} were recorded concurrently; retry",
                          reason="CONCURRENT_UPDATE", metadata={"name": name}) from None
        log.info("evaluation_scores_recorded", version=name, evaluation=evaluation, scores=len(checked))
        return version

    @staticmethod
    def _with_scores(s: Session, versions: list[ModelVersion]) -> list[ModelVersion]:
        by_name = scoring.scores_of(s, (v.name for v in versions))
        for v in versions:
            v.scores = by_name[v.name]
        return versions

    # ------------------------------------------------------------------ lineage

    def get_lineage(self, name: str, *, direction: str = "both", depth: int = 0) -> LineageGraph:
        """Breadth-first walk from ``name`` (``ancestors`` | ``descendants`` | ``both``), ``depth``
        hops at most (0: unlimited). Nodes of deleted resources are kept and flagged."""
        parse_any_version(name)
        if depth < 0:
            raise InvalidArgument.for_field("depth", f"must not be negative, got {depth}")
        if direction not in ("ancestors", "descendants", "both"):
            raise InvalidArgument.for_field("direction", f"unknown direction {direction!r}")
        with self.db.session() as s:
            root = self._node(s, name)
            if root.deleted:
                raise NotFound(f"{name!r} not found", reason="VERSION_NOT_FOUND", metadata={"name": name})
            nodes, edges = {name: root}, {}
            queue = deque([(name, 0)])
            while queue:
                current, hops = queue.popleft()
                if depth and hops >= depth:
                    continue
                found: list[EdgeRow] = []
                if direction in ("ancestors", "both"):
                    found += s.scalars(select(EdgeRow).where(EdgeRow.child == current)).all()
                if direction in ("descendants", "both"):
                    found += s.scalars(select(EdgeRow).where(EdgeRow.parent == current)).all()
                for e in found:
                    edges[(e.parent, e.child)] = LineageEdge(e.parent, e.child, Relation(e.relation), e.job)
                    other = e.parent if e.child == current else e.child
                    if other not in nodes:
                        nodes[other] = self._node(s, other)
                        queue.append((other, hops + 1))
        return LineageGraph(list(nodes.values()), sorted(edges.values(), key=lambda e: (e.parent, e.child)))

    def _node(self, s: Session, name: str) -> LineageNode:
        if name.startswith("datasets/"):
            exists = s.get(DatasetVersionRow, name) is not None
            return LineageNode(name, "dataset_version", None, "", not exists)
        row = s.get(VersionRow, name)
        if row is None:
            return LineageNode(name, "model_version", None, "", True)
        return LineageNode(name, "model_version", ModelKind(row.kind), row.job, False)

    # ------------------------------------------------------------------ downloads

    def download_urls(self, name: str, *, expires_s: int = 0, verify: bool = False) -> list[tuple[FileInfo, str]]:
        """Presigned URLs of every file; sizes always checked against the manifest, SHA-256
        too with ``verify``. A mismatch is DATA_LOSS: no URL is handed out for bad bytes."""
        version = self._ready_version(name)
        if expires_s < 0:
            raise InvalidArgument.for_field("expires_seconds", f"must not be negative, got {expires_s}")
        stored = {o.key: o.size for o in self.store.list(f"{version.artifact_prefix}/files")}
        for f in version.files:
            key = file_key(version.artifact_prefix, f.path)
            if key not in stored:
                raise DataLoss(f"{name}: file {f.path!r} is missing from storage", reason="ARTIFACT_MISSING",
                               metadata={"name": name, "path": f.path})
            if stored[key] != f.size:
                raise DataLoss(f"{name}: file {f.path!r} has {stored[key]} bytes in storage, manifest says {f.size}",
                               reason="CHECKSUM_MISMATCH", metadata={"name": name, "path": f.path})
        if verify:
            with tempfile.TemporaryDirectory(dir=self.staging, prefix="verify-") as tmp:
                for f in version.files:
                    dest = Path(tmp) / "file"
                    self.store.get_file(file_key(version.artifact_prefix, f.path), dest, FileEntry(f.path, f.size, f.sha256))
                    dest.unlink()
        expires = timedelta(seconds=expires_s or 3600)
        return [(f, self.store.presigned_get_url(file_key(version.artifact_prefix, f.path), expires)) for f in version.files]

    def open_file(self, name: str, path: str, chunk_size: int) -> tuple[FileInfo, Generator[bytes, None, None]]:
        """A file of a version, verified against the manifest before the first chunk is
        produced (DATA_LOSS otherwise), and an iterator over its chunks."""
        version = self._ready_version(name)
        entry = next((f for f in version.files if f.path == path), None)
        if entry is None:
            raise NotFound(f"{name} has no file {path!r}", reason="FILE_NOT_FOUND", metadata={"name": name, "path": path})
        tmp = Path(tempfile.mkdtemp(dir=self.staging, prefix="download-"))
        try:
            local = tmp / "file"
            self.store.get_file(file_key(version.artifact_prefix, path), local, FileEntry(path, entry.size, entry.sha256))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

        def chunks() -> Generator[bytes, None, None]:
            try:
                with local.open("rb") as f:
                    while block := f.read(chunk_size):
                        yield block
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

        return entry, chunks()

    # ------------------------------------------------------------------ helpers shared with imports

    def _ready_version(self, name: str) -> ModelVersion:
        version = self.get_version(name)
        if version.state != VersionState.READY:
            raise FailedPrecondition(f"version {name!r} is {version.state.value}, not ready", reason="VERSION_NOT_READY",
                                     metadata={"name": name})
        return version

    def _model_row(self, s: Session, name: str) -> ModelRow:
        row = s.get(ModelRow, name)
        if row is None:
            raise NotFound(f"model {name!r} not found", reason="MODEL_NOT_FOUND", metadata={"name": name})
        return row

    def _version_row(self, s: Session, name: str) -> VersionRow:
        row = s.get(VersionRow, name)
        if row is None:
            raise NotFound(f"version {name!r} not found", reason="VERSION_NOT_FOUND", metadata={"name": name})
        return row

    @staticmethod
    def _version_count(s: Session, model: str) -> int:
        return int(s.scalar(select(func.count()).select_from(VersionRow).where(VersionRow.model == model)) or 0)

    @staticmethod
    def _live_children(s: Session, name: str) -> list[str]:
        return sorted(s.scalars(
            select(EdgeRow.child).join(VersionRow, VersionRow.name == EdgeRow.child).where(EdgeRow.parent == name)
        ))

    def _check_parents(self, s: Session, lineage: Lineage) -> None:
        if lineage.base_model_version:
            parse_version(lineage.base_model_version, "models", "lineage.base_model_version")
            row = s.get(VersionRow, lineage.base_model_version)
            if row is None:
                raise NotFound(f"base model version {lineage.base_model_version!r} not found",
                               reason="VERSION_NOT_FOUND", metadata={"name": lineage.base_model_version})
        for i, ds in enumerate(lineage.dataset_versions):
            parse_version(ds, "datasets", f"lineage.dataset_versions[{i}]")
            if s.get(DatasetVersionRow, ds) is None:
                raise NotFound(f"dataset version {ds!r} not found", reason="DATASET_VERSION_NOT_FOUND",
                               metadata={"name": ds})

    @staticmethod
    def _ensure_model(s: Session, name: str) -> ModelRow:
        """The model's row, created when missing, locked until the transaction ends (concurrent registrations
        into one model, on any replica, take their automatic version numbers one after the other)."""
        now = utcnow()
        return lock_or_create(s, ModelRow, {"name": name, "description": "", "labels": {}, "next_version": 1,
                                            "create_time": now, "update_time": now})

    @staticmethod
    def _next_version_id(s: Session, model: ModelRow) -> str:
        while True:
            candidate = f"v{model.next_version}"
            model.next_version += 1
            if s.get(VersionRow, f"{model.name}/versions/{candidate}") is None:
                return candidate

    @staticmethod
    def _new_version_row(name: str, kind: ModelKind, fmt: ModelFormat, prefix: str, lineage: Lineage,
                         description: str, labels: dict[str, str], *, state: VersionState,
                         files: list[Any], meta: dict[str, Any]) -> VersionRow:
        now = utcnow()
        return VersionRow(
            name=name, model=name.rsplit("/versions/", 1)[0], kind=kind.value, format=fmt.value, state=state.value,
            description=description, labels=labels, artifact_prefix=prefix,
            files=[{"path": f.path, "size": f.size, "sha256": f.sha256} for f in files], meta=meta,
            total_size_bytes=sum(f.size for f in files), parameter_count=int(meta.get("parameter_count", 0)),
            base_model_version=lineage.base_model_version, dataset_versions=list(lineage.dataset_versions),
            job=lineage.job, parameters=dict(lineage.parameters), source_uri=lineage.source_uri, deployed_by=[],
            create_time=now, update_time=now,
        )

    @staticmethod
    def _insert_version(s: Session, row: VersionRow, lineage: Lineage) -> None:
        if s.get(VersionRow, row.name) is not None:
            raise AlreadyExists(f"version {row.name} already exists", reason="VERSION_EXISTS", metadata={"name": row.name})
        s.add(row)
        if lineage.base_model_version:
            s.add(EdgeRow(child=row.name, parent=lineage.base_model_version, relation=Relation.BASE_MODEL.value,
                          job=lineage.job))
        for ds in dict.fromkeys(lineage.dataset_versions):
            s.add(EdgeRow(child=row.name, parent=ds, relation=Relation.DATASET.value, job=lineage.job))
        try:
            s.flush()
        except IntegrityError:
            raise AlreadyExists(f"version {row.name} already exists", reason="VERSION_EXISTS",
                                metadata={"name": row.name}) from None


def new_artifact_prefix(version_name: str) -> str:
    """A fresh prefix for a version's files (unique, so a re-created name never meets old files)."""
    return f"{version_name}/{uuid.uuid4().hex[:12]}"
