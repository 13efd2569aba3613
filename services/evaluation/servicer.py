"""gRPC servicer of EvaluationService: proto <-> domain only."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf import duration_pb2

from modelyard.common.v1 import common_pb2 as cpb
from modelyard.evaluation.v1 import evaluation_pb2 as pb
from modelyard.evaluation.v1 import evaluation_pb2_grpc
from services.core.errors import error_to_domain
from services.core.jobs import JobRecord
from services.core.jobs.protos import events_to_proto, job_fields
from services.core.listing import Field, Schema, enum_value, int_value, memory_page, parse
from services.core.status import to_status_proto

from . import benchmarks as bm
from .compare import Comparison
from .domain import BenchmarkRunRequest, EvaluationRequest, Evaluations

KINDS = {
    "multiple_choice": pb.BENCHMARK_KIND_MULTIPLE_CHOICE,
    "generation": pb.BENCHMARK_KIND_GENERATION,
    "code": pb.BENCHMARK_KIND_CODE,
    "perplexity": pb.BENCHMARK_KIND_PERPLEXITY,
}

BENCHMARK_SCHEMA = Schema(
    fields={
        "name": Field(get=lambda b: b.name, sortable=True),
        "kind": Field(
            get=lambda b: b.kind,
            parse=enum_value("BENCHMARK_KIND_", choices=list(KINDS)),
            sortable=True,
        ),
        "source": Field(get=lambda b: b.source, sortable=True),
        "num_samples": Field(get=lambda b: b.num_samples, parse=int_value, sortable=True),
    },
    default_order="name",
    name=Field(get=lambda b: b.name),
)


def _generation(g: pb.GenerationConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
        if g.HasField(f):
            out[f] = getattr(g, f)
    if g.stop:
        out["stop"] = list(g.stop)
    return out


def request_from_proto(request: pb.CreateEvaluationRequest) -> EvaluationRequest:
    ev, spec = request.evaluation, request.evaluation.spec
    target = spec.WhichOneof("target")
    return EvaluationRequest(
        benchmarks=[
            BenchmarkRunRequest(
                benchmark=b.benchmark,
                options=dict(b.options),
                num_fewshot=b.num_fewshot if b.HasField("num_fewshot") else None,
                limit=b.limit,
                dataset_version=b.dataset_version,
            )
            for b in spec.benchmarks
        ],
        model_version=spec.model_version if target == "model_version" else "",
        deployment=spec.deployment if target == "deployment" else "",
        adapter=spec.adapter,
        endpoint_url=spec.endpoint.base_url if target == "endpoint" else "",
        endpoint_model=spec.endpoint.model if target == "endpoint" else "",
        endpoint_api_key=spec.endpoint.api_key if target == "endpoint" else "",
        limit=spec.limit,
        num_fewshot=spec.num_fewshot if spec.HasField("num_fewshot") else None,
        generation=_generation(spec.generation),
        batch_size=spec.batch_size,
        apply_chat_template=spec.apply_chat_template if spec.HasField("apply_chat_template") else None,
        engine=spec.engine,
        display_name=ev.display_name,
        evaluation_id=request.evaluation_id,
        labels=dict(ev.labels),
    )


def _spec_to_proto(s: dict[str, Any]) -> pb.EvaluationSpec:
    t = s["target"]
    g = s.get("generation") or {}
    spec = pb.EvaluationSpec(
        benchmarks=[
            pb.BenchmarkRun(
                benchmark=f"benchmarks/{b['name']}",
                options=b.get("options", {}),
                num_fewshot=b.get("num_fewshot"),
                limit=b.get("limit", 0),
                dataset_version=(b.get("dataset") or {}).get("name", ""),
            )
            for b in s["benchmarks"]
        ],
        limit=s.get("limit", 0),
        num_fewshot=s.get("num_fewshot"),
        generation=pb.GenerationConfig(
            max_tokens=g.get("max_tokens"),
            temperature=g.get("temperature"),
            top_p=g.get("top_p"),
            top_k=g.get("top_k"),
            stop=g.get("stop", []),
            seed=g.get("seed"),
        ),
        batch_size=s.get("batch_size", 0),
        apply_chat_template=s.get("apply_chat_template"),
    )
    if t["kind"] == "model_version":
        spec.model_version = t["model_version"]
        spec.engine = t.get("engine", "") if t.get("engine") != "auto" else ""
    elif t["kind"] == "deployment":
        spec.deployment = t["deployment"]
        spec.adapter = t.get("adapter", "")
    else:  # the key is input only
        spec.endpoint.CopyFrom(pb.OpenAIEndpoint(base_url=t["base_url"], model=t["model"]))
    return spec


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def _result(r: dict[str, Any]) -> pb.BenchmarkResult:
    msg = pb.BenchmarkResult(
        benchmark=f"benchmarks/{r['benchmark']}",
        metrics={k: float(v) for k, v in r.get("metrics", {}).items()},
        stderr={k: float(v) for k, v in r.get("stderr", {}).items() if v is not None and not math.isnan(v)},
        num_samples=r.get("num_samples", 0),
        predictions_artifact_key=r.get("predictions_artifact_key", ""),
        num_fewshot=r.get("num_fewshot", 0),
        samples_per_second=r.get("samples_per_second", 0.0),
    )
    if r.get("duration_s") is not None:
        msg.duration.CopyFrom(_duration(r["duration_s"]))
    if r.get("error"):
        msg.error.CopyFrom(to_status_proto(error_to_domain(r["error"])))
    return msg


def job_to_proto(job: JobRecord) -> pb.Evaluation:
    out = job.outputs or {}
    outputs = pb.EvaluationOutputs(
        results=[_result(r) for r in out.get("results", [])],
        report_artifact_key=out.get("report_artifact_key", ""),
        deployment=out.get("deployment", ""),
        temporary_deployment=bool(out.get("temporary_deployment")),
        model_version=out.get("model_version", ""),
    )
    labels = {k: v for k, v in (job.labels or {}).items() if k not in ("target", "model_version", "deployment")}
    return pb.Evaluation(
        **job_fields(job),
        outputs=outputs,
        display_name=job.spec.get("description", ""),
        spec=_spec_to_proto(job.spec),
        labels=labels,
    )


def benchmark_to_proto(info: bm.BenchmarkInfo) -> pb.Benchmark:
    return pb.Benchmark(
        name=f"benchmarks/{info.name}",
        display_name=info.display_name,
        description=info.description,
        kind=KINDS.get(info.kind, pb.BENCHMARK_KIND_UNSPECIFIED),
        metrics=list(info.metrics),
        options=dict(info.options),
        num_samples=info.num_samples,
        default_num_fewshot=info.default_num_fewshot,
        source=info.source,
    )


def comparison_to_proto(c: Comparison) -> pb.CompareEvaluationsResponse:
    def num(x: float) -> float | None:
        return None if x is None or math.isnan(x) else x

    rows = []
    for r in c.rows:
        rows.append(
            pb.MetricComparison(
                benchmark=f"benchmarks/{r.benchmark}",
                metric=r.metric,
                values=[
                    pb.MetricValue() if v is None else pb.MetricValue(value=v[0], stderr=num(v[1])) for v in r.values
                ],
                deltas=[
                    pb.MetricDelta(
                        evaluation=d.evaluation,
                        delta=d.delta,
                        ci_low=d.ci_low,
                        ci_high=d.ci_high,
                        paired_samples=d.paired_samples,
                    )
                    for d in r.deltas
                ],
            )
        )
    changed = [
        pb.ChangedSample(
            benchmark=f"benchmarks/{x.benchmark}",
            doc_id=x.doc_id,
            evaluation=x.evaluation,
            baseline_score=x.baseline_score,
            score=x.score,
            baseline_prediction=x.baseline_prediction,
            prediction=x.prediction,
            reference=x.reference,
        )
        for x in c.changed
    ]
    return pb.CompareEvaluationsResponse(evaluations=c.evaluations, rows=rows, changed_samples=changed)


class EvaluationServicer(evaluation_pb2_grpc.EvaluationServiceServicer):
    def __init__(self, evaluations: Evaluations, load_samples) -> None:
        self._evaluations = evaluations
        self._load_samples = load_samples

    async def CreateEvaluation(self, request, context):
        ev = job_to_proto(
            await self._evaluations.create(request_from_proto(request), validate_only=request.validate_only)
        )
        if request.validate_only:  # as it would be queued: nothing was stored
            ev.state = cpb.JOB_STATE_UNSPECIFIED
            ev.ClearField("create_time")
        return ev

    async def GetEvaluation(self, request, context):
        return job_to_proto(await self._evaluations.get(request.name))

    async def ListEvaluations(self, request, context):
        page = await self._evaluations.list(
            filter=request.filter, order_by=request.order_by, page_size=request.page_size, page_token=request.page_token
        )
        return pb.ListEvaluationsResponse(
            evaluations=[job_to_proto(j) for j in page.items], next_page_token=page.next_page_token
        )

    async def CancelEvaluation(self, request, context):
        return job_to_proto(await self._evaluations.cancel(request.name))

    async def WatchEvaluation(self, request, context) -> AsyncIterator[cpb.JobEvent]:
        async for event in events_to_proto(self._evaluations.watch(request.name, request.after_sequence)):
            yield event

    async def CompareEvaluations(self, request, context):
        comparison = await self._evaluations.compare(
            list(request.names), list(request.benchmarks), request.max_changed_samples, self._load_samples
        )
        return comparison_to_proto(comparison)

    async def ListBenchmarks(self, request, context):
        query = parse(
            BENCHMARK_SCHEMA,
            filter=request.filter,
            order_by=request.order_by,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        page = memory_page(bm.list_benchmarks(), query, BENCHMARK_SCHEMA)
        return pb.ListBenchmarksResponse(
            benchmarks=[benchmark_to_proto(b) for b in page.items], next_page_token=page.next_page_token
        )


__all__ = ["EvaluationServicer"]
