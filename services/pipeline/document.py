"""The pipeline document: parsed, checked and resolved before anything runs.

A document (YAML or JSON)::

    name: smollm2-boolean
    params: {model_dir: null, steps: 60}     # null: required; ${params.NAME} anywhere in a string
    steps:
      - {id: base, type: import, source: "${params.model_dir}", model: smollm2}
      - {id: sft, type: sft, model: "${steps.base.model_version}", datasets: [...], hyperparameters: {...}}

Every problem is reported at once as field violations named after the step (``steps.sft.hyperparameters.lr``),
never as a stack trace. A reference names an earlier step and one of the outputs its type produces; a value that
is exactly one reference keeps the referenced value's type, references inside longer strings are interpolated.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml
from google.protobuf import json_format
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from modelyard.client.training import full_enum_names
from modelyard.inference.v1 import inference_pb2 as ipb
from modelyard.quantization.v1 import quantization_pb2 as qpb
from modelyard.training.v1 import training_pb2 as tpb
from services.core.errors import FieldViolation, InvalidArgument

MAX_SOURCE_BYTES = 256 * 1024
MAX_STEPS = 64
STEP_ID_RE = re.compile(r"^[a-z][a-z0-9-]{0,23}$")
PARAM_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
REF_RE = re.compile(r"\$\{\s*([a-z]+)\.([A-Za-z0-9_-]+)(?:\.([A-Za-z0-9_]+))?\s*\}")
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")

TRAIN_TYPES = ("sft", "dpo", "orpo", "kto", "simpo", "cpo")


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    type: str
    description: str = ""


class ImportStep(_Step):
    """Import a model (local folder or .gguf, s3://, hf://, modelscope://) as a new version."""

    type: Literal["import"]
    source: str = Field(min_length=1)
    model: str = Field(min_length=1)
    version: str = ""


class ModelStep(_Step):
    """Start from a version already in the registry."""

    type: Literal["model"]
    version: str = Field(min_length=1)


class DatasetStep(_Step):
    """Upload a local dataset file (validated by the registry) or use an existing version."""

    type: Literal["dataset"]
    path: str = ""
    version: str = ""
    dataset: str = ""
    format: str = ""


class TrainStep(_Step):
    """A training job: sft (lora, qlora, dora, full) or a preference method (lora, full)."""

    type: Literal["sft", "dpo", "orpo", "kto", "simpo", "cpo"]
    model: str = Field(min_length=1)
    datasets: list[str] = Field(min_length=1)
    validation_dataset: str = ""
    method: str = "lora"
    output_model: str = ""
    merge: bool = False
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    launcher: dict[str, Any] = Field(default_factory=dict)
    checkpoint_every_steps: int = Field(default=0, ge=0)
    log_every_steps: int = Field(default=0, ge=0)


class MergeStep(_Step):
    """Merge a LoRA adapter version into its base."""

    type: Literal["merge"]
    adapter: str = Field(min_length=1)
    output_model: str = ""


class QuantizeStep(_Step):
    """A quantization job."""

    type: Literal["quantize"]
    model: str = Field(min_length=1)
    method: str = Field(min_length=1)
    backend: str = ""
    bits: int = Field(default=0, ge=0)
    group_size: int = Field(default=0, ge=0)
    calibration_dataset: str = ""
    samples: int = Field(default=0, ge=0)
    seq_len: int = Field(default=0, ge=0)
    output_model: str = ""
    merge_adapter: bool = False


class DeployStep(_Step):
    """Deploy a version on the inference service and wait until it is READY."""

    type: Literal["deploy"]
    model: str = Field(min_length=1)
    name: str = ""
    engine: Literal["vllm", "transformers"] = "vllm"
    adapters: dict[str, str] = Field(default_factory=dict)
    max_model_len: int = Field(default=0, ge=0)
    max_num_seqs: int = Field(default=0, ge=0)
    kv_cache_bytes: int = Field(default=0, ge=0)
    replace: bool = True
    timeout_s: float = Field(default=900.0, gt=0)


class DecodeBench(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests: int = Field(default=2, ge=1, le=16)
    max_tokens: int = Field(default=64, ge=8, le=2048)


class EvalStep(_Step):
    """Benchmarks on several targets side by side: ``targets`` maps a row label to a model version or
    ``deployments/NAME``; the first target is the baseline of the deltas."""

    type: Literal["eval"]
    targets: dict[str, str] = Field(min_length=1)
    benchmarks: list[str] = Field(min_length=1)
    limit: int = Field(default=0, ge=0)
    num_fewshot: int | None = Field(default=None, ge=0)
    chat_template: bool = False
    engine: Literal["vllm", "transformers"] = "vllm"
    max_model_len: int = Field(default=0, ge=0)
    kv_cache_bytes: int = Field(default=0, ge=0)
    decode: DecodeBench | None = Field(default_factory=DecodeBench)
    max_drop_points: float = Field(default=2.0, ge=0)
    timeout_s: float = Field(default=900.0, gt=0)


class ChatStep(_Step):
    """A smoke chat on a deployment: fails when the answer does not match ``expect`` (a regular expression,
    searched case-insensitively)."""

    type: Literal["chat"]
    deployment: str = Field(min_length=1)
    prompt: str = Field(min_length=1)
    adapter: str = ""
    system: str = ""
    max_tokens: int = Field(default=32, ge=1, le=4096)
    expect: str = ""


STEP_MODELS: dict[str, type[_Step]] = {
    "import": ImportStep,
    "model": ModelStep,
    "dataset": DatasetStep,
    **dict.fromkeys(TRAIN_TYPES, TrainStep),
    "merge": MergeStep,
    "quantize": QuantizeStep,
    "deploy": DeployStep,
    "eval": EvalStep,
    "chat": ChatStep,
}

# What ${steps.ID.KEY} may name, per step type.
OUTPUTS: dict[str, tuple[str, ...]] = {
    "import": ("model_version", "import"),
    "model": ("model_version",),
    "dataset": ("dataset_version",),
    **dict.fromkeys(TRAIN_TYPES, ("model_version", "merged_model_version", "job")),
    "merge": ("model_version", "job"),
    "quantize": ("model_version", "job"),
    "deploy": ("deployment", "model_version"),
    "eval": ("evaluations",),
    "chat": ("text", "decode_tokens_per_second"),
}

SFT_METHODS = {"lora": "lora", "qlora": "qlora", "dora": "dora", "full": "full"}
# The spellings of `yard quantize --method/--backend`.
QUANT_METHODS = {
    "awq": qpb.QUANTIZATION_METHOD_AWQ,
    "gptq": qpb.QUANTIZATION_METHOD_GPTQ,
    "w8a8": qpb.QUANTIZATION_METHOD_W8A8_INT8,
    "fp8": qpb.QUANTIZATION_METHOD_FP8_DYNAMIC,
    "int8": qpb.QUANTIZATION_METHOD_INT8_WEIGHT_ONLY,
    "bnb-nf4": qpb.QUANTIZATION_METHOD_BNB_4BIT,
    "bnb-int8": qpb.QUANTIZATION_METHOD_BNB_8BIT,
}
QUANT_BACKENDS = {
    "llm-compressor": qpb.QUANTIZATION_BACKEND_LLM_COMPRESSOR,
    "autoawq": qpb.QUANTIZATION_BACKEND_AUTOAWQ,
    "gptqmodel": qpb.QUANTIZATION_BACKEND_GPTQMODEL,
    "bitsandbytes": qpb.QUANTIZATION_BACKEND_BITSANDBYTES,
}


@dataclass
class Document:
    name: str
    params: dict[str, str]
    steps: list[_Step]
    raw_steps: list[dict[str, Any]] = field(default_factory=list)

    def step(self, step_id: str) -> _Step:
        return next(s for s in self.steps if s.id == step_id)


def _loc(step_id: str, loc: tuple[Any, ...]) -> str:
    return ".".join(["steps", step_id, *(str(p) for p in loc)])


def load_source(source: str) -> dict[str, Any]:
    if not source.strip():
        raise InvalidArgument.for_field("source", "the pipeline document is empty")
    if len(source.encode()) > MAX_SOURCE_BYTES:
        raise InvalidArgument.for_field("source", f"the pipeline document is over {MAX_SOURCE_BYTES} bytes")
    try:
        data = yaml.safe_load(source)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise InvalidArgument.for_field("source", f"not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise InvalidArgument.for_field("source", "the document must be a mapping with `steps:`")
    return data


def parse(source: str, params: dict[str, str] | None = None) -> Document:
    """The checked document; InvalidArgument with every violation otherwise."""
    data = load_source(source)
    violations: list[FieldViolation] = []

    def bad(fld: str, msg: str) -> None:
        violations.append(FieldViolation(fld, msg))

    for key in data:
        if key not in ("name", "description", "params", "steps"):
            bad(str(key), "unknown top-level key (expected name, description, params, steps)")
    name = data.get("name") or ""
    if not isinstance(name, str):
        bad("name", "must be a string")
        name = ""
    declared = data.get("params") or {}
    if not isinstance(declared, dict):
        bad("params", "must be a mapping of NAME: default (null: required)")
        declared = {}
    given = dict(params or {})
    values: dict[str, str] = {}
    for pname, default in declared.items():
        if not PARAM_RE.match(str(pname)):
            bad(f"params.{pname}", "a parameter name is letters, digits and _")
        elif pname in given:
            values[pname] = str(given.pop(pname))
        elif default is None:
            bad(f"params.{pname}", f"required: give it with --param {pname}=VALUE")
        elif isinstance(default, dict | list):
            bad(f"params.{pname}", "a default must be a string, number or boolean")
        else:
            values[pname] = default if isinstance(default, str) else json.dumps(default)
    for pname in given:
        bad(f"params.{pname}", "not declared in the document's params")

    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        bad("steps", "must be a non-empty list of steps")
        raise InvalidArgument("the pipeline document is invalid", violations=violations)
    if len(raw_steps) > MAX_STEPS:
        bad("steps", f"at most {MAX_STEPS} steps")
    steps: list[_Step] = []
    seen: dict[str, str] = {}
    for i, raw in enumerate(raw_steps):
        if not isinstance(raw, dict):
            bad(f"steps[{i}]", "must be a mapping with id and type")
            continue
        sid = raw.get("id")
        if not isinstance(sid, str) or not STEP_ID_RE.match(sid):
            bad(f"steps[{i}].id", "required: lowercase letters, digits and -, starting with a letter, at most 24")
            continue
        if sid in seen:
            bad(f"steps.{sid}.id", f"duplicate step id (also step {list(seen).index(sid) + 1})")
            continue
        stype = raw.get("type")
        if stype not in STEP_MODELS:
            bad(f"steps.{sid}.type", f"must be one of {', '.join(STEP_MODELS)}; got {stype!r}")
            seen[sid] = ""
            continue
        _check_refs(raw, sid, seen, set(declared), bad)
        seen[sid] = stype
        try:
            step = STEP_MODELS[stype].model_validate(_placeholders(raw, values))
        except ValidationError as exc:
            for err in exc.errors():
                bad(_loc(sid, err["loc"]), err["msg"])
            continue
        _check_step(step, raw, bad)
        steps.append(step)
    if violations:
        raise InvalidArgument(
            f"the pipeline document is invalid ({len(violations)} problem{'s' if len(violations) > 1 else ''})",
            violations=violations,
        )
    return Document(name=name, params=values, steps=steps, raw_steps=raw_steps)


def _walk_strings(value: Any, path: tuple[Any, ...] = ()):
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _walk_strings(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _walk_strings(v, (*path, i))


def _check_refs(raw: dict[str, Any], sid: str, seen: dict[str, str], params: set[str], bad) -> None:
    for path, text in _walk_strings({k: v for k, v in raw.items() if k not in ("id", "type")}):
        for m in REF_RE.finditer(text):
            scope, target, key = m.group(1), m.group(2), m.group(3)
            where = _loc(sid, path)
            if scope == "params":
                if key is not None or target not in params:
                    bad(where, f"{m.group(0)}: no parameter {target!r} is declared")
            elif scope == "steps":
                if key is None:
                    bad(where, f"{m.group(0)}: write ${{steps.STEP.OUTPUT}}")
                elif target not in seen:
                    bad(where, f"{m.group(0)}: no earlier step {target!r}")
                elif seen[target] and key not in OUTPUTS[seen[target]]:
                    bad(where, f"{m.group(0)}: a {seen[target]} step outputs {', '.join(OUTPUTS[seen[target]])}")
            else:
                bad(where, f"{m.group(0)}: references are ${{params.NAME}} or ${{steps.STEP.OUTPUT}}")
        if "${" in REF_RE.sub("", text):
            bad(_loc(sid, path), "an unclosed or malformed ${...} reference")


def _placeholders(raw: dict[str, Any], params: dict[str, str] | None = None) -> Any:
    """The step for the schema check: parameters substituted (their values are known now), step outputs
    replaced by a stand-in resource name."""
    params = params or {}

    def one(m: re.Match[str]) -> str:
        if m.group(1) == "params":
            return params.get(m.group(2), "1")
        return "models/ref/versions/v1"

    def sub(value: Any) -> Any:
        if isinstance(value, str):
            whole = REF_RE.fullmatch(value.strip())
            if whole and whole.group(1) == "params" and whole.group(2) in params:
                return scalar(params[whole.group(2)])
            return REF_RE.sub(one, value)
        if isinstance(value, dict):
            return {k: sub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [sub(v) for v in value]
        return value

    return sub(raw)


def _is_ref(value: str) -> bool:
    return bool(REF_RE.search(value))


def _check_step(step: _Step, raw: dict[str, Any], bad) -> None:
    sid = step.id
    if isinstance(step, DatasetStep):
        if bool(step.path) == bool(step.version):
            bad(f"steps.{sid}.path", "give exactly one of path (a file to upload) or version (an existing one)")
        if step.path and not step.dataset:
            bad(f"steps.{sid}.dataset", "required with path: the dataset name to upload into")
    elif isinstance(step, TrainStep):
        allowed = SFT_METHODS if step.type == "sft" else {"lora": "lora", "full": "full"}
        if step.method not in allowed:
            bad(f"steps.{sid}.method", f"{step.type} takes {', '.join(allowed)}; got {step.method!r}")
        try:
            training_spec(step, resolved=False)
        except InvalidArgument as exc:
            for v in exc.violations:
                bad(f"steps.{sid}.{v.field}", v.description)
    elif isinstance(step, QuantizeStep):
        if step.method.lower() not in QUANT_METHODS:
            bad(f"steps.{sid}.method", f"must be one of {', '.join(QUANT_METHODS)}; got {step.method!r}")
        if step.backend and step.backend.lower() not in QUANT_BACKENDS:
            bad(f"steps.{sid}.backend", f"must be one of {', '.join(QUANT_BACKENDS)}; got {step.backend!r}")
    elif isinstance(step, DeployStep):
        if step.name and not _is_ref(step.name) and not NAME_RE.match(step.name):
            bad(f"steps.{sid}.name", "lowercase letters, digits and -, 1-63 characters")
        for alias in step.adapters:
            if not re.match(r"^[a-z][a-z0-9_-]{0,31}$", alias):
                bad(f"steps.{sid}.adapters.{alias}", "an adapter alias is lowercase letters, digits, _ and -")
    elif isinstance(step, ChatStep) and step.expect:
        try:
            re.compile(step.expect)
        except re.error as exc:
            bad(f"steps.{sid}.expect", f"not a regular expression: {exc}")
    elif isinstance(step, EvalStep):
        for label in step.targets:
            if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$", label):
                bad(f"steps.{sid}.targets.{label}", "a row label is letters, digits, _, . and -, at most 32")
        names = [b.removeprefix("benchmarks/") for b in step.benchmarks]
        if len(set(names)) != len(names):
            bad(f"steps.{sid}.benchmarks", "a benchmark is listed twice")


def versioned(name: str, collection: str) -> str:
    """``smollm2/v1`` -> ``models/smollm2/versions/v1``; full names and references are kept."""
    if name.startswith(f"{collection}/") or _is_ref(name):
        return name
    model, sep, version = name.partition("/")
    return f"{collection}/{model}/versions/{version}" if sep else name


def training_spec(step: TrainStep, *, resolved: bool = True) -> tpb.TrainingJobSpec:
    """The TrainingJobSpec of a train step (``resolved``: references already substituted)."""
    method = step.type if step.type != "sft" else SFT_METHODS.get(step.method, step.method)
    data: dict[str, Any] = {
        "base_model_version": versioned(step.model, "models"),
        "dataset_versions": [versioned(d, "datasets") for d in step.datasets],
        "method": f"TRAINING_METHOD_{method.upper()}",
        "hyperparameters": full_enum_names(step.hyperparameters),
    }
    if step.type != "sft" and step.method == "full":
        data["full_weights"] = True
    if step.validation_dataset:
        data["validation_dataset_version"] = versioned(step.validation_dataset, "datasets")
    if step.output_model:
        data["output_model"] = (
            step.output_model if step.output_model.startswith("models/") else f"models/{step.output_model}"
        )
    if step.merge:
        data["merge_adapter"] = True
    if step.launcher:
        data["launcher"] = full_enum_names(step.launcher)
    for key in ("checkpoint_every_steps", "log_every_steps"):
        if getattr(step, key):
            data[key] = getattr(step, key)
    if not resolved:
        data = _placeholders(data)
    try:
        return json_format.ParseDict(data, tpb.TrainingJobSpec())
    except json_format.ParseError as exc:
        raise _parse_error(str(exc)) from None


def _parse_error(text: str) -> InvalidArgument:
    """A protobuf JSON parse error as a violation of the innermost field it names."""
    unknown = re.search(r'Message type "[\w.]+\.(\w+)" has no field named "(\w+)"', text)
    if unknown:
        parent = {"Hyperparameters": "hyperparameters.", "Launcher": "launcher."}.get(unknown.group(1), "")
        return InvalidArgument.for_field(f"{parent}{unknown.group(2)}", "unknown field")
    path = re.findall(r"Failed to parse (\w+) field", text)
    reason = re.split(r"Failed to parse \w+ field: ", text)[-1].rstrip(".")
    return InvalidArgument.for_field(".".join(path) or "spec", reason)


def quantization_spec(step: QuantizeStep) -> qpb.QuantizationJobSpec:
    return qpb.QuantizationJobSpec(
        source_model_version=versioned(step.model, "models"),
        method=QUANT_METHODS[step.method.lower()],
        backend=QUANT_BACKENDS[step.backend.lower()] if step.backend else qpb.QUANTIZATION_BACKEND_UNSPECIFIED,
        bits=step.bits,
        group_size=step.group_size,
        calibration_dataset_version=versioned(step.calibration_dataset, "datasets") if step.calibration_dataset else "",
        calibration_samples=step.samples,
        calibration_max_length=step.seq_len,
        output_model=(step.output_model if step.output_model.startswith("models/") else f"models/{step.output_model}")
        if step.output_model
        else "",
        merge_adapter=step.merge_adapter,
    )


ENGINES = {"vllm": ipb.ENGINE_VLLM, "transformers": ipb.ENGINE_TRANSFORMERS}


def scalar(text: str) -> Any:
    """A parameter's text as the number or boolean it spells, else the text."""
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def resolve(raw: dict[str, Any], outputs: dict[str, dict[str, Any]], params: dict[str, str]) -> _Step:
    """The step with its references substituted from finished steps' ``outputs`` and ``params``."""

    def value(m: re.Match[str]) -> Any:
        scope, target, key = m.group(1), m.group(2), m.group(3)
        if scope == "params":
            return scalar(params[target])
        out = outputs.get(target, {})
        if key not in out or out[key] in ("", None):
            raise InvalidArgument.for_field(f"steps.{raw['id']}", f"{m.group(0)}: step {target!r} produced no {key!r}")
        return out[key]

    def sub(v: Any) -> Any:
        if isinstance(v, str):
            whole = REF_RE.fullmatch(v.strip())
            if whole:
                return value(whole)
            return REF_RE.sub(lambda m: str(value(m)), v)
        if isinstance(v, dict):
            return {k: sub(x) for k, x in v.items()}
        if isinstance(v, list):
            return [sub(x) for x in v]
        return v

    data = sub(raw)
    return STEP_MODELS[data["type"]].model_validate(data)
