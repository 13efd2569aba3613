"""Evaluations as a resource: preflight then queue (create), get, list, cancel, watch, compare.

Evaluations live in the shared job runtime (``JobStore``, kind ``evaluate``); names are
``evaluations/{id}``. Preflight checks everything that can be checked before a worker is involved: every
benchmark resolves with its options (or its custom set is a READY registry dataset of an evaluation
format), the target exists (a READY model version, a deployment with that adapter, or an endpoint URL),
and the numbers are in range. A custom set with images (``image_count`` > 0, or stored as an archive) needs
a vision-language target: a model version or deployment of a text-only model is refused here, before
anything runs (an endpoint cannot be asked, and is tried). The stored spec carries what the job child
needs, never a credential of the service (S3 keys reach the child through its environment).
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlparse

from modelyard.inference.v1 import inference_pb2 as ipb
from services.core.errors import DomainError, FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from services.core.image_datasets import is_archive
from services.core.jobs import JobRecord, JobStore
from services.core.jobs.resource import JobResource
from services.core.jobs.store import job_schema, jobs
from services.core.listing import EQUALITY, Field
from services.core.logging import get_logger
from services.core.registry_refs import RegistryReader, naming, ready_model_version
from services.core.settings import S3Settings

from . import benchmarks as bm
from .compare import Comparison, compare_records

log = get_logger(__name__)

COLLECTION = "evaluations"
KIND_EVALUATE = "evaluate"
JOB_KINDS = {KIND_EVALUATE: "services.evaluation.job:run_evaluation"}
JOB_ID_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
VERSION_RE = re.compile(r"^models/[^/]+/versions/[^/]+$")
DATASET_VERSION_RE = re.compile(r"^datasets/[^/]+/versions/[^/]+$")
DEPLOYMENT_RE = re.compile(r"^deployments/[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
EVAL_FORMATS = ("multiple_choice", "qa")
# model_type of vision-language models, for a version whose registry metadata predates ``vision``.
VISION_MODEL_TYPES = frozenset({
    "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "llava_next", "llava_onevision", "idefics2", "idefics3",
    "smolvlm", "paligemma", "gemma3", "mllama", "pixtral", "mistral3", "internvl", "phi3_v", "phi4_multimodal",
})  # fmt: skip
MAX_CONCURRENCY = 64

# ListEvaluations: the shared job fields plus the target and what each evaluation ran.
JOB_SCHEMA = job_schema(
    {
        "model_version": Field(
            jobs.c.labels["model_version"].as_string(), lambda j: j.labels.get("model_version"), ops=EQUALITY
        ),
        "deployment": Field(
            jobs.c.labels["deployment"].as_string(), lambda j: j.labels.get("deployment"), ops=EQUALITY
        ),
        "target": Field(jobs.c.labels["target"].as_string(), lambda j: j.labels.get("target"), ops=EQUALITY),
    }
)


class InferenceReader(Protocol):
    """The inference calls preflight makes (``modelyard.client.InferenceClient``)."""

    async def get_deployment(self, name: str, *, timeout: float | None = None) -> ipb.Deployment: ...


@dataclass(frozen=True)
class BenchmarkRunRequest:
    benchmark: str = ""
    options: dict[str, str] = field(default_factory=dict)
    num_fewshot: int | None = None
    limit: int = 0
    dataset_version: str = ""


@dataclass(frozen=True)
class EvaluationRequest:
    """CreateEvaluation as the domain sees it."""

    benchmarks: Sequence[BenchmarkRunRequest]
    model_version: str = ""
    deployment: str = ""
    adapter: str = ""
    endpoint_url: str = ""
    endpoint_model: str = ""
    endpoint_api_key: str = ""
    limit: int = 0
    num_fewshot: int | None = None
    generation: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 0
    apply_chat_template: bool | None = None
    engine: str = ""
    display_name: str = ""
    evaluation_id: str = ""
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PreflightOptions:
    s3: S3Settings
    registry_addr: str
    inference_addr: str
    deploy_engine: str = "auto"
    deploy_timeout_s: float = 900.0
    deploy_options: dict[str, int] = field(default_factory=dict)
    default_concurrency: int = 8
    data: dict[str, Any] = field(default_factory=dict)  # DataSource fields for the child
    sandbox: dict[str, Any] = field(default_factory=dict)


def bare_benchmark(name: str) -> str:
    return name.strip().removeprefix("benchmarks/")


class Preflight:
    def __init__(self, registry: RegistryReader, inference: InferenceReader, options: PreflightOptions) -> None:
        self.registry = registry
        self.inference = inference
        self.options = options

    async def check(self, req: EvaluationRequest) -> dict[str, Any]:
        if req.evaluation_id and not JOB_ID_RE.match(req.evaluation_id):
            raise InvalidArgument.for_field(
                "evaluation_id", "lowercase letters, digits and hyphens, 1-63 characters, not starting/ending with -"
            )
        self._numbers(req)
        target = await self._target(req)
        runs = [await self._benchmark(i, run, target) for i, run in enumerate(req.benchmarks)]
        if not runs:
            raise InvalidArgument.for_field("spec.benchmarks", "at least one benchmark is required")
        names = [r["name"] for r in runs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise InvalidArgument.for_field("spec.benchmarks", f"benchmark listed twice: {', '.join(dupes)}")
        with_images = [i for i, r in enumerate(runs) if (r.get("dataset") or {}).get("images")]
        if with_images:
            target["vision"] = await self._vision(target)
            if target["vision"] is False:
                i = with_images[0]
                model = target.get("model_version", "")
                if target["kind"] == "deployment":
                    model = f"{target['deployment']} ({model})" if model else target["deployment"]
                fld = f"spec.benchmarks[{i}].dataset_version"
                raise FailedPrecondition(
                    f"{fld}: {runs[i]['dataset']['name']} has rows with images, but {model} is a text-only model "
                    "(its config has no vision tower); evaluate a vision-language model on it",
                    reason="MODEL_NOT_VISION",
                    violations=[FieldViolation(fld, f"has images; {model} is text-only")],
                )
        o = self.options
        return {
            "target": target,
            "benchmarks": runs,
            "limit": req.limit,
            "num_fewshot": req.num_fewshot,
            "generation": req.generation,
            "concurrency": req.batch_size or o.default_concurrency,
            "batch_size": req.batch_size,
            "apply_chat_template": req.apply_chat_template,
            "description": req.display_name,
            "registry_addr": o.registry_addr,
            "inference_addr": o.inference_addr,
            "deploy_timeout_s": o.deploy_timeout_s,
            "deploy_options": o.deploy_options,
            "data": o.data,
            "sandbox": o.sandbox,
            "s3": {"endpoint": o.s3.endpoint, "bucket": o.s3.bucket, "secure": o.s3.secure},
        }

    def _numbers(self, req: EvaluationRequest) -> None:
        if req.limit < 0:
            raise InvalidArgument.for_field("spec.limit", f"must be >= 0, got {req.limit}")
        if req.num_fewshot is not None and not 0 <= req.num_fewshot <= 25:
            raise InvalidArgument.for_field("spec.num_fewshot", f"must be within [0, 25], got {req.num_fewshot}")
        if not 0 <= req.batch_size <= MAX_CONCURRENCY:
            raise InvalidArgument.for_field("spec.batch_size", f"must be within [0, {MAX_CONCURRENCY}]")
        g = req.generation
        if g.get("max_tokens") is not None and not 1 <= g["max_tokens"] <= 32768:
            raise InvalidArgument.for_field("spec.generation.max_tokens", "must be within [1, 32768]")
        if g.get("temperature") is not None and not 0.0 <= g["temperature"] <= 2.0:
            raise InvalidArgument.for_field("spec.generation.temperature", "must be within [0, 2]")
        if g.get("top_p") is not None and not 0.0 < g["top_p"] <= 1.0:
            raise InvalidArgument.for_field("spec.generation.top_p", "must be within (0, 1]")
        if req.engine and req.engine not in ("vllm", "transformers"):
            raise InvalidArgument.for_field("spec.engine", f"unknown engine {req.engine!r}; vllm or transformers")
        bad_labels = [k for k in req.labels if not re.match(r"^[a-z][a-z0-9_.-]{0,62}$", k)]
        if bad_labels:
            raise InvalidArgument.for_field("labels", f"bad label key {bad_labels[0]!r}")

    async def _target(self, req: EvaluationRequest) -> dict[str, Any]:
        given = [k for k, v in (("model_version", req.model_version), ("deployment", req.deployment),
                                ("endpoint", req.endpoint_url)) if v]  # fmt: skip
        if len(given) != 1:
            raise InvalidArgument.for_field(
                "spec.target",
                "exactly one of model_version, deployment, endpoint is required"
                + (f" (got {', '.join(given)})" if given else ""),
            )
        if req.adapter and not req.deployment:
            raise InvalidArgument.for_field("spec.adapter", "only with a deployment target")
        if req.model_version:
            if not VERSION_RE.match(req.model_version):
                raise InvalidArgument.for_field(
                    "spec.model_version", f"{req.model_version!r} must look like models/{{model}}/versions/{{version}}"
                )
            version = await ready_model_version(self.registry, req.model_version, "spec.model_version")
            base = ""
            if version.kind == "adapter":
                base = version.base_model_version
                if not base:
                    raise FailedPrecondition(
                        f"spec.model_version: adapter {version.name} has no base model version in its lineage",
                        reason="ADAPTER_WITHOUT_BASE",
                    )
                await ready_model_version(self.registry, base, "spec.model_version (its base)")
            engine = req.engine or self.options.deploy_engine
            return {"kind": "model_version", "model_version": version.name, "adapter_of": base,
                    "engine": engine, "version_kind": version.kind}  # fmt: skip
        if req.deployment:
            name = req.deployment if req.deployment.startswith("deployments/") else f"deployments/{req.deployment}"
            if not DEPLOYMENT_RE.match(name):
                raise InvalidArgument.for_field(
                    "spec.deployment", f"{req.deployment!r} must look like deployments/{{id}}"
                )
            try:
                dep = await self.inference.get_deployment(name, timeout=30)
            except DomainError as err:
                raise naming(err, "spec.deployment") from None
            aliases = [a.alias for a in dep.adapters]
            model_version = dep.model_version
            if req.adapter:
                if req.adapter not in aliases:
                    raise InvalidArgument.for_field(
                        "spec.adapter",
                        f"deployment {name} has no adapter {req.adapter!r} (adapters: {', '.join(aliases) or 'none'})",
                    )
                model_version = next(a.model_version for a in dep.adapters if a.alias == req.adapter)
            return {"kind": "deployment", "deployment": name, "adapter": req.adapter, "model_version": model_version}
        url = urlparse(req.endpoint_url)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise InvalidArgument.for_field(
                "spec.endpoint.base_url", f"{req.endpoint_url!r} must be an http(s) URL like http://host:8000/v1"
            )
        if not req.endpoint_model:
            raise InvalidArgument.for_field("spec.endpoint.model", "is required (the `model` sent with each request)")
        return {
            "kind": "endpoint",
            "base_url": req.endpoint_url.rstrip("/"),
            "model": req.endpoint_model,
            "api_key": req.endpoint_api_key,
        }

    async def _vision(self, target: dict[str, Any]) -> bool | None:
        """Whether the target's model is a vision-language model: its registry metadata (an adapter: its
        base's); None when it cannot be known (an endpoint, a version gone from the registry)."""
        if target["kind"] == "endpoint":
            return None
        name = target.get("adapter_of") or target.get("model_version") or ""
        if target["kind"] == "deployment":
            try:  # the deployed base carries the vision tower, also for an adapter's alias
                name = (await self.inference.get_deployment(target["deployment"], timeout=30)).model_version
            except DomainError:
                return None
        if not name:
            return None
        try:
            version = await self.registry.get_model_version(name)
            if version.lineage.base_model_version and not version.metadata.model_type:
                version = await self.registry.get_model_version(version.lineage.base_model_version)
        except NotFound:
            return None
        meta = version.metadata
        return meta.HasField("vision") or meta.model_type in VISION_MODEL_TYPES

    async def _benchmark(self, i: int, run: BenchmarkRunRequest, target: dict[str, Any]) -> dict[str, Any]:
        fld = f"spec.benchmarks[{i}]"
        if run.limit < 0:
            raise InvalidArgument.for_field(f"{fld}.limit", f"must be >= 0, got {run.limit}")
        if run.num_fewshot is not None and not 0 <= run.num_fewshot <= 25:
            raise InvalidArgument.for_field(f"{fld}.num_fewshot", "must be within [0, 25]")
        if run.dataset_version:
            return await self._custom(fld, run)
        if not run.benchmark:
            raise InvalidArgument.for_field(f"{fld}.benchmark", "is required (or dataset_version for a custom set)")
        name = bare_benchmark(run.benchmark)
        bench = bm.resolve(name, dict(run.options), field=f"{fld}.benchmark")
        info = bench.info
        return {
            "name": info.name,
            "options": dict(run.options),
            "num_fewshot": run.num_fewshot,
            "limit": run.limit,
            "kind": info.kind,
        }

    async def _custom(self, fld: str, run: BenchmarkRunRequest) -> dict[str, Any]:
        if not DATASET_VERSION_RE.match(run.dataset_version):
            raise InvalidArgument.for_field(
                f"{fld}.dataset_version", f"{run.dataset_version!r} must look like datasets/{{dataset}}/versions/{{v}}"
            )
        try:
            d = await self.registry.get_dataset_version(run.dataset_version)
        except DomainError as err:
            raise naming(err, f"{fld}.dataset_version") from None
        fmt = _dataset_format(d)
        if fmt not in EVAL_FORMATS:
            raise FailedPrecondition(
                f"{fld}.dataset_version: {d.name} is a {fmt or 'unknown'}-format dataset; an evaluation set has rows "
                '{"question", "choices", "answer"} (multiple_choice) or {"prompt", "reference"} (qa)',
                reason="NOT_AN_EVALUATION_SET",
                violations=[FieldViolation(f"{fld}.dataset_version", f"format {fmt}")],
            )
        dataset_id = d.name.split("/")[1]
        name = bare_benchmark(run.benchmark) if run.benchmark else f"custom:{dataset_id}"
        return {
            "name": name,
            "options": dict(run.options),
            "num_fewshot": run.num_fewshot,
            "limit": run.limit,
            "kind": "multiple_choice" if fmt == "multiple_choice" else "generation",
            "dataset": {
                "name": d.name,
                "key": d.artifact_key,
                "sha256": d.sha256,
                "format": fmt,
                "rows": d.row_count,
                # An archive holds images even where the registry does not count them (``image_count`` 0).
                "images": int(d.image_count) or is_archive(d.filename or d.artifact_key),
            },
        }


