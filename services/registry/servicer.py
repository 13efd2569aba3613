"""RegistryService: proto <-> domain translation only (the domain runs in worker threads)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf import empty_pb2, json_format, struct_pb2

from modelyard.common.v1 import common_pb2 as cpb
from modelyard.registry.v1 import registry_pb2 as pb
from modelyard.registry.v1 import registry_pb2_grpc
from services.core import datasets as ds
from services.core.errors import InvalidArgument
from services.core.jobs.protos import events_to_proto, job_fields, timestamp

from .dataset_store import Datasets
from .domain import Registry
from .imports import Imports
from .records import (
    Dataset,
    DatasetVersion,
    EvaluationScore,
    FileInfo,
    Lineage,
    LineageGraph,
    Model,
    ModelFormat,
    ModelImport,
    ModelKind,
    ModelVersion,
)

_DIRECTIONS = {
    pb.LINEAGE_DIRECTION_UNSPECIFIED: "both",
    pb.LINEAGE_DIRECTION_BOTH: "both",
    pb.LINEAGE_DIRECTION_ANCESTORS: "ancestors",
    pb.LINEAGE_DIRECTION_DESCENDANTS: "descendants",
}


def _enum(enum_type: Any, prefix: str, value: str) -> Any:
    return enum_type.Value(f"{prefix}{value.upper()}")


def _kind_from_proto(value: int, field: str) -> ModelKind | None:
    if value == pb.MODEL_KIND_UNSPECIFIED:
        return None
    name = pb.ModelKind.Name(value) if value in pb.ModelKind.values() else None
    if name is None:
        raise InvalidArgument.for_field(field, f"unknown kind {value}")
    return ModelKind(name.removeprefix("MODEL_KIND_").lower())


def _format_from_proto(value: int, field: str) -> ModelFormat | None:
    if value == pb.MODEL_FORMAT_UNSPECIFIED:
        return None
    if value not in pb.ModelFormat.values():
        raise InvalidArgument.for_field(field, f"unknown format {value}")
    return ModelFormat(pb.ModelFormat.Name(value).removeprefix("MODEL_FORMAT_").lower())


def model_to_proto(m: Model) -> pb.Model:
    return pb.Model(name=m.name, description=m.description, labels=m.labels, version_count=m.version_count,
                    create_time=timestamp(m.create_time), update_time=timestamp(m.update_time))


def file_to_proto(f: FileInfo) -> pb.FileEntry:
    return pb.FileEntry(path=f.path, size_bytes=f.size, sha256=f.sha256)


def lineage_to_proto(lin: Lineage) -> pb.Lineage:
    params = struct_pb2.Struct()
    params.update(lin.parameters)
    return pb.Lineage(base_model_version=lin.base_model_version, dataset_versions=lin.dataset_versions,
                      job=lin.job, parameters=params, source_uri=lin.source_uri)


def lineage_from_proto(msg: pb.Lineage) -> Lineage:
    return Lineage(base_model_version=msg.base_model_version, dataset_versions=list(msg.dataset_versions),
                   job=msg.job, parameters=json_format.MessageToDict(msg.parameters), source_uri=msg.source_uri)


def score_to_proto(x: EvaluationScore) -> pb.EvaluationScore:
    return pb.EvaluationScore(evaluation=x.evaluation, benchmark=x.benchmark, metric=x.metric, value=x.value,
                              stderr=x.stderr, num_samples=x.num_samples,
                              create_time=timestamp(x.create_time))


def score_from_proto(msg: pb.EvaluationScore) -> EvaluationScore:
    return EvaluationScore(evaluation=msg.evaluation, benchmark=msg.benchmark, metric=msg.metric, value=msg.value,
                           stderr=msg.stderr, num_samples=msg.num_samples)


def _vision_to_proto(vision: Any) -> pb.VisionMetadata | None:
    """The stored vision metadata (absent in versions of text-only models and in rows written before it)."""
    if not isinstance(vision, dict):
        return None
    fields = pb.VisionMetadata.DESCRIPTOR.fields_by_name
    return pb.VisionMetadata(**{k: v for k, v in vision.items() if k in fields})


def version_to_proto(v: ModelVersion) -> pb.ModelVersion:
    meta = v.metadata
    return pb.ModelVersion(
        name=v.name, kind=_enum(pb.ModelKind, "MODEL_KIND_", v.kind.value),
        format=_enum(pb.ModelFormat, "MODEL_FORMAT_", v.format.value),
        state=_enum(pb.ModelVersionState, "MODEL_VERSION_STATE_", v.state.value),
        description=v.description, labels=v.labels, files=[file_to_proto(f) for f in v.files],
        metadata=pb.ModelMetadata(
            architecture=meta.get("architecture", ""), model_type=meta.get("model_type", ""),
            parameter_count=meta.get("parameter_count", 0), dtype=meta.get("dtype", ""),
            context_length=meta.get("context_length", 0), has_chat_template=meta.get("has_chat_template", False),
            total_size_bytes=v.total_size_bytes, task=meta.get("task", ""),
            embedding_dimensions=meta.get("embedding_dimensions", 0),
            vision=_vision_to_proto(meta.get("vision")),
        ),
        lineage=lineage_to_proto(v.lineage), deployed_by=v.deployed_by, artifact_prefix=v.artifact_prefix,
        create_time=timestamp(v.create_time), update_time=timestamp(v.update_time),
        scores=[score_to_proto(x) for x in v.scores],
    )


def import_to_proto(i: ModelImport) -> pb.ModelImport:
    return pb.ModelImport(**job_fields(i.job), source_uri=i.source_uri, model_version=i.model_version, stage=i.stage)


def dataset_to_proto(d: Dataset) -> pb.Dataset:
    return pb.Dataset(name=d.name, description=d.description, labels=d.labels, version_count=d.version_count,
                      create_time=timestamp(d.create_time))


def dataset_version_to_proto(v: DatasetVersion) -> pb.DatasetVersion:
    return pb.DatasetVersion(
        name=v.name, filename=v.filename, sha256=v.sha256, size_bytes=v.size_bytes, format=v.format,
        row_count=v.row_count, invalid_row_count=v.invalid_row_count, description=v.description, labels=v.labels,
        artifact_key=v.artifact_key, create_time=timestamp(v.create_time), image_count=v.image_count,
    )


def graph_to_proto(g: LineageGraph) -> pb.GetLineageResponse:
    return pb.GetLineageResponse(
        nodes=[pb.LineageNode(
            name=n.name, type=_enum(pb.LineageNodeType, "LINEAGE_NODE_TYPE_", n.type),
            kind=_enum(pb.ModelKind, "MODEL_KIND_", n.kind.value) if n.kind else pb.MODEL_KIND_UNSPECIFIED,
            job=n.job, deleted=n.deleted) for n in g.nodes],
        edges=[pb.LineageEdge(parent=e.parent, child=e.child,
                              relation=_enum(pb.LineageRelation, "LINEAGE_RELATION_", e.relation.value), job=e.job)
               for e in g.edges],
    )


def report_to_proto(r: ds.ValidationReport) -> pb.ValidateDatasetResponse:
    stats = None
    if r.token_stats is not None:
        t = r.token_stats
        stats = pb.TokenStats(rows=t.count, min_tokens=t.min, mean_tokens=t.mean, max_tokens=t.max,
                              rows_over_max_length=t.over_length, max_length=t.max_length or 0, images=t.images,
                              max_images_per_row=t.max_images_per_row, image_tokens=t.image_tokens)
    elif r.image_count:  # no model given: the image counts alone
        stats = pb.TokenStats(images=r.image_count, max_images_per_row=r.max_images_per_row)
    return pb.ValidateDatasetResponse(
        format=r.format.value if r.format else "", row_count=r.row_count, valid_row_count=r.valid_rows,
        token_stats=stats, errors=[pb.RowError(row=e.row, field=e.field, reason=e.reason) for e in r.errors],
    )


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(self, registry: Registry, imports: Imports, datasets: Datasets, *,
                 chunk_size: int = 1024 * 1024) -> None:
        self._registry = registry
        self._imports = imports
        self._datasets = datasets
        self._chunk_size = chunk_size

    # ------------------------------------------------------------------ models

    async def CreateModel(self, request, context):
        m = await asyncio.to_thread(self._registry.create_model, request.model_id, request.model.description,
                                    dict(request.model.labels))
        return model_to_proto(m)

    async def GetModel(self, request, context):
        return model_to_proto(await asyncio.to_thread(self._registry.get_model, request.name))

    async def ListModels(self, request, context):
        page = await asyncio.to_thread(self._registry.list_models, filter=request.filter, order_by=request.order_by,
                                       page_size=request.page_size, page_token=request.page_token)
        return pb.ListModelsResponse(models=[model_to_proto(m) for m in page.items],
                                     next_page_token=page.next_page_token, total_size=page.total_size)

    async def UpdateModel(self, request, context):
        m = await asyncio.to_thread(self._registry.update_model, request.model.name,
                                    description=request.model.description, labels=dict(request.model.labels),
                                    mask=list(request.update_mask.paths))
        return model_to_proto(m)

    async def DeleteModel(self, request, context):
        await asyncio.to_thread(self._registry.delete_model, request.name, force=request.force)
        return empty_pb2.Empty()

    # ------------------------------------------------------------------ versions

    async def CreateModelVersion(self, request, context):
        mv = request.model_version
        v = await asyncio.to_thread(
            self._registry.register_version, request.parent, version_id=request.version_id,
            kind=_kind_from_proto(mv.kind, "model_version.kind"),
            fmt=_format_from_proto(mv.format, "model_version.format"), artifact_prefix=mv.artifact_prefix,
            lineage=lineage_from_proto(mv.lineage), description=mv.description, labels=dict(mv.labels),
        )
        return version_to_proto(v)

    async def GetModelVersion(self, request, context):
        v = await asyncio.to_thread(self._registry.get_version, request.name)
        return version_to_proto(v)

    async def ListModelVersions(self, request, context):
        page = await asyncio.to_thread(self._registry.list_versions, request.parent, filter=request.filter,
                                       order_by=request.order_by, page_size=request.page_size,
                                       page_token=request.page_token)
        return pb.ListModelVersionsResponse(model_versions=[version_to_proto(v) for v in page.items],
                                            next_page_token=page.next_page_token, total_size=page.total_size)

    async def UpdateModelVersion(self, request, context):
        mv = request.model_version
        v = await asyncio.to_thread(self._registry.update_version, mv.name, description=mv.description,
                                    labels=dict(mv.labels), mask=list(request.update_mask.paths))
        return version_to_proto(v)

    async def DeleteModelVersion(self, request, context):
        await asyncio.to_thread(self._registry.delete_version, request.name, force=request.force)
        return empty_pb2.Empty()

    async def RegisterDerivedVersion(self, request, context):
        v = await asyncio.to_thread(
            self._registry.register_version, request.parent, version_id=request.version_id,
            kind=_kind_from_proto(request.kind, "kind"), fmt=_format_from_proto(request.format, "format"),
            artifact_prefix=request.artifact_prefix, lineage=lineage_from_proto(request.lineage),
            description=request.description, labels=dict(request.labels), derived=True,
        )
        return version_to_proto(v)

    async def SetDeploymentMarker(self, request, context):
        v = await asyncio.to_thread(self._registry.set_deployment_marker, request.name, request.deployment,
                                    request.deployed)
        return version_to_proto(v)

    async def RecordEvaluationScores(self, request, context):
        v = await asyncio.to_thread(self._registry.record_evaluation_scores, request.name, request.evaluation,
                                    [score_from_proto(x) for x in request.scores])
        return version_to_proto(v)

    async def GetLineage(self, request, context):
        if request.direction not in _DIRECTIONS:
            raise InvalidArgument.for_field("direction", f"unknown direction {request.direction}")
        graph = await asyncio.to_thread(self._registry.get_lineage, request.name,
                                        direction=_DIRECTIONS[request.direction], depth=request.depth)
        return graph_to_proto(graph)

    # ------------------------------------------------------------------ imports

    async def ImportModel(self, request, context):
        imp = await asyncio.to_thread(self._imports.start, request.parent, version_id=request.version_id,
                                      source_uri=request.source_uri, description=request.description,
                                      labels=dict(request.labels))
        return import_to_proto(imp)

    async def GetImport(self, request, context):
        imp = await asyncio.to_thread(self._imports.get, request.name)
        return import_to_proto(imp)

    async def ListImports(self, request, context):
        page = await asyncio.to_thread(self._imports.list, filter=request.filter, order_by=request.order_by,
                                       page_size=request.page_size, page_token=request.page_token)
        return pb.ListImportsResponse(model_imports=[import_to_proto(i) for i in page.items],
                                      next_page_token=page.next_page_token, total_size=page.total_size)

    async def WatchImport(self, request, context) -> AsyncIterator[cpb.JobEvent]:
        async for event in events_to_proto(self._imports.watch(request.name, request.after_sequence)):
            yield event

    async def CancelImport(self, request, context):
        return import_to_proto(await asyncio.to_thread(self._imports.cancel, request.name))

    # ------------------------------------------------------------------ downloads

    async def GetDownloadUrls(self, request, context):
        urls = await asyncio.to_thread(self._registry.download_urls, request.name, expires_s=request.expires_seconds,
                                       verify=request.verify_checksums)
        return pb.GetDownloadUrlsResponse(urls=[pb.DownloadUrl(file=file_to_proto(f), url=u) for f, u in urls])

    async def DownloadFile(self, request, context) -> AsyncIterator[pb.DownloadFileResponse]:
        entry, chunks = await asyncio.to_thread(self._registry.open_file, request.name, request.path, self._chunk_size)
        try:
            yield pb.DownloadFileResponse(file=file_to_proto(entry))
            while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
                yield pb.DownloadFileResponse(chunk=chunk)
        finally:
            chunks.close()

    # ------------------------------------------------------------------ datasets

    async def UploadDataset(self, request_iterator, context):
        upload = None
        try:
            async for message in request_iterator:
                which = message.WhichOneof("payload")
                if upload is None:
                    if which != "metadata":
                        raise InvalidArgument.for_field("metadata", "the first message must carry the upload metadata")
                    meta = message.metadata
                    upload = await asyncio.to_thread(
                        self._datasets.begin_upload, meta.parent, version_id=meta.version_id, filename=meta.filename,
                        expected_format=meta.expected_format, description=meta.description, labels=dict(meta.labels))
                elif which == "chunk":
                    upload.write(message.chunk)
                else:
                    raise InvalidArgument.for_field("metadata", "only the first message may carry metadata")
            if upload is None:
                raise InvalidArgument.for_field("metadata", "no messages: the first message must carry the metadata")
            version = await asyncio.to_thread(self._datasets.finish_upload, upload)
        except BaseException:
            if upload is not None:
                upload.discard()
            raise
        return dataset_version_to_proto(version)

    async def GetDataset(self, request, context):
        d = await asyncio.to_thread(self._datasets.get_dataset, request.name)
        return dataset_to_proto(d)

    async def ListDatasets(self, request, context):
        page = await asyncio.to_thread(self._datasets.list_datasets, filter=request.filter, order_by=request.order_by,
                                       page_size=request.page_size, page_token=request.page_token)
        return pb.ListDatasetsResponse(datasets=[dataset_to_proto(d) for d in page.items],
                                       next_page_token=page.next_page_token, total_size=page.total_size)

    async def GetDatasetVersion(self, request, context):
        v = await asyncio.to_thread(self._datasets.get_version, request.name)
        return dataset_version_to_proto(v)

    async def ListDatasetVersions(self, request, context):
        page = await asyncio.to_thread(self._datasets.list_versions, request.parent, filter=request.filter,
                                       order_by=request.order_by, page_size=request.page_size,
                                       page_token=request.page_token)
        return pb.ListDatasetVersionsResponse(dataset_versions=[dataset_version_to_proto(v) for v in page.items],
                                              next_page_token=page.next_page_token, total_size=page.total_size)

    async def DeleteDatasetVersion(self, request, context):
        await asyncio.to_thread(self._datasets.delete_version, request.name, force=request.force)
        return empty_pb2.Empty()

    async def ValidateDataset(self, request, context):
        report = await asyncio.to_thread(self._datasets.validate, request.name, model_version=request.model_version,
                                         max_length=request.max_length, expected_format=request.expected_format)
        return report_to_proto(report)
