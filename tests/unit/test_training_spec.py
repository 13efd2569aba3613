"""Training service pieces without I/O: request checks, defaults, precision, hardware refusals, filters."""

from __future__ import annotations

import pytest

from services.core.errors import FailedPrecondition, InvalidArgument
from services.core.jobs import JobState
from services.core.settings import S3Settings
from services.training.domain import _parse_filter, job_id
from services.training.hardware import Device, Hardware, choose_precision
from services.training.preflight import Preflight, PreflightOptions
from services.training.spec import LauncherRequest, TrainingRequest, check_request, resolve_hyperparameters

CPU = Hardware("cpu", cpu_cores=2, ram_total_bytes=8 << 30, ram_available_bytes=6 << 30)
A100 = Device("A100", 80 << 30, 79 << 30, (8, 0))
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
    assert (lora["lora_rank"], lora["lora_alpha"], lora["lora_dropout"], lora["lora_target_modules"]) == (8, 32, 0.05, "all-linear")
    assert (lora["learning_rate"], lora["lr_scheduler"], lora["warmup_ratio"]) == (1e-4, "cosine", 0.05)
    assert (lora["gradient_accumulation_steps"], lora["max_length"], lora["beta"]) == (16, 512, 0.1)
    full = resolve_hyperparameters(request(method="full", hyperparameters={"batch_size": 2}), precision="bf16",
                                   context_length=0, num_processes=2)
    assert (full["learning_rate"], full["gradient_accumulation_steps"], full["max_length"]) == (1e-5, 4, 2048)
    assert resolve_hyperparameters(request(method="simpo"), precision="fp32", context_length=0, num_processes=1)["beta"] == 2.0
    assert request(method="dpo", full_weights=True).use_lora is False and request(method="dpo").use_lora is True


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


def test_filters_and_names():
    assert _parse_filter("state = JOB_STATE_RUNNING AND method = TRAINING_METHOD_LORA") == ([JobState.RUNNING], "lora", None)
    assert _parse_filter("kind = merge and state = failed") == ([JobState.FAILED], None, "merge")
    with pytest.raises(InvalidArgument, match="unknown state"):
        _parse_filter("state = sleeping")
    with pytest.raises(InvalidArgument):
        _parse_filter("owner = me")
    assert job_id("trainingJobs/lora-1") == "lora-1"
    with pytest.raises(InvalidArgument):
        job_id("jobs/x")