def _dataset_format(d: Any) -> str:
    return str(d.format or "").lower()


class Evaluations(JobResource):
    """The evaluation service's domain: preflight then queue; reads are ``JobResource``'s; compare."""

    def __init__(self, store: JobStore, preflight: Preflight, *, max_attempts: int = 3) -> None:
        super().__init__(
            store, collection=COLLECTION, kinds=list(JOB_KINDS), schema=JOB_SCHEMA, max_attempts=max_attempts
        )
        self.preflight = preflight

    async def create(self, req: EvaluationRequest, *, validate_only: bool = False) -> JobRecord:
        spec = await self.preflight.check(req)
        target = spec["target"]
        labels = dict(req.labels)
        labels["target"] = target["kind"]
        if target.get("model_version"):
            labels["model_version"] = target["model_version"]
        if target.get("deployment"):
            labels["deployment"] = target["deployment"]
        name = f"{COLLECTION}/{req.evaluation_id or _new_id()}"
        if validate_only:
            return self.preview(KIND_EVALUATE, name if req.evaluation_id else "", spec, labels)
        job = await asyncio.to_thread(self.store.create, KIND_EVALUATE, spec, name, self.max_attempts, labels)
        log.info("evaluation_created", evaluation=name, target=target["kind"],
                 benchmarks=[b["name"] for b in spec["benchmarks"]])  # fmt: skip
        return job

    async def compare(
        self, names: Sequence[str], benchmarks: Sequence[str], max_changed: int, load_samples
    ) -> Comparison:
        if len(names) < 2:
            raise InvalidArgument.for_field("names", "at least two evaluations are needed")
        if len(set(names)) != len(names):
            raise InvalidArgument.for_field("names", "an evaluation is listed twice")
        if max_changed < 0:
            raise InvalidArgument.for_field("max_changed_samples", "must be >= 0")
        records = []
        for i, name in enumerate(names):
            self.job_id(name, f"names[{i}]")
            job = await asyncio.to_thread(self.store.get, name)
            records.append(job)
        wanted = [bare_benchmark(b) for b in benchmarks]
        return await compare_records(records, wanted, max_changed or 20, load_samples)


def _new_id() -> str:
    return f"eval-{uuid.uuid4().hex[:10]}"


def temporary_deployment_id(evaluation_name: str) -> str:
    """The id of the deployment an evaluation of a model version creates (the same on every attempt, so a
    retried attempt or the service's sweep finds one that an attempt left behind)."""
    import hashlib

    jid = evaluation_name.rsplit("/", 1)[-1]
    if len(jid) <= 60:
        return f"ev-{jid}"
    return f"ev-{jid[:50]}-{hashlib.sha1(jid.encode()).hexdigest()[:8]}"
