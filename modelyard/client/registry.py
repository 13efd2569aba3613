"""``RegistryClient``: models, versions, imports, downloads and datasets of the registry service."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from google.protobuf import field_mask_pb2

from modelyard.common.v1 import common_pb2 as jpb
from modelyard.registry.v1 import registry_pb2 as rpb
from modelyard.registry.v1 import registry_pb2_grpc

from ._base import ServiceClient, follow_job, follow_pages

UPLOAD_CHUNK_BYTES = 1024 * 1024


def _mask(paths: Sequence[str]) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


class RegistryClient(ServiceClient):
    """Typed async client of ``modelyard.registry.v1.RegistryService``.

    Every method takes keyword arguments and an optional ``timeout`` (seconds) and returns the
    proto resource (or response); failures raise the registry's typed ``DomainError``.
    """

    _stub_class = registry_pb2_grpc.RegistryServiceStub

    # ------------------------------------------------------------------ models

    async def create_model(
        self,
        *,
        model_id: str,
        description: str = "",
        labels: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> rpb.Model:
        model = rpb.Model(description=description, labels=dict(labels or {}))
        return await self._unary("CreateModel", rpb.CreateModelRequest(model_id=model_id, model=model), timeout)

    async def get_model(self, name: str, *, timeout: float | None = None) -> rpb.Model:
        return await self._unary("GetModel", rpb.GetModelRequest(name=name), timeout)

    async def list_models(
        self,
        *,
        filter: str = "",
        order_by: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> rpb.ListModelsResponse:
        return await self._unary(
            "ListModels",
            rpb.ListModelsRequest(filter=filter, order_by=order_by, page_size=page_size, page_token=page_token),
            timeout,
        )

    def iter_models(
        self, *, filter: str = "", order_by: str = "", page_size: int = 0, limit: int = 0, timeout: float | None = None
    ) -> AsyncIterator[rpb.Model]:
        """Every model matching ``filter`` (pages followed; at most ``limit``, 0: all)."""
        return follow_pages(
            lambda token: self.list_models(
                filter=filter, order_by=order_by, page_size=page_size, page_token=token, timeout=timeout
            ),
            "models",
            limit,
        )

    async def update_model(
        self, model: rpb.Model, *, update_mask: Sequence[str], timeout: float | None = None
    ) -> rpb.Model:
        return await self._unary(
            "UpdateModel", rpb.UpdateModelRequest(model=model, update_mask=_mask(update_mask)), timeout
        )

    async def delete_model(self, name: str, *, force: bool = False, timeout: float | None = None) -> None:
        await self._unary("DeleteModel", rpb.DeleteModelRequest(name=name, force=force), timeout)

    # ------------------------------------------------------------------ versions

    async def create_model_version(
        self, *, parent: str, model_version: rpb.ModelVersion, version_id: str = "", timeout: float | None = None
    ) -> rpb.ModelVersion:
        return await self._unary(
            "CreateModelVersion",
            rpb.CreateModelVersionRequest(parent=parent, version_id=version_id, model_version=model_version),
            timeout,
        )

    async def get_model_version(self, name: str, *, timeout: float | None = None) -> rpb.ModelVersion:
        return await self._unary("GetModelVersion", rpb.GetModelVersionRequest(name=name), timeout)

    async def list_model_versions(
        self,
        *,
        parent: str,
        filter: str = "",
        order_by: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> rpb.ListModelVersionsResponse:
        return await self._unary(
            "ListModelVersions",
            rpb.ListModelVersionsRequest(
                parent=parent, filter=filter, order_by=order_by, page_size=page_size, page_token=page_token
            ),
            timeout,
        )

    def iter_model_versions(
        self,
        *,
        parent: str,
        filter: str = "",
        order_by: str = "",
        page_size: int = 0,
        limit: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[rpb.ModelVersion]:
        """Every version of ``parent`` (``models/-`` for all models) matching ``filter``, pages followed."""
        return follow_pages(
            lambda token: self.list_model_versions(
                parent=parent, filter=filter, order_by=order_by, page_size=page_size, page_token=token, timeout=timeout
            ),
            "model_versions",
            limit,
        )

    async def update_model_version(
        self, model_version: rpb.ModelVersion, *, update_mask: Sequence[str], timeout: float | None = None
    ) -> rpb.ModelVersion:
        return await self._unary(
            "UpdateModelVersion",
            rpb.UpdateModelVersionRequest(model_version=model_version, update_mask=_mask(update_mask)),
            timeout,
        )

    async def delete_model_version(self, name: str, *, force: bool = False, timeout: float | None = None) -> None:
        await self._unary("DeleteModelVersion", rpb.DeleteModelVersionRequest(name=name, force=force), timeout)

    async def register_derived_version(
        self,
        *,
        parent: str,
        kind: rpb.ModelKind | str,
        artifact_prefix: str,
        lineage: rpb.Lineage | None = None,
        format: rpb.ModelFormat | str = rpb.MODEL_FORMAT_UNSPECIFIED,
        version_id: str = "",
        description: str = "",
        labels: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> rpb.ModelVersion:
        """Register files already written under ``artifact_prefix`` as a new version (job outputs)."""
        return await self._unary(
            "RegisterDerivedVersion",
            rpb.RegisterDerivedVersionRequest(
                parent=parent,
                version_id=version_id,
                kind=kind,
                format=format,
                artifact_prefix=artifact_prefix,
                lineage=lineage,
                description=description,
                labels=dict(labels or {}),
            ),
            timeout,
        )

    async def set_deployment_marker(
        self, name: str, *, deployment: str, deployed: bool, timeout: float | None = None
    ) -> rpb.ModelVersion:
        return await self._unary(
            "SetDeploymentMarker",
            rpb.SetDeploymentMarkerRequest(name=name, deployment=deployment, deployed=deployed),
            timeout,
        )

    async def record_evaluation_scores(
        self,
        version: str,
        evaluation: str,
        scores: Iterable[Mapping[str, Any] | rpb.EvaluationScore],
        *,
        timeout: float | None = None,
    ) -> rpb.ModelVersion:
        """Record what ``evaluation`` measured on ``version``, replacing its earlier scores there.

        Each score is an ``EvaluationScore`` or a dict of its fields (``benchmark``, ``metric``,
        ``value``, optional ``stderr``, ``num_samples``). Safe to repeat: a retried evaluation
        records once. Returns the version with all its scores (newest evaluation first).
        """
        messages = [s if isinstance(s, rpb.EvaluationScore) else rpb.EvaluationScore(**dict(s)) for s in scores]
        return await self._unary(
            "RecordEvaluationScores",
            rpb.RecordEvaluationScoresRequest(name=version, evaluation=evaluation, scores=messages),
            timeout,
        )

    async def get_lineage(
        self,
        name: str,
        *,
        direction: rpb.LineageDirection | str = rpb.LINEAGE_DIRECTION_BOTH,
        depth: int = 0,
        timeout: float | None = None,
    ) -> rpb.GetLineageResponse:
        return await self._unary(
            "GetLineage", rpb.GetLineageRequest(name=name, direction=direction, depth=depth), timeout
        )

    # ------------------------------------------------------------------ imports

    async def import_model(
        self,
        *,
        parent: str,
        source_uri: str,
        version_id: str = "",
        description: str = "",
        labels: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> rpb.ModelImport:
        """Start importing ``source_uri`` as a version of ``parent``; the import job, queued."""
        return await self._unary(
            "ImportModel",
            rpb.ImportModelRequest(
                parent=parent,
                version_id=version_id,
                source_uri=source_uri,
                description=description,
                labels=dict(labels or {}),
            ),
            timeout,
        )

    async def get_import(self, name: str, *, timeout: float | None = None) -> rpb.ModelImport:
        return await self._unary("GetImport", rpb.GetImportRequest(name=name), timeout)

    async def list_imports(
        self,
        *,
        filter: str = "",
        order_by: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> rpb.ListImportsResponse:
        return await self._unary(
            "ListImports",
            rpb.ListImportsRequest(filter=filter, order_by=order_by, page_size=page_size, page_token=page_token),
            timeout,
        )

    def iter_imports(
        self, *, filter: str = "", order_by: str = "", page_size: int = 0, limit: int = 0, timeout: float | None = None
    ) -> AsyncIterator[rpb.ModelImport]:
        return follow_pages(
            lambda token: self.list_imports(
                filter=filter, order_by=order_by, page_size=page_size, page_token=token, timeout=timeout
            ),
            "model_imports",
            limit,
        )

    def watch_import(
        self, name: str, *, after_sequence: int = 0, timeout: float | None = None
    ) -> AsyncIterator[jpb.JobEvent]:
        """The import's events (stored ones after ``after_sequence``, then live) until it ends."""
        return self._server_stream(
            "WatchImport", rpb.WatchImportRequest(name=name, after_sequence=after_sequence), timeout
        )

    async def wait_import(
        self, name: str, *, on_event: Callable[[jpb.JobEvent], None] | None = None, timeout: float | None = None
    ) -> rpb.ModelImport:
        """Follow the import until it ends (``on_event`` sees each event); the finished import."""
        return await follow_job(
            lambda after: self.watch_import(name, after_sequence=after, timeout=timeout),
            lambda: self.get_import(name),
            on_event,
        )

    async def cancel_import(self, name: str, *, timeout: float | None = None) -> rpb.ModelImport:
        return await self._unary("CancelImport", rpb.CancelImportRequest(name=name), timeout)

    # ------------------------------------------------------------------ files

    async def get_download_urls(
        self, name: str, *, expires_seconds: int = 0, verify_checksums: bool = False, timeout: float | None = None
    ) -> rpb.GetDownloadUrlsResponse:
        return await self._unary(
            "GetDownloadUrls",
            rpb.GetDownloadUrlsRequest(name=name, expires_seconds=expires_seconds, verify_checksums=verify_checksums),
            timeout,
        )

    def download_file(
        self, name: str, *, path: str, timeout: float | None = None
    ) -> AsyncIterator[rpb.DownloadFileResponse]:
        """The chunks of one file of a version (``path`` relative to the version)."""
        return self._server_stream("DownloadFile", rpb.DownloadFileRequest(name=name, path=path), timeout)

    async def download_to(self, name: str, *, path: str, dest: Path, timeout: float | None = None) -> Path:
        """Write one file of a version to ``dest``; ``dest``."""
        with open(dest, "wb") as out:
            async for part in self.download_file(name, path=path, timeout=timeout):
                out.write(part.chunk)
        return dest

    # ------------------------------------------------------------------ datasets

    async def upload_dataset(
        self,
        path: Path | str,
        *,
        parent: str,
        version_id: str = "",
        expected_format: str = "",
        description: str = "",
        labels: Mapping[str, str] | None = None,
        chunk_bytes: int = UPLOAD_CHUNK_BYTES,
        on_progress: Callable[[int], None] | None = None,
        timeout: float | None = None,
    ) -> rpb.DatasetVersion:
        """Upload the file at ``path`` as a new version of ``parent`` (streamed in chunks).

        An image+text dataset is an archive (``.zip``, ``.tar``, ``.tar.gz``) holding one data file and the
        images its rows refer to; it is sent and stored as it is (``DatasetVersion.image_count`` counts the
        images). ``on_progress(n)`` is called with the size of each chunk sent.
        """
        file = Path(path)
        metadata = rpb.DatasetUploadMetadata(
            parent=parent,
            version_id=version_id,
            filename=file.name,
            expected_format=expected_format,
            description=description,
            labels=dict(labels or {}),
        )

        async def requests() -> AsyncIterator[rpb.UploadDatasetRequest]:
            yield rpb.UploadDatasetRequest(metadata=metadata)
            with file.open("rb") as f:
                while chunk := f.read(chunk_bytes):
                    yield rpb.UploadDatasetRequest(chunk=chunk)
                    if on_progress is not None:
                        on_progress(len(chunk))

        return await self._client_stream("UploadDataset", requests(), timeout)

    async def get_dataset(self, name: str, *, timeout: float | None = None) -> rpb.Dataset:
        return await self._unary("GetDataset", rpb.GetDatasetRequest(name=name), timeout)

    async def list_datasets(
        self,
        *,
        filter: str = "",
        order_by: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> rpb.ListDatasetsResponse:
        return await self._unary(
            "ListDatasets",
            rpb.ListDatasetsRequest(filter=filter, order_by=order_by, page_size=page_size, page_token=page_token),
            timeout,
        )

    def iter_datasets(
        self, *, filter: str = "", order_by: str = "", page_size: int = 0, limit: int = 0, timeout: float | None = None
    ) -> AsyncIterator[rpb.Dataset]:
        return follow_pages(
            lambda token: self.list_datasets(
                filter=filter, order_by=order_by, page_size=page_size, page_token=token, timeout=timeout
            ),
            "datasets",
            limit,
        )

    async def get_dataset_version(self, name: str, *, timeout: float | None = None) -> rpb.DatasetVersion:
        return await self._unary("GetDatasetVersion", rpb.GetDatasetVersionRequest(name=name), timeout)

    async def list_dataset_versions(
        self,
        *,
        parent: str,
        filter: str = "",
        order_by: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> rpb.ListDatasetVersionsResponse:
        return await self._unary(
            "ListDatasetVersions",
            rpb.ListDatasetVersionsRequest(
                parent=parent, filter=filter, order_by=order_by, page_size=page_size, page_token=page_token
            ),
            timeout,
        )

    def iter_dataset_versions(
        self,
        *,
        parent: str,
        filter: str = "",
        order_by: str = "",
        page_size: int = 0,
        limit: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[rpb.DatasetVersion]:
        return follow_pages(
            lambda token: self.list_dataset_versions(
                parent=parent, filter=filter, order_by=order_by, page_size=page_size, page_token=token, timeout=timeout
            ),
            "dataset_versions",
            limit,
        )

    async def delete_dataset_version(self, name: str, *, force: bool = False, timeout: float | None = None) -> None:
        await self._unary("DeleteDatasetVersion", rpb.DeleteDatasetVersionRequest(name=name, force=force), timeout)

    async def validate_dataset(
        self,
        name: str,
        *,
        model_version: str = "",
        max_length: int = 0,
        expected_format: str = "",
        timeout: float | None = None,
    ) -> rpb.ValidateDatasetResponse:
        """Validate a stored dataset version (token statistics with ``model_version``'s tokenizer)."""
        return await self._unary(
            "ValidateDataset",
            rpb.ValidateDatasetRequest(
                name=name, model_version=model_version, max_length=max_length, expected_format=expected_format
            ),
            timeout,
        )
