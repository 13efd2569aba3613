"""Training service pieces without I/O: request checks, defaults, precision, hardware refusals, filters."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from modelyard.training.v1 import training_pb2 as tpb
from services.core.errors import FailedPrecondition, InvalidArgument
from services.core.hardware import Device, Hardware, choose_precision
from services.core.listing import memory_page, parse
from services.core.settings import S3Settings
from services.training.domain import CHECKPOINT_SCHEMA, JOB_SCHEMA, Checkpoint, job_id
from services.training.preflight import Preflight, PreflightOptions
from services.training.recipes.spec import Hyperparameters
from services.training.servicer import hyperparameters_from_proto, hyperparameters_to_proto
from services.training.spec import LauncherRequest, TrainingRequest, check_request, resolve_hyperparameters

CPU = Hardware("cpu", cpu_cores=2, ram_total_bytes=8 << 30, ram_available_bytes=6 << 30)
A100 = Device("A100", 80 << 30, 79 << 30, (8, 0))
PROTO = Path(__file__).resolve().parents[2] / "protos" / "modelyard" / "training" / "v1" / "training.proto"
V100 = Device("V100", 32 << 30, 31 << 30, (7, 0))


def request(**kw) -> TrainingRequest:
    return TrainingRequest(**{"base_model_version": "models/m/versions/v1", "dataset_versions": ["datasets/d/versions/v1"],
                              "method": "lora", **kw})


def preflight(hw: Hardware, **options) -> Preflight:
    return Preflight(None, None, hw, PreflightOptions(s3=S3Settings(), registry_addr="r:1", **options))  # type: ignore[arg-type]


def test_check_request_names_every_bad_field():
    with pytest.raises(InvalidArgument) as info:
        check_request(request(method="", dataset_versions=[], job_id="Bad_Id", output_model="tiny",
                              hyperparameters={"batch_size": 0, "warmup_ratio": 1.0, "lr_scheduler": "zigzag"},
                              launcher=LauncherRequest(kind="local", num_processes=2)))
    assert {v.field for v in info.value.violations} == {
        "spec.method", "spec.dataset_versions", "training_job_id", "spec.output_model",
        "spec.hyperparameters.batch_size", "spec.hyperparameters.warmup_ratio", "spec.hyperparameters.lr_scheduler",
        "spec.launcher.num_processes"}
    assert info.value.reason == "INVALID_TRAINING_SPEC"


def test_defaults_follow_ms_swift():
    lora = resolve_hyperparameters(request(), precision="fp32", context_length=512, num_processes=1)
    assert (lora.lora_rank, lora.lora_alpha, lora.lora_dropout, lora.lora_target_modules) == (8, 32, 0.05, "all-linear")
    assert (lora.learning_rate, lora.lr_scheduler, lora.warmup_ratio, lora.weight_decay) == (1e-4, "cosine", 0.05, 0.1)
    assert (lora.gradient_accumulation_steps, lora.max_length, lora.beta) == (16, 512, 0.1)
    assert (lora.simpo_gamma, lora.gradient_checkpointing, lora.max_steps, lora.seed) == (1.0, True, -1, 42)
    full = resolve_hyperparameters(request(method="full", hyperparameters={"batch_size": 2}), precision="bf16",
                                   context_length=0, num_processes=2)
    assert (full.learning_rate, full.gradient_accumulation_steps, full.max_length) == (1e-5, 4, 2048)
    odd = resolve_hyperparameters(request(hyperparameters={"batch_size": 3}), precision="fp32", context_length=0,
                                  num_processes=1)
    assert odd.gradient_accumulation_steps == 6  # ceil(16 / 3): a global batch of at least 16
    assert resolve_hyperparameters(request(method="simpo"), precision="fp32", context_length=0, num_processes=1).beta == 2.0
    dpo_full = request(method="dpo", full_weights=True)
    assert dpo_full.use_lora is False and request(method="dpo").use_lora is True
    assert resolve_hyperparameters(dpo_full, precision="fp32", context_length=0, num_processes=1).learning_rate == 1e-5
    given = resolve_hyperparameters(request(hyperparameters={"learning_rate": 3e-4, "lora_target_modules": ["q_proj"]}),
                                    precision="fp32", context_length=0, num_processes=1)
    assert (given.learning_rate, given.lora_target_modules) == (3e-4, ["q_proj"])


def _proto_field_comments(message: str) -> dict[str, str]:
    """Field name -> its comment (lines joined) in ``message`` of training.proto."""
    text = PROTO.read_text()
    body = text[text.index(f"message {message} {{"):]
    body = body[:body.index("\n}")]
    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in body.splitlines()[1:]:
        line = line.strip()
        if line.startswith("//"):
            pending.append(line[2:].strip())
        elif m := re.match(r"(?:optional |repeated )?\w+ (\w+) = \d+;", line):
            comments[m.group(1)] = " ".join(pending)
            pending = []
    return comments


def test_proto_comments_state_the_defaults_the_jobs_use():
    """The proto documents each hyperparameter's default; those must be the defaults of ``Hyperparameters``."""
    comments = _proto_field_comments("Hyperparameters")
    spec_names = {"target_modules": "lora_target_modules"}
    model_fields = Hyperparameters.model_fields
    assert {spec_names.get(f, f) for f in comments} - {"validation_split"} == set(model_fields)
    checked = 0
    for proto_name, comment in comments.items():
        name = spec_names.get(proto_name, proto_name)
        if name not in model_fields or model_fields[name].is_required():
            continue
        m = re.search(r"Default (\S+)", comment)
        assert m, f"{proto_name}: no 'Default X' in {comment!r}"
        token, default = m.group(1).rstrip(".,"), model_fields[name].default
        if isinstance(default, bool):
            assert token == str(default).lower(), proto_name
        elif isinstance(default, int | float):
            assert float(token) == default, (proto_name, token, default)
        elif name == "lora_target_modules":
            assert json.loads(token) == [default], (proto_name, token)
        else:
            assert token == default, (proto_name, token, default)
        checked += 1
    assert checked >= 15
    # the method-dependent defaults: computed in Hyperparameters.derived_defaults, stated in the comments
    lora = Hyperparameters.derived_defaults(method="lora", use_lora=True, batch_size=1, num_processes=1, context_length=0)
    full = Hyperparameters.derived_defaults(method="full", use_lora=False, batch_size=1, num_processes=1,
                                            context_length=0)
    simpo = Hyperparameters.derived_defaults(method="simpo", use_lora=True, batch_size=1, num_processes=1,
                                             context_length=0)
    lr = re.search(r"Default (\S+) \((\S+) for full-weight training\)", comments["learning_rate"])
    assert lr and (float(lr.group(1)), float(lr.group(2))) == (lora["learning_rate"], full["learning_rate"])
    beta = re.search(r"Default (\S+) \(SimPO: (\S+)\)", comments["beta"])
    assert beta and (float(beta.group(1)), float(beta.group(2))) == (lora["beta"], simpo["beta"])
    assert "ceil(16 / (batch_size * processes))" in comments["gradient_accumulation_steps"]
    assert lora["gradient_accumulation_steps"] == 16 and lora["max_length"] == 2048
    assert f"({lora['max_length']} when its config names none)" in comments["max_length"]


