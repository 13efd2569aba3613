"""Proto resources as the console's JSON: field names as in the protos, enums by name, int64 as numbers,
timestamps as RFC 3339 strings; plus the few shapes the pages need (job summaries, lineage graphs,
job events)."""

from __future__ import annotations

import math
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2  # noqa: F401 - registers ErrorInfo / BadRequest for the error details

from modelyard.common.v1 import common_pb2 as cpb
from modelyard.registry.v1 import registry_pb2 as rpb

TERMINAL = frozenset({cpb.JOB_STATE_SUCCEEDED, cpb.JOB_STATE_FAILED, cpb.JOB_STATE_CANCELLED})

# Job collections (the first part of a job's resource name) -> the kind the console calls them.
COLLECTIONS = {
    "trainingJobs": "training",
    "quantizationJobs": "quantization",
    "evaluations": "evaluation",
    "imports": "import",
    "pipelineRuns": "pipeline",
}


def to_json(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(
        message,
        always_print_fields_with_no_presence=True,
        preserving_proto_field_name=True,
        unquote_int64_if_possible=True,
    )


def _number(value: float) -> float | None:
    return value if math.isfinite(value) else None


def job_state(value: int) -> str:
    """``JOB_STATE_RUNNING`` -> ``RUNNING``."""
    return cpb.JobState.Name(value).removeprefix("JOB_STATE_")


def _time(message: Message, field: str) -> str | None:
    return getattr(message, field).ToJsonString() if message.HasField(field) else None


def _enum(message: Message, field: str, prefix: str) -> str:
    descriptor = message.DESCRIPTOR.fields_by_name[field].enum_type
    return descriptor.values_by_number[getattr(message, field)].name.removeprefix(prefix)


def job_summary(kind: str, job: Any) -> dict[str, Any]:
    """One row of the jobs list, whatever service the job belongs to."""
    detail, output = "", ""
    if kind == "training":
        spec = job.spec
        method = _enum(spec, "method", "TRAINING_METHOD_").lower()
        detail = f"{method} of {spec.base_model_version}" if method != "unspecified" else spec.base_model_version
        if spec.dataset_versions:
            detail += f" on {', '.join(spec.dataset_versions)}"
        output = job.outputs.model_version
    elif kind == "quantization":
        detail = f"{_enum(job.spec, 'method', 'QUANTIZATION_METHOD_').lower()} of {job.spec.source_model_version}"
        output = job.outputs.model_version
    elif kind == "evaluation":
        target = job.spec.WhichOneof("target")
        if target == "endpoint":
            value = f"{job.spec.endpoint.base_url} ({job.spec.endpoint.model})"
        else:
            value = getattr(job.spec, target) if target else ""
        benchmarks = ", ".join(b.benchmark.removeprefix("benchmarks/") for b in job.spec.benchmarks)
        detail = f"{benchmarks} on {value}" + (f":{job.spec.adapter}" if job.spec.adapter else "")
        output = job.outputs.model_version
    elif kind == "import":
        detail = job.source_uri
        output = job.model_version
    elif kind == "pipeline":
        done = sum(1 for s in job.steps if _enum(s, "state", "STEP_STATE_") == "SUCCEEDED")
        detail = f"{done}/{len(job.steps)} steps"
        running = [s.id for s in job.steps if _enum(s, "state", "STEP_STATE_") == "RUNNING"]
        if running:
            detail += f", running {', '.join(running)}"
    return {
        "name": job.name,
        "kind": kind,
        "state": job_state(job.state),
        "display_name": getattr(job, "display_name", "") or getattr(job, "stage", ""),
        "fraction": _number(job.progress.fraction),
        "step": job.progress.step,
        "total_steps": job.progress.total_steps,
        "create_time": _time(job, "create_time"),
        "start_time": _time(job, "start_time"),
        "end_time": _time(job, "end_time"),
        "detail": detail,
        "output": output,
        "error": job.error.message if job.HasField("error") else "",
    }


def event_json(event: cpb.JobEvent) -> dict[str, Any]:
    """A job event for the page's live view: a log line, metrics at a step, or a state change."""
    out: dict[str, Any] = {"sequence": event.sequence, "time": _time(event, "time")}
    payload = event.WhichOneof("payload")
    if payload == "metrics":
        values = {k: _number(v) for k, v in event.metrics.values.items()}
        out["metrics"] = {"step": event.metrics.step, "values": values}
    elif payload == "log":
        out["log"] = event.log.line
    elif payload == "state_change":
        change = event.state_change
        out["state_change"] = {
            "previous": job_state(change.previous_state),
            "state": job_state(change.state),
            "error": change.error.message if change.HasField("error") else "",
        }
    return out


def _short(name: str) -> str:
    """``models/tiny/versions/base`` -> ``tiny/base``; ``datasets/shout/versions/v1`` -> ``shout/v1``."""
    parts = name.split("/")
    if len(parts) == 4 and parts[2] == "versions":
        return f"{parts[1]}/{parts[3]}"
    return name


def lineage_graph(response: rpb.GetLineageResponse, focus: str) -> dict[str, Any]:
    """The registry's lineage as a graph to draw: model and dataset versions, and the job that made each
    child as a node of its own between its inputs and its output (base -> job -> adapter)."""
    nodes: dict[str, dict[str, Any]] = {}
    for n in response.nodes:
        is_dataset = n.type == rpb.LINEAGE_NODE_TYPE_DATASET_VERSION
        nodes[n.name] = {
            "id": n.name,
            "label": _short(n.name),
            "type": "dataset" if is_dataset else "model",
            "kind": "" if is_dataset else _enum(n, "kind", "MODEL_KIND_").lower(),
            "deleted": n.deleted,
            "focus": n.name == focus,
        }
    edges: list[dict[str, str]] = []
    seen: set[tuple[str, str]] = set()

    def add(parent: str, child: str, relation: str) -> None:
        if (parent, child) not in seen:
            seen.add((parent, child))
            edges.append({"from": parent, "to": child, "relation": relation})

    for e in response.edges:
        relation = _enum(e, "relation", "LINEAGE_RELATION_").lower()
        if e.job:
            nodes.setdefault(
                e.job,
                {"id": e.job, "label": e.job, "type": "job", "kind": COLLECTIONS.get(e.job.split("/")[0], "")},
            )
            nodes[e.job].update(deleted=False, focus=False)
            add(e.parent, e.job, relation)
            add(e.job, e.child, "output")
        else:
            add(e.parent, e.child, relation)
    for edge in edges:  # an edge to a node the registry did not list (depth limit): still drawn
        for end in (edge["from"], edge["to"]):
            nodes.setdefault(
                end, {"id": end, "label": _short(end), "type": "model", "kind": "", "deleted": False, "focus": False}
            )
    return {"nodes": list(nodes.values()), "edges": edges}
