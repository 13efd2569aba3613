"""The ``pipeline`` job kind: ``services.pipeline.runner:run_pipeline``.

Runs the steps of a pipeline document in order, each through the public API of the service that owns it
(registry imports and uploads, training and merge jobs, quantization jobs, deployments, evaluations, chat).
Each step's state, resource and outputs are saved as the job's resume state the moment they change, so:

- a new attempt of the run (its worker or service died) re-attaches to the job of the step that was running,
  and never starts a finished step again;
- a retried run (RetryPipelineRun after a failure or a cancel) skips the steps that succeeded and starts the
  failed step anew, as a new resource (``{run}-{step}-{attempt}``).

The jobs of steps have names derived from the run and step ids, so a crash between "created" and "saved"
finds the job again (ALREADY_EXISTS -> attach) instead of starting a second one.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from modelyard.client import (
    AlreadyExists,
    EvaluationClient,
    InferenceClient,
    NotFound,
    QuantizationClient,
    RegistryClient,
    TrainingClient,
)
from modelyard.common.v1 import common_pb2 as cpb
from modelyard.evaluation.v1 import evaluation_pb2 as epb
from modelyard.inference.v1 import inference_pb2 as ipb
from modelyard.quantization.v1 import quantization_pb2 as qpb
from modelyard.training.v1 import training_pb2 as tpb
from services.core.errors import (
    Cancelled,
    DeadlineExceeded,
    DomainError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    error_dict,
)
from services.core.jobs.context import JobContext
from services.core.local_paths import LocalPathPolicy

from . import document as D
from .report import build_report

POLL_S = 0.5
DECODE_PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def run_pipeline(ctx: JobContext) -> dict[str, Any]:
    return asyncio.run(_Run(ctx).run())


def resource_id(*parts: str) -> str:
    """A resource id (``[a-z0-9-]``, at most 63) from the run, step and label; long ones end in a hash."""
    text = re.sub(r"[^a-z0-9-]+", "-", "-".join(p for p in parts if p).lower()).strip("-")
    if len(text) > 63:
        digest = hashlib.sha1(text.encode()).hexdigest()[:8]
        text = f"{text[:54].rstrip('-')}-{digest}"
    return text


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _job_error(job: Any) -> DomainError:
    state = cpb.JobState.Name(job.state).removeprefix("JOB_STATE_")
    if job.state == cpb.JOB_STATE_CANCELLED:
        return Cancelled(f"{job.name} was cancelled")
    return FailedPrecondition(
        f"{job.name} {state.lower()}: {job.error.message or 'no error message'}",
        reason="STEP_JOB_FAILED",
        metadata={"job": job.name},
    )


class _Run:
    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.spec = ctx.spec
        self.run_id = ctx.name.split("/", 1)[1]
        saved = ctx.resume_state() or {}
        self.steps: dict[str, dict[str, Any]] = saved.get("steps", {})
        self.report: dict[str, Any] | None = saved.get("report")
        self.current: str = ""
        self._cancel_current: Callable[[], Awaitable[Any]] | None = None
        self._task: asyncio.Task[dict[str, Any]] | None = None
        self._fraction_saved = 0.0

    # ------------------------------------------------------------------ state

    def _save(self) -> None:
        state = {"steps": self.steps, **({"report": self.report} if self.report else {})}
        self.ctx.save_resume_state(state)
        self.ctx.set_outputs(state)

    def _progress(self, fraction_of_current: float = 0.0) -> None:
        total = len(self.order)
        done = sum(1 for s in self.order if self.steps.get(s, {}).get("state") == "SUCCEEDED")
        current = fraction_of_current if self.current else 0.0
        self.ctx.progress(fraction=min(1.0, (done + current) / total), step=done, total_steps=total)

    def _relay(self, sid: str) -> Callable[[cpb.JobEvent], None]:
        """A child job's events -> this run's metrics (``{step}.{metric}``) and progress."""

        def on_event(event: cpb.JobEvent) -> None:
            kind = event.WhichOneof("payload")
            if kind != "metrics":
                return
            values = dict(event.metrics.values)
            if "progress_fraction" in values:
                self._step_fraction(sid, float(values["progress_fraction"]))
            named = {f"{sid}.{k}": float(v) for k, v in values.items() if k != "progress_fraction"}
            if named:
                self.ctx.metrics(step=int(event.metrics.step) or None, **named)

        return on_event

    def _step_fraction(self, sid: str, fraction: float) -> None:
        """The running step's own progress: in the run's progress at once, in its stored state once a second."""
        self.steps[sid]["fraction"] = fraction
        self._progress(fraction)
        now = time.monotonic()
        if now - self._fraction_saved >= 1.0:
            self._fraction_saved = now
            self._save()

    # ------------------------------------------------------------------ main

    async def run(self) -> dict[str, Any]:
        ctx = self.ctx
        ctx.cancelled()  # this job polls for cancel: SIGTERM sets the flag instead of interrupting
        doc = D.parse(self.spec["source"], self.spec.get("params") or {})
        self.order = [s.id for s in doc.steps]
        a = self.spec["addrs"]
        self.registry = RegistryClient(a["registry"], timeout=120)
        self.training = TrainingClient(a["training"], timeout=120)
        self.quantization = QuantizationClient(a["quantization"], timeout=120)
        self.evaluation = EvaluationClient(a["evaluation"], timeout=120)
        self.inference = InferenceClient(a["inference"], timeout=120)
        watcher = asyncio.create_task(self._watch_cancel())
        try:
            for raw in doc.raw_steps:
                sid = raw["id"]
                st = self.steps.setdefault(sid, {"state": "PENDING", "attempts": 0, "outputs": {}})
                if st["state"] == "SUCCEEDED":
                    continue
                if ctx.cancelled():
                    break
                attach = st["state"] == "RUNNING" and bool(st.get("resource"))
                if not attach:
                    st.update(attempts=st.get("attempts", 0) + 1, resource="", error=None, outputs={})
                st.update(state="RUNNING", start_time=st.get("start_time") if attach else _now(), fraction=0.0)
                st.pop("end_time", None)
                self.current = sid
                self._save()
                ctx.log(f"step {sid} {'re-attached' if attach else 'started'}", step=sid, step_state="RUNNING",
                        job=st.get("resource", ""), attempt=st["attempts"])  # fmt: skip
                self._progress()
                outputs = {k: v["outputs"] for k, v in self.steps.items() if v.get("state") == "SUCCEEDED"}
                try:
                    step = D.resolve(raw, outputs, doc.params)
                    result = await self._execute(step, st)
                except asyncio.CancelledError:
                    st.update(state="CANCELLED", end_time=_now())
                    self._save()
                    ctx.log(f"step {sid} cancelled", step=sid, step_state="CANCELLED", job=st.get("resource", ""))
                    break
                except DomainError as exc:
                    err = exc
                    st.update(state="FAILED", end_time=_now(), error=error_dict(err))
                    self._save()
                    ctx.log(f"step {sid} failed: {err.message}", step=sid, step_state="FAILED",
                            job=st.get("resource", ""))  # fmt: skip
                    raise FailedPrecondition(
                        f"step {sid} ({raw['type']}) failed: {err.message}",
                        reason="PIPELINE_STEP_FAILED",
                        metadata={"step": sid, "resource": st.get("resource", "")},
                    ) from None
                st.update(state="SUCCEEDED", end_time=_now(), outputs=result, fraction=1.0)
                self.current = ""
                if isinstance(step, D.EvalStep):
                    self.report = await build_report(self, step, result, self._step_times())
                self._save()
                ctx.log(f"step {sid} succeeded", step=sid, step_state="SUCCEEDED", job=st.get("resource", ""),
                        **{k: v for k, v in result.items() if k != "job" and isinstance(v, str | int | float)})  # fmt: skip
                self._progress()
            if self.report:
                self.report["step_times"] = self._step_times()
            self._save()
            return {"steps": self.steps, **({"report": self.report} if self.report else {})}
        finally:
            watcher.cancel()
            for client in (self.registry, self.training, self.quantization, self.evaluation, self.inference):
                await client.close()

    def _step_times(self) -> list[dict[str, Any]]:
        out = []
        for sid in self.order:
            st = self.steps.get(sid, {})
            if st.get("start_time") and st.get("end_time"):
                seconds = datetime.fromisoformat(st["end_time"]) - datetime.fromisoformat(st["start_time"])
                out.append({"step": sid, "seconds": round(seconds.total_seconds(), 1)})
        return out

    async def _watch_cancel(self) -> None:
        """On a cancel of the run: cancel the running step's job, then stop the step's task."""
        while not self.ctx.cancelled():
            await asyncio.sleep(POLL_S)
        self.ctx.log("cancel requested: stopping the running step", step=self.current)
        if self._cancel_current is not None:
            try:
                await self._cancel_current()
            except DomainError as exc:  # already finished: nothing to stop
                self.ctx.log("the step's job could not be cancelled", error=str(exc))
        if self._task is not None:
            self._task.cancel()

    async def _execute(self, step: D._Step, st: dict[str, Any]) -> dict[str, Any]:
        rid = resource_id(self.run_id, step.id, str(st["attempts"]) if st["attempts"] > 1 else "")
        handler = getattr(self, f"_step_{'train' if step.type in D.TRAIN_TYPES else step.type}")
        self._task = asyncio.create_task(handler(step, st, rid))
        try:
            return await self._task
        finally:
            self._task = None
            self._cancel_current = None

    def _started(self, st: dict[str, Any], resource: str, cancel: Callable[[], Awaitable[Any]] | None) -> None:
        st["resource"] = resource
        self._cancel_current = cancel
        self._save()

    # ------------------------------------------------------------------ steps

    async def _step_import(self, step: D.ImportStep, st: dict[str, Any], rid: str) -> dict[str, Any]:
        name = st.get("resource")
        if not name:
            source = _local(step.source, self.spec.get("working_dir", ""))
            started = await self.registry.import_model(
                parent=f"models/{step.model}", version_id=step.version, source_uri=source,
                description=step.description, labels={"pipeline_run": self.run_id, "pipeline_step": step.id},
            )  # fmt: skip
            name = started.name
        self._started(st, name, lambda: self.registry.cancel_import(name))
        done = await self.registry.wait_import(name, on_event=self._relay(step.id))
        if done.state != cpb.JOB_STATE_SUCCEEDED:
            raise _job_error(done)
        return {"model_version": done.model_version, "import": name}

    async def _step_model(self, step: D.ModelStep, st: dict[str, Any], rid: str) -> dict[str, Any]:
        version = await self.registry.get_model_version(D.versioned(step.version, "models"))
        st["resource"] = version.name
        return {"model_version": version.name}

    async def _step_dataset(self, step: D.DatasetStep, st: dict[str, Any], rid: str) -> dict[str, Any]:
        if step.version:
            version = await self.registry.get_dataset_version(D.versioned(step.version, "datasets"))
            st["resource"] = version.name
            return {"dataset_version": version.name}
        policy = LocalPathPolicy.from_dict(self.spec["local_policy"]) if "local_policy" in self.spec else None
        path = Path(_local(step.path, self.spec.get("working_dir", ""), policy, f"steps.{step.id}.path"))
        if not path.is_file():
            raise FailedPrecondition(f"{path} is not a readable file on the pipeline service's machine",
                                     reason="DATASET_FILE_NOT_FOUND", metadata={"path": str(path)})  # fmt: skip
        digest = await asyncio.to_thread(_sha256, path)
        parent = f"datasets/{step.dataset}"
        try:  # the same file uploaded by an earlier attempt: use that version
            page = await self.registry.list_dataset_versions(parent=parent, filter=f'sha256 = "{digest}"')
            if page.dataset_versions:
                st["resource"] = page.dataset_versions[0].name
                await self._check_rows(step, page.dataset_versions[0].name)
                return {"dataset_version": page.dataset_versions[0].name}
        except NotFound:
            pass
        version = await self.registry.upload_dataset(
            path, parent=parent, expected_format=step.format, description=step.description or f"{self.run_id}/{step.id}",
            labels={"pipeline_run": self.run_id, "pipeline_step": step.id},
        )  # fmt: skip
        st["resource"] = version.name
        await self._check_rows(step, version.name)
        return {"dataset_version": version.name}

    async def _check_rows(self, step: D.DatasetStep, name: str) -> None:
        """A version with invalid rows fails the step with its validation report (the version is kept)."""
        report = await self.registry.validate_dataset(name)
        if report.errors:
            first = report.errors[0]
            raise InvalidArgument(
                f"{name}: {len(report.errors)} invalid row(s) of {report.row_count}; first: row {first.row}"
                f"{' ' + first.field if first.field else ''}: {first.reason}",
                reason="DATASET_INVALID_ROWS",
                violations=[FieldViolation(f"steps.{step.id}.path.rows[{e.row}]" + (f".{e.field}" if e.field else ""),
                                           e.reason) for e in report.errors[:50]],
            )  # fmt: skip

    async def _step_train(self, step: D.TrainStep, st: dict[str, Any], rid: str) -> dict[str, Any]:
        name = st.get("resource") or f"trainingJobs/{rid}"
        if not st.get("resource"):
            job = tpb.TrainingJob(spec=D.training_spec(step), display_name=f"{self.run_id}: {step.id}")
            try:
                name = (await self.training.create_training_job(job, training_job_id=rid)).name
            except AlreadyExists:
                pass  # created by an attempt that died before saving it: attach
        return await self._follow_training(step, st, name)

    async def _follow_training(self, step: D._Step, st: dict[str, Any], name: str) -> dict[str, Any]:
        self._started(st, name, lambda: self.training.cancel_training_job(name))
        done = await self.training.wait_training_job(name, on_event=self._relay(step.id))
        if done.state != cpb.JOB_STATE_SUCCEEDED:
            raise _job_error(done)
        out = {"model_version": done.outputs.model_version, "job": name}
        if done.outputs.merged_model_version:
            out["merged_model_version"] = done.outputs.merged_model_version
        if step.type == "merge":
            out["model_version"] = done.outputs.merged_model_version or done.outputs.model_version
        return out

    async def _step_merge(self, step: D.MergeStep, st: dict[str, Any], rid: str) -> dict[str, Any]:
        name = st.get("resource") or f"trainingJobs/{rid}"
        if not st.get("resource"):
            try:
                resp = await self.training.merge_adapter(
                    adapter_version=D.versioned(step.adapter, "models"),
                    output_model=(f"models/{step.output_model}" if step.output_model and "/" not in step.output_model
                                  else step.output_model),
                    training_job_id=rid, display_name=f"{self.run_id}: {step.id}",
                )  # fmt: skip
                name = resp.training_job.name
            except AlreadyExists:
                pass
        return await self._follow_training(step, st, name)

    async def _step_quantize(self, step: D.QuantizeStep, st: dict[str, Any], rid: str) -> dict[str, Any]:
        name = st.get("resource") or f"quantizationJobs/{rid}"
        if not st.get("resource"):
            job = qpb.QuantizationJob(spec=D.quantization_spec(step), display_name=f"{self.run_id}: {step.id}")
            try:
                name = (await self.quantization.create_quantization_job(job, quantization_job_id=rid)).name
            except AlreadyExists:
                pass
        self._started(st, name, lambda: self.quantization.cancel_quantization_job(name))
        done = await self.quantization.wait_quantization_job(name, on_event=self._relay(step.id))
        if done.state != cpb.JOB_STATE_SUCCEEDED:
            raise _job_error(done)
        return {"model_version": done.outputs.model_version, "job": name}

    async def _step_deploy(self, step: D.DeployStep, st: dict[str, Any], rid: str) -> dict[str, Any]:
        dep_id = step.name or resource_id(self.run_id, step.id)
        name = f"deployments/{dep_id}"
        version = D.versioned(step.model, "models")
        self._started(st, name, None)
        try:
            old = await self.inference.get_deployment(name)
        except NotFound:
            old = None
        if old is not None and (old.model_version != version or old.state == ipb.DEPLOYMENT_STATE_FAILED):
            if not step.replace:
                raise FailedPrecondition(f"{name} already serves {old.model_version}; set replace: true",
                                         reason="DEPLOYMENT_EXISTS")  # fmt: skip
            await self._undeploy(name)
            old = None
        if old is None:
            dep = ipb.Deployment(
                model_version=version, engine=D.ENGINES[step.engine],
                options=ipb.EngineOptions(max_model_len=step.max_model_len, max_num_seqs=step.max_num_seqs,
                                          kv_cache_bytes=step.kv_cache_bytes),
                adapters=[ipb.Adapter(alias=a, model_version=D.versioned(v, "models")) for a, v in step.adapters.items()],
            )  # fmt: skip
            await self.inference.deploy(dep, deployment_id=dep_id)
        await self._wait_ready(name, step.timeout_s)
        return {"deployment": name, "model_version": version}

    async def _wait_ready(self, name: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            dep = await self.inference.get_deployment(name)
            if dep.state == ipb.DEPLOYMENT_STATE_READY:
                return
            if dep.state == ipb.DEPLOYMENT_STATE_FAILED:
                raise FailedPrecondition(f"{name} failed to start: {dep.error.message}", reason="DEPLOYMENT_FAILED")
            if time.monotonic() > deadline:
                raise DeadlineExceeded(f"{name} not READY after {timeout_s:g}s", reason="DEPLOYMENT_TIMEOUT")
            await asyncio.sleep(1.0)

    async def _undeploy(self, name: str) -> None:
        try:
            await self.inference.undeploy(name)
        except NotFound:
            return
        for _ in range(600):
            try:
                await self.inference.get_deployment(name)
            except NotFound:
                return
            await asyncio.sleep(0.5)

    async def _step_eval(self, step: D.EvalStep, st: dict[str, Any], rid: str) -> dict[str, Any]:
        """Each target: (a temporary deployment of a model version) -> evaluation -> decode speed."""
        self._started(st, "", None)  # the resource: the evaluation running now (set per target)
        rows: dict[str, Any] = st.setdefault("rows", {})
        labels = list(step.targets)
        for i, label in enumerate(labels):
            if rows.get(label, {}).get("done"):
                continue
            target = step.targets[label]
            row = rows.setdefault(label, {})
            temporary = ""
            if target.startswith("deployments/"):
                deployment = target
                row["model_version"] = (await self.inference.get_deployment(deployment)).model_version
            else:
                row["model_version"] = D.versioned(target, "models")
                temporary = f"deployments/{resource_id(rid, label)}"
                deployment = temporary
                await self._step_deploy(
                    D.DeployStep(id=step.id, type="deploy", model=row["model_version"], name=temporary.split("/")[1],
                                 engine=step.engine, max_model_len=step.max_model_len,
                                 kv_cache_bytes=step.kv_cache_bytes, timeout_s=step.timeout_s),
                    {}, rid,
                )  # fmt: skip
            try:
                row["evaluation"] = await self._evaluate(step, rid, label, deployment, (i, len(labels)))
                self._save()
                if step.decode is not None:
                    row["decode_tokens_per_second"] = await decode_speed(
                        self.inference, deployment, step.decode.requests, step.decode.max_tokens
                    )
            finally:
                if temporary:
                    await self._undeploy(temporary)
            row["done"] = True
            self._save()
        return {"evaluations": ",".join(rows[label]["evaluation"] for label in labels)}

    async def _evaluate(self, step: D.EvalStep, rid: str, label: str, deployment: str,
                        position: tuple[int, int]) -> str:  # fmt: skip
        eid = resource_id(rid, label)
        name = f"evaluations/{eid}"
        spec = epb.EvaluationSpec(
            benchmarks=[epb.BenchmarkRun(benchmark=f"benchmarks/{b.removeprefix('benchmarks/')}") for b in step.benchmarks],
            deployment=deployment, limit=step.limit, apply_chat_template=step.chat_template,
        )  # fmt: skip
        if step.num_fewshot is not None:
            spec.num_fewshot = step.num_fewshot
        ev = epb.Evaluation(spec=spec, display_name=f"{self.run_id}: {step.id} {label}",
                            labels={"pipeline_run": self.run_id, "pipeline_step": step.id, "row": label})  # fmt: skip
        try:
            existing = await self.evaluation.get_evaluation(name)
        except NotFound:
            existing = None
        if existing is None or existing.state in (cpb.JOB_STATE_FAILED, cpb.JOB_STATE_CANCELLED):
            if existing is not None:  # an earlier attempt's failed evaluation: a new one beside it
                eid = resource_id(rid, label, f"a{self.ctx.attempt}")
                name = f"evaluations/{eid}"
            await self.evaluation.create_evaluation(ev, evaluation_id=eid)
        self._started(self.steps[step.id], name, lambda: self.evaluation.cancel_evaluation(name))
        i, n = position

        def on_event(event: cpb.JobEvent) -> None:
            if event.WhichOneof("payload") == "metrics" and "progress_fraction" in event.metrics.values:
                self._step_fraction(step.id, (i + float(event.metrics.values["progress_fraction"])) / n)

        done = await self.evaluation.wait_evaluation(name, on_event=on_event)
        if done.state != cpb.JOB_STATE_SUCCEEDED:
            raise _job_error(done)
        return name

    async def _step_chat(self, step: D.ChatStep, st: dict[str, Any], rid: str) -> dict[str, Any]:
        self._started(st, step.deployment, None)
        messages = [ipb.ChatMessage(role=ipb.CHAT_ROLE_SYSTEM, content=step.system)] if step.system else []
        messages.append(ipb.ChatMessage(role=ipb.CHAT_ROLE_USER, content=step.prompt))
        text, tokens, first, last = "", 0, 0.0, 0.0
        async for chunk in self.inference.chat(
            deployment=step.deployment, adapter=step.adapter, messages=messages,
            sampling=ipb.SamplingParams(max_tokens=step.max_tokens, temperature=0.0),
        ):  # fmt: skip
            for c in chunk.choices:
                if c.content:
                    last = time.monotonic()
                    first = first or last
                    text += c.content
            if chunk.HasField("usage"):
                tokens = chunk.usage.completion_tokens
        self.ctx.log(f"step {step.id}: {text!r}", step=step.id)
        if step.expect and not re.search(step.expect, text, re.IGNORECASE):
            raise FailedPrecondition(f"the answer {text!r} does not match {step.expect!r}", reason="UNEXPECTED_ANSWER")
        rate = (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0
        return {"text": text, "decode_tokens_per_second": round(rate, 2)}


async def decode_speed(inference: InferenceClient, deployment: str, requests: int, max_tokens: int) -> float:
    """Decode tokens/s of one stream, the best of ``requests`` greedy runs: the tokens after the first over
    the time from the first chunk of text to the last. An engine may merge a short answer's tokens into one
    chunk (paced under load); then it is all tokens over the whole call, prefill included (a lower bound)."""
    best = 0.0
    for _ in range(requests):
        tokens, chunks, first, last = 0, 0, 0.0, 0.0
        start = time.monotonic()
        async for chunk in inference.chat(
            deployment=deployment,
            messages=[ipb.ChatMessage(role=ipb.CHAT_ROLE_USER, content=DECODE_PROMPT)],
            sampling=ipb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
        ):
            if any(c.content for c in chunk.choices):
                chunks += 1
                last = time.monotonic()
                first = first or last
            if chunk.HasField("usage"):
                tokens = chunk.usage.completion_tokens
        end = time.monotonic()
        if tokens > 1 and chunks > 1 and last > first:
            best = max(best, (tokens - 1) / (last - first))
        elif tokens > 0 and end > start:
            best = max(best, tokens / (end - start))
    return round(best, 2)


def _local(path: str, working_dir: str, policy: LocalPathPolicy | None = None, field: str = "") -> str:
    """A document's path made absolute (relative to the run's working_dir); with ``policy``, a path this process
    reads: refused unless its real path is a readable file or folder under the allowed roots (runs created before
    the roots existed carry no policy). Import sources are checked by the registry, which reads them."""
    if "://" in path:
        return path
    if not Path(path).is_absolute():
        if not working_dir:
            raise FailedPrecondition(f"{path!r} is relative and the run has no working_dir", reason="RELATIVE_PATH")
        path = str(Path(working_dir) / path)
    if policy is None:
        return path
    policy.resolve(path, field=field, what="a file or folder")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