def test_auto_precision_by_hardware():
    assert choose_precision("auto", Hardware("cuda", (A100,))) == "bf16"
    assert choose_precision("auto", Hardware("cuda", (V100,))) == "fp16"
    assert choose_precision("auto", CPU) == "fp32"
    assert choose_precision("bf16", CPU) == "bf16"


def test_hardware_refusals_say_why():
    with pytest.raises(FailedPrecondition) as info:
        preflight(Hardware("cuda", (A100,), bitsandbytes=False))._precision(request(method="qlora"))
    assert info.value.reason == "HARDWARE_UNSUPPORTED" and "bitsandbytes" in info.value.message
    assert preflight(Hardware("cuda", (A100,), bitsandbytes=True))._precision(request(method="qlora")) == "bf16"
    with pytest.raises(FailedPrecondition, match="fp16 needs a CUDA"):
        preflight(CPU)._precision(request(hyperparameters={"precision": "fp16"}))
    with pytest.raises(FailedPrecondition, match="bf16 needs CUDA compute capability"):
        preflight(Hardware("cuda", (V100,)))._precision(request(hyperparameters={"precision": "bf16"}))

    two_gpus = Hardware("cuda", (A100, A100), cpu_cores=16, deepspeed=True)
    deepspeed = LauncherRequest(kind="deepspeed", num_processes=4)
    with pytest.raises(FailedPrecondition, match="asks for 4 processes; this node allows 2") as info:
        preflight(two_gpus)._processes(request(launcher=deepspeed))
    assert info.value.reason == "HARDWARE_UNSUPPORTED"
    assert preflight(two_gpus)._processes(request(launcher=LauncherRequest(kind="deepspeed"))) == 2
    without_package = Hardware("cpu", (), cpu_cores=2, deepspeed=False)
    with pytest.raises(FailedPrecondition, match="needs the deepspeed package"):
        preflight(without_package)._processes(request(launcher=LauncherRequest(kind="deepspeed", num_processes=1)))
    cpu_with_deepspeed = Hardware("cpu", (), cpu_cores=2, deepspeed=True)  # ZeRO over gloo on CPU cores
    assert preflight(cpu_with_deepspeed)._processes(request(launcher=LauncherRequest(kind="deepspeed", num_processes=2))) == 2
    with pytest.raises(FailedPrecondition, match="asks for 3 processes; this node allows 2"):
        preflight(cpu_with_deepspeed)._processes(request(launcher=LauncherRequest(kind="deepspeed", num_processes=3)))


