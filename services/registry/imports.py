"""Model imports as tracked operations (``imports/{id}``).

``start`` reserves the target version (state CREATING) and returns at once; a worker thread
fetches the source (GGUF conversion runs in a child process), validates and inspects the
folder, uploads the files with progress, writes the manifest and marks the version READY.
A failed import deletes whatever it uploaded and its version row: only the FAILED import
record remains. Progress lives in the database, so any replica can answer Get/Watch.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sqlalchemy import delete, select

from services.core.artifacts import FileEntry, Manifest, file_key, manifest_key
from services.core.db import utcnow
from services.core.errors import DomainError, FailedPrecondition, Internal, InvalidArgument, NotFound
from services.core.logging import get_logger

from . import listing
from .domain import Page, Registry, check_labels, new_artifact_prefix
from .inspection import detect_format, validate_and_inspect
from .names import check_id, parse_import, parse_parent
from .records import ImportError_, ImportProgress, ImportState, Lineage, ModelFormat, ModelImport, ModelKind, VersionState
from .sources import Source, fetch, model_files, parse_source
from .tables import ImportRow, ModelRow, VersionRow

log = get_logger(__name__)

IMPORT_FIELDS = listing.Fields(
    getters={
        "name": lambda i: i.name,
        "state": lambda i: i.state.value,
        "model_version": lambda i: i.model_version,
        "source_uri": lambda i: i.source_uri,
        "create_time": lambda i: i.create_time,
        "update_time": lambda i: i.update_time,
    },
    enum_prefixes={"state": "IMPORT_STATE_"},
    sortable=frozenset({"name", "create_time", "update_time"}),
    default_order="create_time desc",
)

# Stage -> (start, end) of the overall fraction.
_STAGES = {"fetching": (0.0, 0.4), "validating": (0.4, 0.5), "uploading": (0.5, 0.99)}


def import_from_row(row: ImportRow) -> ModelImport:
    err = row.error
    return ModelImport(
        name=row.name, source_uri=row.source_uri, model_version=row.model_version, state=ImportState(row.state),
        progress=ImportProgress(row.fraction, row.stage, row.bytes_done, row.bytes_total),
        error=ImportError_(err["code"], err["message"], err["reason"], err["domain"], err["metadata"],
                           [tuple(v) for v in err["violations"]]) if err else None,
        create_time=row.create_time, update_time=row.update_time, end_time=row.end_time,
    )


class Imports:
    """Starts, runs and reports imports."""

    def __init__(self, registry: Registry, *, workers: int = 2) -> None:
        self.registry = registry
        self.db = registry.db
        self.store = registry.store
        self.settings = registry.settings
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="registry-import")
        self._closed = threading.Event()

    # ------------------------------------------------------------------ API

    def start(self, parent: str, *, version_id: str = "", source_uri: str, description: str = "",
              labels: dict[str, str] | None = None) -> ModelImport:
        """Validate the request, reserve the version and queue the work; returns the PENDING import."""
        if self._closed.is_set():
            raise FailedPrecondition("the registry is shutting down", reason="SHUTTING_DOWN")
        parse_parent(parent, "models", "parent")
        if version_id:
            check_id(version_id, "version_id")
        labels = check_labels(labels or {})
        source = parse_source(source_uri)
        import_name = f"imports/{uuid.uuid4().hex}"
        now = utcnow()
        with self.db.session() as s:
            model_row = s.get(ModelRow, parent)
            created_model = model_row is None
            model_row = Registry._ensure_model(s, parent)
            name = f"{parent}/versions/{version_id or Registry._next_version_id(s, model_row)}"
            row = Registry._new_version_row(
                # kind and format are placeholders until the files are inspected
                name, ModelKind.BASE, ModelFormat.SAFETENSORS, new_artifact_prefix(name), Lineage(source_uri=source.uri),
                description, labels, state=VersionState.CREATING, files=[], meta={},
            )
            Registry._insert_version(s, row, Lineage())
            imp = ImportRow(name=import_name, source_uri=source.uri, model_version=name, state=ImportState.PENDING.value,
                            fraction=0.0, stage="pending", bytes_done=0, bytes_total=0, error=None,
                            created_model=created_model, create_time=now, update_time=now)
            s.add(imp)
            result = import_from_row(imp)
        log.info("import_started", import_=import_name, version=name, source=source.uri, scheme=source.scheme)
        self._pool.submit(self._run, import_name, source)
        return result

    def get(self, name: str) -> ModelImport:
        parse_import(name)
        with self.db.session() as s:
            row = s.get(ImportRow, name)
            if row is None:
                raise NotFound(f"import {name!r} not found", reason="IMPORT_NOT_FOUND", metadata={"name": name})
            return import_from_row(row)

    def list(self, *, filter: str = "", order_by: str = "", page_size: int = 0, page_token: str = "") -> Page[ModelImport]:
        if page_size < 0:
            raise InvalidArgument.for_field("page_size", f"must not be negative, got {page_size}")
        with self.db.session() as s:
            items = [import_from_row(r) for r in s.scalars(select(ImportRow))]
        return Page(*listing.list_page(items, fields=IMPORT_FIELDS, filter=filter, order_by=order_by,
                                       page_size=page_size, page_token=page_token))

    def recover(self) -> int:
        """Fail imports left PENDING/RUNNING by a previous process (their work died with it)."""
        with self.db.session() as s:
            stale = list(s.scalars(select(ImportRow.name).where(
                ImportRow.state.in_([ImportState.PENDING.value, ImportState.RUNNING.value]))))
        for name in stale:
            self._fail(name, Internal("the registry restarted while this import was running; start it again",
                                      reason="IMPORT_INTERRUPTED"))
        return len(stale)

    def close(self) -> None:
        """Stop taking imports and wait for the running ones."""
        self._closed.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ worker

    def _run(self, name: str, source: Source) -> None:
        staging = Path(tempfile.mkdtemp(dir=self.registry.staging, prefix="import-"))
        try:
            self._progress(name, "fetching", 0, 0, state=ImportState.RUNNING)
            folder = fetch(source, staging, self.settings, lambda done, total: self._progress(name, "fetching", done, total))
            self._progress(name, "validating", 0, 0)
            kind, fmt = detect_format(folder)
            meta = validate_and_inspect(folder, fmt)
            manifest = self._upload(name, folder)
            with self.db.session() as s:
                imp = s.get(ImportRow, name)
                version = s.get(VersionRow, imp.model_version)
                version.kind, version.format, version.state = kind.value, fmt.value, VersionState.READY.value
                version.files = [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in manifest.files]
                version.meta = meta.to_dict()
                version.update_time = utcnow()
                imp.state, imp.stage, imp.fraction = ImportState.SUCCEEDED.value, "done", 1.0
                imp.update_time = imp.end_time = utcnow()
            log.info("import_succeeded", import_=name, version=imp.model_version, files=len(manifest.files),
                     size=manifest.total_size, parameters=meta.parameter_count)
        except DomainError as err:
            self._fail(name, err)
        except Exception as exc:  # noqa: BLE001 - reported in the import record, never lost
            log.exception("import_crashed", import_=name)
            self._fail(name, Internal(f"import failed unexpectedly: {type(exc).__name__}: {exc}", reason="IMPORT_FAILED"))
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _upload(self, name: str, folder: Path) -> Manifest:
        with self.db.session() as s:
            prefix = s.get(VersionRow, s.get(ImportRow, name).model_version).artifact_prefix
        paths = model_files(folder)
        total = sum(p.stat().st_size for p in paths)
        done, entries = 0, []
        self._progress(name, "uploading", 0, total)
        for path in paths:
            rel = path.relative_to(folder).as_posix()
            stored = self.store.put_file(file_key(prefix, rel), path)
            entries.append(FileEntry(rel, stored.size, stored.sha256))
            done += stored.size
            self._progress(name, "uploading", done, total)
        manifest = Manifest(entries)
        self.store.put_bytes(manifest_key(prefix), manifest.to_json().encode(), content_type="application/json")
        return manifest

    def _progress(self, name: str, stage: str, done: int, total: int, *, state: ImportState | None = None) -> None:
        lo, hi = _STAGES[stage]
        fraction = lo + (hi - lo) * (done / total if total else 0.0)
        with self.db.session() as s:
            row = s.get(ImportRow, name)
            if state is not None:
                row.state = state.value
            row.stage, row.bytes_done, row.bytes_total = stage, done, total
            row.fraction = round(fraction, 4)
            row.update_time = utcnow()

    def _fail(self, name: str, err: DomainError) -> None:
        """Record the error and remove everything of the half-made version."""
        with self.db.session() as s:
            imp = s.get(ImportRow, name)
            version = s.get(VersionRow, imp.model_version)
            prefix = version.artifact_prefix if version is not None else None
            if version is not None and version.state == VersionState.CREATING.value:
                s.delete(version)
                s.flush()
                if imp.created_model and not s.scalar(select(VersionRow.name).where(VersionRow.model == version.model).limit(1)):
                    s.execute(delete(ModelRow).where(ModelRow.name == version.model))
            else:
                prefix = None
            imp.state = ImportState.FAILED.value
            imp.error = {"code": err.code.value[0], "message": err.message, "reason": err.reason,
                         "domain": err.domain if err.domain != "modelyard" else "modelyard.registry",
                         "metadata": dict(err.metadata), "violations": [[v.field, v.description] for v in err.violations]}
            imp.update_time = imp.end_time = utcnow()
        if prefix:
            try:
                self.store.delete_prefix(prefix)
            except DomainError as cleanup:
                log.warning("import_cleanup_failed", import_=name, prefix=prefix, error=cleanup.message)
        log.warning("import_failed", import_=name, reason=err.reason, error=err.message)