def test_job_list_filters_use_the_shared_listing_syntax():
    query = parse(JOB_SCHEMA, filter="state = JOB_STATE_RUNNING AND method = TRAINING_METHOD_LORA AND kind = merge")
    assert [(t.field, t.op, t.value) for t in query.terms] == [("state", "=", "RUNNING"), ("method", "=", "lora"),
                                                              ("kind", "=", "merge")]
    with pytest.raises(InvalidArgument) as info:
        parse(JOB_SCHEMA, filter="state = sleeping")
    assert info.value.violations[0].field == "filter" and "sleeping" in info.value.message
    with pytest.raises(InvalidArgument, match="unknown field 'owner'"):
        parse(JOB_SCHEMA, filter="owner = me")
    with pytest.raises(InvalidArgument, match="cannot sort by 'method'"):
        parse(JOB_SCHEMA, order_by="method")
    assert job_id("trainingJobs/lora-1") == "lora-1"
    with pytest.raises(InvalidArgument):
        job_id("jobs/x")


def test_checkpoints_filter_order_and_page_in_memory():
    checkpoints = [Checkpoint(f"trainingJobs/j/checkpoints/step-{s:08d}", s, f"p/{s}", s * 10) for s in (8, 2, 6, 4)]
    query = parse(CHECKPOINT_SCHEMA, filter="step >= 4", page_size=2, scope="trainingJobs/j")
    first = memory_page(checkpoints, query, CHECKPOINT_SCHEMA)
    assert [c.step for c in first.items] == [4, 6] and first.next_page_token and first.total_size == 3
    second = memory_page(checkpoints, parse(CHECKPOINT_SCHEMA, filter="step >= 4", page_size=2,
                                            page_token=first.next_page_token, scope="trainingJobs/j"), CHECKPOINT_SCHEMA)
    assert [c.step for c in second.items] == [8] and second.next_page_token == ""
    desc = memory_page(checkpoints, parse(CHECKPOINT_SCHEMA, order_by="step desc"), CHECKPOINT_SCHEMA)
    assert [c.step for c in desc.items] == [8, 6, 4, 2]
    with pytest.raises(InvalidArgument) as info:  # a token of one job's listing is no good for another's
        parse(CHECKPOINT_SCHEMA, filter="step >= 4", page_size=2, page_token=first.next_page_token, scope="trainingJobs/k")
    assert info.value.violations[0].field == "page_token"
    with pytest.raises(InvalidArgument, match="bad value 'x'"):
        parse(CHECKPOINT_SCHEMA, filter="step > x")


def test_proto_hyperparameters_round_trip_through_the_one_model():
    """What a caller sets comes through; what it leaves unset takes the model's defaults, and the resolved values
    go back to the proto unchanged."""
    asked = tpb.Hyperparameters(learning_rate=3e-4, lr_scheduler=tpb.LR_SCHEDULER_LINEAR, target_modules=["q_proj"],
                                max_steps=7, packing=False, precision=tpb.PRECISION_BF16)
    given = hyperparameters_from_proto(asked)
    assert given == {"learning_rate": 3e-4, "lr_scheduler": "linear", "lora_target_modules": ["q_proj"],
                     "max_steps": 7, "packing": False, "precision": "bf16"}  # unset fields are left to the defaults
    resolved = Hyperparameters.resolve(given, method="dpo", use_lora=True, precision="bf16")
    back = hyperparameters_to_proto(resolved.model_dump(), 0.1)
    assert (back.learning_rate, back.lr_scheduler, list(back.target_modules)) == (3e-4, tpb.LR_SCHEDULER_LINEAR, ["q_proj"])
    assert (back.beta, back.weight_decay, back.precision, back.validation_split) == (0.1, 0.1, tpb.PRECISION_BF16, 0.1)
    assert Hyperparameters.resolve(hyperparameters_from_proto(back), method="dpo", use_lora=True,
                                   precision="bf16") == resolved
